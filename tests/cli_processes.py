"""Many command lines, each in a process of its own, without paying for Python's and torch's imports each time.

`python train.py ARGS` spends about 4 s importing torch and the project before it reads its first flag, and 3.6 s
more on its way through training (torch.optim's first optimizer imports torch._dynamo; loss.png imports
matplotlib); seventy such runs are most of a test's time on a 2-core machine. Here one server process imports all
that once, for the whole test session (conftest's `command_lines` fixture), then forks a child per command line,
and the child runs the script as `python SCRIPT ARGS` does (runpy, as __main__, with sys.argv, the working folder,
stdout and stderr of its own, stdin empty), so the exit code and the output are the command line's own. The server
is a fresh interpreter that has run no torch operation before forking (a process whose thread pools have started
cannot fork safely; pytest's own process may have).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELOAD = ("torch", "cli", "data", "weights", "tinyvlm", "evaluation", "train", "quantize", "chat", "bench",
           "torch._dynamo", "matplotlib.pyplot")

SERVER = r"""
import atexit, gc, importlib, json, os, runpy, signal, sys, threading, time, traceback
for name in sys.argv[1].split(","):
    importlib.import_module(name)
# Objects the children inherit are never collected there: without this, each child's garbage collector would walk
# them all, copying every page it shares with the server (the heavier the imports, the slower each child).
gc.freeze()

def start(job, threads):
    pid = os.fork()
    if pid:
        try:                    # (in both processes, so that neither can act before the group exists)
            os.setpgid(pid, pid)
        except (ProcessLookupError, PermissionError):       # the child got there first, or has already ended
            pass
        return pid
    os.setpgid(0, 0)            # a group of its own: a command that hangs is killed with what it started (torchrun's ranks)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)            # stdin is the server's channel: not the child's
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    if threads:                                             # the pool starts with the child's first torch operation
        import torch
        torch.set_num_threads(threads)
    sys.argv = [job["script"], *job["args"]]
    code = 0
    try:
        runpy.run_path(job["script"], run_name="__main__")
    except SystemExit as e:                  # what the interpreter does with sys.exit(x)
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # The interpreter's own exit up to its teardown: non-daemon threads joined, atexit handlers run (weakref
    # finalizers such as TemporaryDirectory's among them), the streams flushed. Not the teardown itself: it touches
    # every object the child inherited, copying each page the server shares with it (0.3 s a process, 4x the time
    # a mistake takes to be found and said).
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

class RanOver(Exception):
    pass

def ran_over(signum, frame):
    raise RanOver

signal.signal(signal.SIGALRM, ran_over)

def wait_one(running, codes, deadline):     # reaps one child; past the deadline, stops all running instead
    try:
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.001))
        pid, status = os.wait()
        signal.setitimer(signal.ITIMER_REAL, 0)
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    except RanOver:             # (one that ended just then, reaped or not, is said to have run over too)
        stop(running, codes)

def signal_groups(pids, sig):
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass

def stop(running, codes):
    # SIGTERM first, as torchrun stops its ranks then (they run in sessions of their own); after 15 s, SIGKILL to
    # each group, whose leader may have gone while something it started has not
    groups = list(running)
    for i in running.values():
        codes[i] = "ran over"
    signal_groups(groups, signal.SIGTERM)
    end = time.monotonic() + 15
    while running and time.monotonic() < end:
        for pid in list(running):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    running.pop(pid)
            except ChildProcessError:
                running.pop(pid)
        time.sleep(0.1)
    signal_groups(groups, signal.SIGKILL)
    for pid in running:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    running.clear()

for line in sys.stdin:          # one batch of command lines per line; back, in order, their exit codes or "ran over"
    batch = json.loads(line)
    jobs, running, codes = batch["jobs"], {}, {}
    deadline = time.monotonic() + batch["timeout"]
    for i, job in enumerate(jobs):
        while len(running) >= batch["parallel"]:
            wait_one(running, codes, deadline)
        if time.monotonic() < deadline:
            running[start(job, batch["threads"])] = i
        else:
            codes[i] = "ran over"
    while running:
        wait_one(running, codes, deadline)
    print(json.dumps([codes[i] for i in range(len(jobs))]), flush=True)
"""


@dataclass
class Finished:
    """What subprocess.run would have returned for one command line (returncode -9 if it ran over the time given)."""
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


class Server:
    """The server process; run_all() hands it one batch of command lines at a time."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")        # the server's own errors (the children write elsewhere)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, ",".join(PRELOAD)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def run_all(self, commands: list[tuple], cwd: Path, parallel: int = 2, threads: int = 0,
                timeout: int = 600) -> list[Finished]:
        """[(script, args) or (script, args, {VAR: value})] -> one Finished per command line, in order; each ran as
        `VAR=value python ROOT/script args` in cwd, at most `parallel` at a time. threads: torch's threads in each
        (0: its default, one per core); VAR=value cannot set them, torch having read its environment on import.
        timeout: seconds for the whole batch; a command line still running then is killed, with all it started, and
        its Finished says so at the end of its stderr (a hang costs one test, with the command's own output)."""
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [{"script": str(ROOT / c[0]), "args": c[1], "env": c[2] if len(c) > 2 else {}, "cwd": str(cwd),
                     "stdout": f"{tmp}/{i}.out", "stderr": f"{tmp}/{i}.err"} for i, c in enumerate(commands)]
            if self.proc.poll() is not None:                 # an earlier batch's failure cost that batch only
                self.close()
                self.start()
            self.proc.stdin.write(json.dumps({"jobs": jobs, "parallel": parallel, "threads": threads,
                                              "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 60)
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                self.proc.kill()
                self.proc.wait()                            # (so that the next batch finds it ended, and restarts it)
                self.log.seek(0)
                raise RuntimeError(f"the command-line server failed:\n{self.log.read()[-3000:]}")
            out = lambda path: Path(path).read_text() if Path(path).exists() else ""
            finished = []
            for c, code, job in zip(commands, json.loads(line), jobs):
                err = out(job["stderr"])
                if code == "ran over":
                    code, err = -9, err + f"\n[tests/cli_processes.py: killed, still running after {timeout} s]\n"
                finished.append(Finished([c[0], *c[1]], code, out(job["stdout"]), err))
            return finished

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()
