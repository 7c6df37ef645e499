"""Argument types and option groups shared by the subcommand modules: each flag is declared once,
here (argparse reports the types' errors as usage errors). Light imports only (argparse and
:mod:`loopgraph.spec`), so ``loopgraph --help`` stays instant.

- :func:`add_spec_args`: the loop a command builds (``--range``, ``--iters``, ``--reg``,
  ``--alpha``, ``--k``), used by ``rewrite`` and ``trace``;
- :func:`add_form_args`: how the rewrite writes it (``--kv``, ``--dynamic``, ``--noise-control``,
  ``--unroll``, ``--trace``), ``rewrite`` only;
- :func:`spec_from_args`: the :class:`~loopgraph.spec.LoopSpec` from either.

The runtime group (``--device`` as a checked choice, ``--threads``, ...) is
:func:`loopgraph.runtime.session.add_runtime_args`, beside the devices it checks.
"""

from __future__ import annotations

import argparse

from loopgraph.spec import KV_MODES, MAX_ITERS, REGULARIZERS, LoopSpec, parse_range

#: LoopSpec field -> the dest of the add_form_args flag that sets it
_FORM_FLAGS = {"kv": "kv", "dynamic": "dynamic", "noise_seed": "noise_control", "trace": "trace", "unroll": "unroll"}


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_spec_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``loop`` option group: which blocks, how often, which regularizer and its weight."""
    g = parser.add_argument_group("loop")
    g.add_argument("--range", required=True, help="S:E, 0-based, end exclusive, Python slice rules (e.g. 10:20, -5:, :8)")
    g.add_argument("--iters", "-n", type=int_arg, default=3, help=f"N, applications of the range (1..{MAX_ITERS}, default 3)")
    g.add_argument("--reg", default="uniform", choices=list(REGULARIZERS), help="regularizer (default uniform)")
    g.add_argument("--alpha", type=float, help="weight of the new state for ema and anchor (0 < alpha <= 1, default 0.5)")
    g.add_argument("--k", type=float, help="K of damped (step 1/K, K >= 1, default 2)")
    return g


def add_form_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``graph form`` option group of ``rewrite``: KV scheme, dynamic N, noise control, unroll, trace outputs."""
    g = parser.add_argument_group("graph form")
    g.add_argument("--kv", default="exact", choices=list(KV_MODES),
                   help="KV cache of with-past exports: exact (default; one ordinary pair per virtual layer, runs under Optimum and "
                        "onnxruntime-genai), stacked (rank-5 per-iteration caches; the one --dynamic allows), first/last (approximations)")
    g.add_argument("--dynamic", action="store_true", help="make N (and alpha/K) graph inputs with the given values as defaults")
    g.add_argument("--noise-control", type=int_arg, metavar="SEED",
                   help="control variant: replace the loop's shift by pseudo-random noise of the same per-token norm")
    g.add_argument("--unroll", action="store_true", help="N straight-line copies of the range (same weights) instead of a Loop")
    g.add_argument("--trace", action="store_true", help="also output y_t and x_t of every iteration (loopgraph/trace/y, .../x)")
    return g


def spec_from_args(args: argparse.Namespace) -> LoopSpec:
    """The LoopSpec of :func:`add_spec_args`' flags, with :func:`add_form_args`' flags where the
    command has them (LoopSpec's defaults where it does not)."""
    start, end = parse_range(args.range)
    form = {field: getattr(args, dest) for field, dest in _FORM_FLAGS.items() if hasattr(args, dest)}
    return LoopSpec(start, end, iters=args.iters, reg=args.reg, alpha=args.alpha, k=args.k, **form)
