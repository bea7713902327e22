"""The project's modules depend on each other one way, from the model up to the programs:

    tinyvlm (the model), cli  <-  data, weights  <-  evaluation  <-  train  <-  quantize  <-  chat, bench

Each module is imported in a fresh interpreter and must pull in exactly the project modules below it; and no import
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


def test_each_module_pulls_in_only_the_modules_below_it():
    code = "import sys, json; import {m}; print(json.dumps(sorted(n for n in sys.modules if n in {p!r})))"
    procs = {m: subprocess.Popen([sys.executable, "-c", code.format(m=m, p=set(LEVEL))], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in LEVEL}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert set(json.loads(out)) - {module} == PULLS_IN[module], module


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
