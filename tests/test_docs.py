"""Every command the README and the workshop guide show still parses: its flags exist and its values are in range.

A reader copies these commands as they are written, so a renamed flag or a narrowed range would break them where no
other test looks. Each command goes through its program's own parser (the flags generated from its config) and the
config's checks, and stops there: nothing is trained, read or written."""

import re
import shlex
from pathlib import Path

import pytest

import bench
import chat
import cli
import data
import quantize
import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "WORKSHOP.md")
PROGRAMS = {"train.py": train.main, "tinyvlm.py": chat.main, "chat.py": chat.main, "quantize.py": quantize.main,
            "data.py": data.main, "bench.py": bench.main}
PLACEHOLDERS = {"S": "1"}          # `--seed S` "for S = 1, 2, 3"


def shown_commands(text: str) -> list[str]:
    """The commands of our programs in a document: in its code blocks, one per line (a trailing backslash joins the
    next to it), after a `$ ` prompt or `&&`; and in its inline code."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", "").splitlines():     # as the shell joins them
            found += re.split(r"&&|;", line.removeprefix("$ "))
    found += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [" ".join(c.split()) for c in found if re.match(r"\s*(python3? |torchrun )", c)]


def argvs(command: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) for a shown command; one per alternative where a value offers some (`a|b`);
    none for other commands (python -m pytest, python -c) or those left unfinished (`...`)."""
    words = shlex.split(command.split(" | ")[0], comments=True)
    if words[0] == "torchrun":                          # its own options, then the program and the program's
        words = ["python"] + words[next((i for i, w in enumerate(words) if w.endswith(".py")), len(words)):]
    if len(words) < 2 or not words[1].endswith(".py") or "..." in words:
        return []
    args = [PLACEHOLDERS.get(w, w) for w in words[2:]]
    alternatives = [i for i, w in enumerate(args) if "|" in w and not w.startswith("-")]
    if not alternatives:
        return [(words[1], args)]
    i = alternatives[0]
    return [(words[1], args[:i] + [choice] + args[i + 1:]) for choice in args[i].split("|")]


COMMANDS = sorted({(doc, program, tuple(args)) for doc in DOCS
                   for command in shown_commands((ROOT / doc).read_text(encoding="utf-8"))
                   for program, args in argvs(command)})


class Parsed(Exception):
    """Raised where a program would start its work: the command parsed."""


def test_the_documents_show_commands_of_every_program():
    """The extraction itself: it finds what the documents plainly hold, so an empty list cannot pass the test below."""
    shown = {(doc, program) for doc, program, _ in COMMANDS}
    assert {("README.md", p) for p in ("train.py", "tinyvlm.py", "quantize.py", "data.py", "bench.py")} <= shown
    assert {("WORKSHOP.md", p) for p in ("train.py", "tinyvlm.py", "quantize.py", "data.py")} <= shown
    assert len(COMMANDS) >= 50
    assert ("README.md", "train.py", ("--recipe", "imp", "--stage", "1")) in COMMANDS
    assert ("README.md", "train.py", ("--stage", "4", "--quick", "--seed", "1", "--init",
                                      "out/stage3/model.safetensors")) in COMMANDS


@pytest.mark.parametrize("doc,program,args", COMMANDS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x)
def test_a_shown_command_parses(doc, program, args, monkeypatch, capsys):
    build = cli.config_from_args

    def parsed(cls, namespace):            # every program builds its config here, right after parsing its flags
        cli.check_config(build(cls, namespace))
        raise Parsed

    assert program in PROGRAMS, f"{doc}: python {program} {' '.join(args)}: no such program here"
    monkeypatch.setattr(cli, "config_from_args", parsed)
    try:
        PROGRAMS[program](list(args))
    except Parsed:
        return
    except SystemExit as e:                # --help: exit code 0; a mistake: argparse's one line on stderr, code 2
        if e.code == 0 and "--help" in args:
            return
    pytest.fail(f"{doc}: python {program} {' '.join(args)}: {capsys.readouterr().err.strip()}")


def test_the_documents_give_stage_4_the_iterations_its_recipe_runs():
    """The quick start's table and the workshop's expected output say how many iterations stage 4 runs, with and
    without --quick; they are the recipe's (train.resolve), so a change of the recipe cannot leave them behind."""
    readme, workshop = ((ROOT / doc).read_text(encoding="utf-8") for doc in DOCS)
    said = {bool(quick): int(n) for quick, n in re.findall(r"^\| 4 (`--quick` )?\((\d+) iterations\)", readme, re.M)}
    runs = {quick: train.resolve(train.TrainConfig(stage=4, quick=quick)).max_iters for quick in (False, True)}
    assert said == runs
    step7 = re.search(r"python train.py --stage 4 --quick\n```.*?stage 4 done: (\d+) iterations", workshop, re.S)
    assert step7 and int(step7.group(1)) == runs[True]


def test_the_readme_counts_the_tests_there_are(request):
    """The README says how many tests the suite has ("The N tests take about ..."); it is the number pytest collects
    from tests/. Only a run of the whole suite knows that number, so a run of some tests skips the check."""
    config, items = request.config, request.session.items
    files = {Path(str(item.fspath)).name for item in items}
    chosen = config.option.keyword or config.option.markexpr or config.option.deselect or config.option.lf
    if chosen or files != {p.name for p in (ROOT / "tests").glob("test_*.py")}:
        pytest.skip("a run of some of the tests does not know how many the suite has")
    said = re.search(r"^The (\d+) tests take", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert said, "the README no longer says how many tests there are"
    assert int(said.group(1)) == len(items), f"the README says {said.group(1)}, pytest collected {len(items)}"
