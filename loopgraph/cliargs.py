"""What every subcommand's arguments share: the parser class, argument types and option groups.
Each flag is declared once, here (argparse reports the types' errors as usage errors). Light
imports only (argparse and :mod:`loopgraph.spec`), so ``loopgraph --help`` stays instant.

- :class:`Parser` prints argparse's own errors as one line, ``loopgraph: error: <command>:
  <problem>; see loopgraph <command> --help``, exit code 2 (argparse prints the whole usage
  block), and accepts negative ranges such as ``--range -5:`` as values.
- Types: :func:`int_arg`, :func:`seed_arg` (a non-negative integer), :func:`finite_float`.
- :func:`add_spec_args`: the loop a command builds (``--range``, ``--iters``, ``--reg``,
  ``--alpha``, ``--k``), used by ``rewrite`` and ``trace``;
- :func:`add_form_args`: how the rewrite writes it (``--kv``, ``--dynamic``, ``--noise-control``,
  ``--unroll``, ``--trace``), ``rewrite`` only;
- :func:`spec_from_args`: the :class:`~loopgraph.spec.LoopSpec` from either.
- :func:`add_output_args` adds ``-o/--output`` and ``--force``: an existing file is only replaced
  with ``--force`` (checked by :func:`loopgraph.onnxio.check_output` before any work starts).

The runtime group (``--device`` as a checked choice, ``--threads``, ...) is
:func:`loopgraph.runtime.session.add_runtime_args`, beside the devices it checks.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import NoReturn

from loopgraph.spec import HALT_KV, HALT_METRICS, KV_MODES, MAX_ITERS, REGULARIZERS, LoopSpec, parse_range

PROG = "loopgraph"
#: LoopSpec field -> the dest of the add_form_args flag that sets it
_FORM_FLAGS = {"kv": "kv", "dynamic": "dynamic", "noise_seed": "noise_control", "trace": "trace", "unroll": "unroll"}


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


def add_halt_search_args(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--halt TOLS`` and ``--halt-metric`` of ``sweep`` and ``tune``: halting cells beside the plain ones."""
    parser.add_argument("--halt", metavar="TOLS", help=f"also {verb} per-token halting: comma-separated tolerances, none = the plain "
                                                       "loop, e.g. none,0.2 (cells with N >= 3; docs/halting.md, the live rule)")
    parser.add_argument("--halt-metric", default="rel", choices=list(HALT_METRICS), help="how --halt measures a token's change (default rel)")


def add_spec_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``loop`` option group: which blocks, how often, which regularizer and its weight."""
    g = parser.add_argument_group("loop")
    g.add_argument("--range", required=True, help="S:E, 0-based, end exclusive, Python slice rules (e.g. 10:20, -5:, :8)")
    g.add_argument("--iters", "-n", type=int_arg, default=3, help=f"N, applications of the range (1..{MAX_ITERS}, default 3)")
    g.add_argument("--reg", default="uniform", choices=list(REGULARIZERS), help="regularizer (default uniform)")
    g.add_argument("--alpha", type=finite_float, help="weight of the new state for ema and anchor (0 < alpha <= 1, default 0.5)")
    g.add_argument("--k", type=finite_float, help="K of damped (step 1/K, K >= 1, default 2)")
    g.add_argument("--halt", type=finite_float, metavar="TOL",
                   help="per-token halting: freeze a token once its change after an iteration t >= 2 is <= TOL; "
                        "--iters is then the most iterations (docs/halting.md)")
    g.add_argument("--halt-metric", choices=list(HALT_METRICS),
                   help="the change: rel = |x_t - x_{t-1}| / |x_{t-1}| (default), cos = 1 - cos(x_t, x_{t-1})")
    g.add_argument("--halt-kv", choices=list(HALT_KV),
                   help="what later tokens attend to at a frozen token: live = K/V recomputed from its frozen state every iteration "
                        "(default; cost follows the slowest token of a row), held = its K/V of the iteration it froze "
                        "(an iteration computes only the moving tokens)")
    return g


def add_form_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``graph form`` option group of ``rewrite``: KV scheme, dynamic N, noise control, unroll, trace outputs."""
    g = parser.add_argument_group("graph form")
    g.add_argument("--kv", choices=list(KV_MODES),
                   help="KV cache of with-past exports: exact (default; one ordinary pair per virtual layer, runs under Optimum and "
                        "onnxruntime-genai), stacked (rank-5 per-iteration caches; the one --dynamic allows), first/last (approximations); "
                        "refused for an export without a cache")
    g.add_argument("--dynamic", action="store_true", help="make N (and alpha/K) graph inputs with the given values as defaults")
    g.add_argument("--noise-control", type=seed_arg, metavar="SEED",
                   help="control variant: replace the loop's shift by pseudo-random noise of the same per-token norm")
    g.add_argument("--unroll", action="store_true", help="N straight-line copies of the range (same weights) instead of a Loop")
    g.add_argument("--trace", action="store_true", help="also output y_t and x_t of every iteration (loopgraph/trace/y, .../x)")
    return g


def spec_from_args(args: argparse.Namespace) -> LoopSpec:
    """The LoopSpec of :func:`add_spec_args`' flags, with :func:`add_form_args`' flags where the
    command has them (LoopSpec's defaults where it does not)."""
    start, end = parse_range(args.range)
    # (a flag left unset, such as --kv, keeps LoopSpec's default)
    form = {field: getattr(args, dest) for field, dest in _FORM_FLAGS.items() if getattr(args, dest, None) is not None}
    return LoopSpec(start, end, iters=args.iters, reg=args.reg, alpha=args.alpha, k=args.k, **form,
                    halt=args.halt, halt_metric=args.halt_metric or "rel", halt_kv=args.halt_kv or "live")
