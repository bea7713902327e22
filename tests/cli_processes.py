"""Many command lines, each in a process of its own, without paying for Python's and torch's imports each time.

`python train.py ARGS` spends about 2 s importing torch before it reads its first flag; seventy such runs are most
of a test's time on a 2-core machine. Here one server process imports the project once, then forks a child per
command line, and the child runs the script as `python SCRIPT ARGS` does (runpy, as __main__, with sys.argv, the
working folder, stdout and stderr of its own), so the exit code and the output are the command line's own. The
server is a fresh interpreter that has run no torch operation before forking (a process whose thread pools have
started cannot fork safely; pytest's own process may have).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the command lines import, imported once in the server: the project's modules (4 s with torch), and for those
# that train, what training imports on its way (torch.optim's first optimizer imports torch._dynamo, 2.7 s; loss.png
# imports matplotlib, 0.9 s), each of which a forked child would otherwise import again.
PROJECT = ("torch", "cli", "data", "weights", "tinyvlm", "evaluation", "train", "quantize", "chat", "bench")
TRAINING = PROJECT + ("torch._dynamo", "matplotlib.pyplot")

SERVER = r"""
import atexit, json, os, runpy, sys, threading, traceback
import importlib
jobs, parallel, preload = json.loads(sys.stdin.read()), int(sys.argv[1]), sys.argv[2].split(",")
for name in preload:
    importlib.import_module(name)
import gc; gc.freeze()
running, codes = {}, {}

def start(i, job):
    pid = os.fork()
    if pid:
        running[pid] = i
        return
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
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

for i, job in enumerate(jobs):
    if len(running) >= parallel:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    start(i, job)
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(jobs))]))
"""


@dataclass
class Finished:
    """What subprocess.run would have returned for one command line."""
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_all(commands: list[tuple], cwd: Path, parallel: int = 2, timeout: int = 600,
            env: dict | None = None, preload: tuple[str, ...] = TRAINING) -> list[Finished]:
    """[(script, args) or (script, args, {VAR: value})] -> one Finished per command line, in order; each ran as
    `VAR=value python ROOT/script args` in cwd, at most `parallel` at a time. env: for all of them, from the start
    (what torch reads when imported, such as OMP_NUM_THREADS, must be there); preload: the modules the server
    imports before it forks (PROJECT where no command line trains)."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [{"script": str(ROOT / c[0]), "args": c[1], "env": c[2] if len(c) > 2 else {}, "cwd": str(cwd),
                 "stdout": f"{tmp}/{i}.out", "stderr": f"{tmp}/{i}.err"} for i, c in enumerate(commands)]
        server = subprocess.run([sys.executable, "-c", SERVER, str(parallel), ",".join(preload)], input=json.dumps(jobs),
                                capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}, cwd=cwd)
        if server.returncode:
            raise RuntimeError(f"the command-line server failed (exit {server.returncode}):\n{server.stderr[-3000:]}")
        codes = json.loads(server.stdout.splitlines()[-1])
        return [Finished([c[0], *c[1]], code, Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
                for c, code, job in zip(commands, codes, jobs)]
