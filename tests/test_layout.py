"""The project's modules depend on each other one way, from the model up to the programs:

    tinyvlm (the model), cli  <-  data, weights  <-  evaluation  <-  train  <-  quantize  <-  chat, bench

Each module is imported in an interpreter of its own and must pull in exactly the project modules below it; and no import
statement anywhere (a function's lazy import included) points up or sideways in that order."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"cli": 0, "tinyvlm": 0, "data": 1, "weights": 1, "evaluation": 2, "train": 3, "quantize": 4, "chat": 5,
         "bench": 5}
PULLS_IN = {
    "cli": set(),
    "tinyvlm": set(),
    "data": {"cli", "tinyvlm"},
    "weights": {"cli", "tinyvlm"},
    "evaluation": {"cli", "tinyvlm", "data"},
    "train": {"cli", "tinyvlm", "data", "weights", "evaluation"},
    "quantize": {"cli", "tinyvlm", "data", "weights", "evaluation", "train"},
    "chat": {"cli", "tinyvlm", "data", "weights", "evaluation", "train", "quantize"},
    "bench": {"cli", "tinyvlm", "data", "weights", "evaluation", "train", "quantize"},
}


# One interpreter imports the third-party libraries (torch: 2 s) and forks a child per project module, which
# imports that module alone and says which project modules came with it.
FORKED_IMPORTS = r"""
import json, os, sys
import numpy, PIL.Image, safetensors, tokenizers, torch
modules, project = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
for m in modules:
    if os.fork() == 0:
        __import__(m)
        os.write(1, (json.dumps([m, sorted(n for n in sys.modules if n in project)]) + "\n").encode())
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.wait()[1]) == 0, m
"""


def test_each_module_pulls_in_only_the_modules_below_it():
    proc = subprocess.run([sys.executable, "-c", FORKED_IMPORTS, json.dumps(list(LEVEL)), json.dumps(list(LEVEL))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pulled = dict(json.loads(line) for line in proc.stdout.splitlines())
    assert set(pulled) == set(LEVEL)
    for module, found in pulled.items():
        assert set(found) - {module} == PULLS_IN[module], module


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in a file, at any depth, except under
    `if __name__ == "__main__":` (tinyvlm.py's one-line hand-over to chat.py)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name in LEVEL]
        elif isinstance(node, ast.ImportFrom) and node.module in LEVEL:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("module", sorted(LEVEL))
def test_no_import_points_up_the_graph(module):
    for line, target in project_imports(ROOT / f"{module}.py"):
        assert LEVEL[target] < LEVEL[module], f"{module}.py:{line} imports {target}"
