"""Compare the outputs of two runs, Polygraphy-style: per output, how far apart and where, against
explicit tolerances, with the provider that produced the outputs under test.

Relative errors are taken against the reference's scale, ``max |b|`` of the compared elements, not
element by element: logits cross zero, and an element-wise ratio there says nothing. The bound
is ``atol + rtol * max |b|``; an output is ok when its largest absolute error is within it.

Handled: any outputs of the same shape in both runs; ``valid``, a boolean mask over the leading
axes (e.g. the attention mask [batch, seq] for logits [batch, seq, vocab]) that limits the
comparison to real positions. Refused (:class:`LoopgraphError`): outputs missing from one run,
shapes that differ, a ``valid`` mask that does not fit an output's leading axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from loopgraph.errors import LoopgraphError


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """One output: ``a`` (under test) against ``b`` (the reference)."""
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float  # max_abs / max|b|
    mean_rel: float  # mean_abs / max|b|
    worst: tuple[int, ...] | None  # index (in the full output) of the largest |a - b|; None when nothing is compared
    a_worst: float  # a and b at ``worst``
    b_worst: float
    scale: float  # max|b| of the compared elements
    bound: float  # atol + rtol * scale
    count: int  # elements compared

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.bound


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every compared output, the provider of the run under test and the tolerances."""
    outputs: dict[str, OutputComparison]
    provider: str
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs.values())

    def __getitem__(self, name: str) -> OutputComparison:
        return self.outputs[name]


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, atol: float, rtol: float, provider: str,
            valid: np.ndarray | None = None) -> Comparison:
    """Compare every output of ``b`` (the reference) with the same-named output of ``a``."""
    if atol < 0 or rtol < 0:
        raise LoopgraphError(f"tolerances must be >= 0 (atol {atol}, rtol {rtol})")
    missing = [name for name in b if name not in a]
    if missing:
        raise LoopgraphError(f"the run under test has no output {', '.join(missing)} (it has {', '.join(a) or 'none'})")
    return Comparison({name: _compare_one(name, np.asarray(a[name]), np.asarray(b[name]), atol, rtol, valid) for name in b},
                      provider, atol, rtol)


def _compare_one(name: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float, valid: np.ndarray | None) -> OutputComparison:
    if a.shape != b.shape:
        raise LoopgraphError(f"output {name} has shape {list(a.shape)} in the run under test but {list(b.shape)} in the reference")
    keep = np.ones((), bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != a.shape[:keep.ndim]:
        raise LoopgraphError(f"the valid mask {list(keep.shape)} does not fit the leading axes of output {name} {list(a.shape)}")
    sel_a, sel_b = a[keep], b[keep]  # [k, *rest]: the kept leading positions, in order
    if sel_a.size == 0:
        return OutputComparison(name, 0.0, 0.0, 0.0, 0.0, None, float("nan"), float("nan"), 0.0, atol, 0)
    if not (np.issubdtype(sel_a.dtype, np.floating) and np.issubdtype(sel_b.dtype, np.floating)):
        sel_a, sel_b = sel_a.astype(np.float64), sel_b.astype(np.float64)  # ints would wrap, bools cannot subtract
    # otherwise the difference in the outputs' own precision: float32 logits compare as the float32 values they are
    diff = np.abs(sel_a - sel_b).reshape(len(sel_a), -1)
    ref = np.abs(sel_b)
    where = np.argwhere(keep)  # the full-output leading index of each kept row
    scale = float(ref.max())
    flat = int(diff.argmax())
    row, rest = divmod(flat, diff.shape[1])
    worst = tuple(int(i) for i in where[row]) + tuple(int(i) for i in np.unravel_index(rest, a.shape[keep.ndim:]))
    max_abs, mean_abs = float(diff.max()), float(diff.mean(dtype=np.float64))
    return OutputComparison(name, max_abs, mean_abs, max_abs / scale if scale else 0.0, mean_abs / scale if scale else 0.0,
                            worst, float(a[worst]), float(b[worst]), scale, atol + rtol * scale, diff.size)
