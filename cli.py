"""
cli.py: the command lines of train.py, chat.py, quantize.py and data.py, generated from their config dataclasses.

    one --flag per field      underscores become dashes; booleans get --x / --no-x
    help                      the comment after the field (a comment line of its own starts a group of flags)
    choices, ranges           the class's CHOICES and LIMITS, checked for flags and for configs built in Python
    mistakes                  one line on stderr naming the flag or file and what to do, exit code 2, no traceback
                              (--debug shows the traceback)

So the flags cannot drift from the config, and `python train.py --help` says what each one does.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import os
import re
import sys
import time
import tokenize
from pathlib import Path
from typing import Callable


class UserError(ValueError):
    """A mistake the user can fix: a bad flag, a missing or unreadable file, data that cannot be used. Its message
    names the flag or the file and says what to do; the command line prints it as one line and exits with 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Flags from a dataclass

def field_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """{field: the comment after it} and {field: the comment line that heads its group}, read from the source."""
    helps, groups, group = {}, {}, ""
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    line_field = {}                       # line number -> the field declared on it (or whose comment goes on there)
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.line.strip().startswith(tok.string + ":") and tok.start[1] == 4:
            line_field[tok.start[0]] = tok.string
            groups[tok.string] = group
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] in line_field:
                helps[line_field[tok.start[0]]] = text
            elif tok.line.strip().startswith("#") and tok.start[1] == 4:
                group = text
            elif tok.line.strip().startswith("#") and tok.start[0] - 1 in line_field:   # a field's comment goes on
                field = line_field[tok.start[0] - 1]
                helps[field] += " " + text
                line_field[tok.start[0]] = field
    return helps, groups


def describe(value) -> str:
    return "on" if value is True else "off" if value is False else repr(value) if value == "" else str(value)


def checked(kind: type, name: str, low=None, high=None, choices=None, default=None) -> Callable[[str], object]:
    """An argparse type: the value converted to `kind`, then held to its range or choices (the default is always
    allowed: an empty string often means "not given")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a number' if kind in (int, float) else kind.__name__}")
        if value == default:
            return value
        problem = check_value(name, value, low, high, choices)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = kind.__name__
    return parse


def check_value(name: str, value, low=None, high=None, choices=None) -> str:
    """What is wrong with a value for field `name` (an empty string if nothing)."""
    if choices is not None and value not in choices:
        return f"{value!r} is not one of {', '.join(map(str, choices))}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if low is not None and value < low:
        return f"{value} is below {low}"
    if high is not None and value > high:
        return f"{value} is above {high}"
    return ""


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of the dataclass cls, with its comment as help, its default, choices and range."""
    helps, groups = field_comments(cls)
    choices, limits = getattr(cls, "CHOICES", {}), getattr(cls, "LIMITS", {})
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        title = groups.get(f.name, "")
        target = parser if not title else sections.setdefault(title, parser.add_argument_group(title))
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "").replace("%", "%%")      # argparse formats help strings with %
        if isinstance(f.default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{text} (default: {describe(f.default)})")
            continue
        low, high = limits.get(f.name, (None, None))
        allowed = choices.get(f.name)
        bounds = ("" if allowed else f"; {low} or more" if high is None and low is not None else
                  f"; {low} to {high}" if low is not None else "")
        said = "default" in text                 # the comment names the default itself (what an empty value means)
        suffix = (f" ({bounds[2:]})" if bounds else "") if said else f" (default: {describe(f.default)}{bounds})"
        target.add_argument(flag, type=checked(type(f.default), flag, low, high, allowed, f.default), default=f.default,
                            metavar="{" + ",".join(map(str, allowed)) + "}" if allowed else f.name.upper(),
                            help=text + suffix)


def check_config(cfg) -> None:
    """The same checks as the flags', for a config built in Python (train.train(TrainConfig(...)))."""
    choices, limits = getattr(cfg, "CHOICES", {}), getattr(cfg, "LIMITS", {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        problem = check_value(f.name, value, *limits.get(f.name, (None, None)), choices.get(f.name))
        if problem:
            raise UserError(f"--{f.name.replace('_', '-')}: {problem}")


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


class Parser(argparse.ArgumentParser):
    """argparse, with whole flag names only (--max-iter is not taken as --max-iters) and its errors as one line."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")


def parser_for(cls, doc: str | None, epilog: str | None = None) -> Parser:
    parser = Parser(description=doc, epilog=epilog)
    add_config_args(parser, cls)
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# Running a command line

def fail(message: str) -> None:
    """End the program on a user's mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's main: a user's mistake (UserError, a file that cannot be read or written) ends in one line and
    exit code 2, unless --debug asks for the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (UserError, OSError) as e:
        if "--debug" in argv:
            raise
        fail(str(e) if isinstance(e, UserError) else os_error_text(e))
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def os_error_text(e: OSError) -> str:
    name = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return f"{name}{e.strerror or e}"


# ----------------------------------------------------------------------------------------------------------------------
# Progress of the long phases

class Ticker:
    """Progress of a phase that may take a while: after `every` seconds, a line now and then with how far it is, how
    long it has taken and an ETA from the pace so far; a phase that ends sooner prints nothing."""

    def __init__(self, label: str, total: int, every: float = 5.0, log: Callable[[str], None] = print):
        self.label, self.total, self.every, self.log = label, total, every, log
        self.start = self.last = time.time()

    def __call__(self, done: int) -> None:
        now = time.time()
        if now - self.last >= self.every and 0 < done < self.total:
            self.last = now
            eta = (now - self.start) / done * (self.total - done)
            self.log(f"{self.label}: {done:,} of {self.total:,} ({now - self.start:.0f} s, ETA {eta:.0f} s)")


# ----------------------------------------------------------------------------------------------------------------------
# Checks shared by the scripts

def writable_file(path: str | os.PathLike, flag: str,
                  kind: tuple[str, Callable[[Path], bool]] | None = None) -> Path:
    """path, once its folder exists (made if need be) and a file can be created in it: checked before the work, so a
    bad --out is not found only when the result is ready to be written. kind: the name of what is written there and
    whether a file holds one (its owner's: weights.SAFETENSORS_FILE, data.PICTURE, ...); a file of something else
    already at path is the user's, and a typo must not replace it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable; choose another place")
    if kind and path.is_file() and path.stat().st_size and not kind[1](path):
        raise UserError(f"{flag} {path}: already holds something other than a {kind[0]}, which this would replace; "
                        f"give another file name")
    return path


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create this folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: not writable; choose another --out-dir")
    return path


def device(name: str, flag: str = "--device"):
    """A torch.device that exists here: 'auto' is CUDA when present, else the CPU."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"{flag} {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: this torch has no CUDA device here; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(name)
