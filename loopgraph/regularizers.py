"""The regularizers: one definition each, read by the spec, the passes, the reference and ``view``.

Notation (DESIGN §1): ``y_t = B(x_{t-1})`` is the t-th application of the range, ``r = y_1`` the
non-looped output, ``x_t`` what the next application (or block ``end``) reads; always
``x_1 = y_1 = r``. A :class:`Regularizer` says what ``x_t`` is for t >= 2 (``formula``), which
parameter it takes, and which tensors a Loop must carry besides ``x`` to compute it.

Two independent implementations follow these formulas: the ONNX nodes
(:mod:`loopgraph.passes.regularize`, running updates written so that N = 1 is bit-exact) and the
PyTorch reference (:mod:`loopgraph.reference.looped`, sums over all ``y_i``) that verifies them.
They are kept apart on purpose (a shared implementation would check itself); each looks its
update up by the entry below, and a test fails when either lacks one. This module imports
neither torch nor onnx.
"""

from __future__ import annotations

import dataclasses

from loopgraph.errors import LoopgraphError


@dataclasses.dataclass(frozen=True)
class Regularizer:
    name: str  # as in --reg
    param: str | None  # the parameter it takes: "alpha", "k" or None
    formula: str  # x_t for t >= 2, plain text (a = alpha, K = k)
    carries: tuple[str, ...] = ()  # loop-carried states besides x: "r" = y_1, running sums

    @property
    def default(self) -> float | None:
        """The parameter's value when none is given."""
        return {"alpha": 0.5, "k": 2.0}.get(self.param or "")


#: every regularizer, in the order the CLI lists them
ALL: tuple[Regularizer, ...] = (
    Regularizer("naive", None, "x_t = y_t"),
    Regularizer("uniform", None, "x_t = (1/t) · Σ_{i≤t} y_i"),
    Regularizer("ema", "alpha", "x_t = α·y_t + (1−α)·x_{t−1}"),
    Regularizer("anchor", "alpha", "x_t = α·y_t + (1−α)·r", carries=("r",)),
    Regularizer("auto-align", None, "x_t = Σ w_i·y_i / Σ w_i\nw_i = max(0, cos(y_i, r))",
                carries=("r", "wsum_y", "wsum")),
    Regularizer("damped", "k", "x_t = (1−1/K)·x_{t−1} + (1/K)·y_t"),
)
BY_NAME: dict[str, Regularizer] = {r.name: r for r in ALL}

#: floor of |y|·|r| in the cosine of auto-align (the graph and the reference both use it)
COS_EPS = 1e-8


def regularizer(name: str) -> Regularizer:
    """The definition named ``name``, or a user error listing the names."""
    if name not in BY_NAME:
        raise LoopgraphError(f"unknown regularizer {name!r}; choose one of {', '.join(BY_NAME)}")
    return BY_NAME[name]
