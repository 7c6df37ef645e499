"""What every subcommand's arguments share: the parser class (one-line usage errors), argument
types, and the output options.

- :class:`Parser` prints argparse's own errors as one line, ``loopgraph: error: <command>:
  <problem>; see loopgraph <command> --help``, exit code 2 (argparse prints the whole usage
  block), and accepts negative ranges such as ``--range -5:`` as values.
- Types: :func:`int_arg`, :func:`seed_arg` (a non-negative integer), :func:`finite_float`.
- :func:`add_output_args` adds ``-o/--output`` and ``--force``: an existing file is only replaced
  with ``--force`` (checked by :func:`loopgraph.onnxio.check_output` before any work starts).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import NoReturn

PROG = "loopgraph"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors. Subparsers are made of the same class (argparse's
    ``add_subparsers`` uses ``type(self)``), so every subcommand gets it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes "-5:" for an option (it only knows "-5" and "-.5" as negative numbers), so
        # "--range -5:" failed with "expected one argument": let a negative slice pass as a value too.
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d*:-?\d*$")

    def error(self, message: str) -> NoReturn:
        command = self.prog[len(PROG):].strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"{PROG}: error: {where}{message}; see {self.prog} --help\n")


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def seed_arg(text: str) -> int:
    """A random seed: numpy's generators take non-negative integers only."""
    value = int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is a non-negative integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is a number: inf and nan are refused (they pass range checks such as K >= 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_output_args(p: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """``-o/--output`` and ``--force`` (replace an existing output)."""
    p.add_argument("-o", "--output", required=required, help=help)
    add_force_arg(p)


def add_force_arg(p: argparse.ArgumentParser, what: str = "output file") -> None:
    p.add_argument("--force", action="store_true", help=f"replace an existing {what} (refused without it)")
