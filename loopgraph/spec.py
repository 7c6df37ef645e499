"""The rewrite spec: one small value object shared by the CLI, the API, the passes and the
PyTorch reference, and recorded in the rewritten file's metadata.

Notation (DESIGN §1): ``x0`` enters block ``start``; ``y_t = B(x_{t-1})`` applies blocks
``[start, end)`` for the t-th time (t = 1..N); ``r = y_1`` is the non-looped output; ``x_t``
is fed to the next application (or to block ``end`` after t = N). Always ``x_1 = y_1 = r``.

Regularizers, x_t for t >= 2 (defined once in :mod:`loopgraph.regularizers`):

=============  ==============================================================
``naive``      ``y_t``
``uniform``    ``(1/t) * sum_{i<=t} y_i``  (running mean)
``ema``        ``alpha * y_t + (1 - alpha) * x_{t-1}``
``anchor``     ``alpha * y_t + (1 - alpha) * r``
``auto-align`` ``sum_i w_i y_i / sum_i w_i``, ``w_i = max(0, cos(y_i, r))`` per token over
               the hidden axis; ``w_1 = 1`` exactly (cos(r, r) = 1)
``damped``     ``(1 - 1/K) * x_{t-1} + (1/K) * y_t``
=============  ==============================================================

N = 1 reproduces the original model bit-exactly for every regularizer.

Noise control (``noise_seed``): the looped output x_N is replaced by ``r + e * |x_N - r| / |e|``
per token, a perturbation of the same size as looping's shift in a direction unrelated to it.
``e = sin(r W)`` with ``W ~ N(0, 1)`` (hidden x hidden, drawn from the seed): pseudo-random per
token, yet a function of the token's own state, so results do not depend on batching or padding
and are reproducible. With N = 1 the shift is 0 and the model is the original one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from loopgraph.errors import LoopgraphError
from loopgraph.regularizers import ALL, regularizer

#: regularizer name -> the parameter it takes (None, "alpha" or "k"), from their definitions
REGULARIZERS: dict[str, str | None] = {r.name: r.param for r in ALL}
#: with-past exports: ``exact`` one ordinary cache pair per virtual layer (the standard layout, what
#: stock drivers run); ``stacked`` rank-5 per-iteration caches (the one that allows ``dynamic``);
#: ``first``/``last`` one cache per block, an approximation (see :mod:`loopgraph.passes.kv`)
KV_MODES = ("exact", "stacked", "first", "last")
HALT_METRICS = ("rel", "cos")  # per-token change of x_t: |x_t - x_{t-1}| / |x_{t-1}|, or 1 - cos(x_t, x_{t-1})
HALT_KV = ("live", "held")  # a frozen token's K/V in later iterations: recomputed from its frozen state, or held from its last one
MAX_ITERS = 64

_RANGE_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*$")


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What to loop and how. ``start``/``end`` follow Python slice rules until
    :meth:`resolve` turns them into absolute block indices for a model of known depth."""

    start: int | None
    end: int | None
    iters: int = 3
    reg: str = "uniform"
    alpha: float | None = None
    k: float | None = None
    kv: str = "exact"
    dynamic: bool = False
    noise_seed: int | None = None  # noise control: replace x_N by r + noise of norm |x_N - r|
    trace: bool = False  # expose y_t and x_t of every iteration as Loop scan outputs
    unroll: bool = False  # N straight-line copies of the range instead of a Loop
    halt: float | None = None  # per-token halting: freeze a token once its change is <= halt (docs/halting.md)
    halt_metric: str = "rel"  # how the change is measured: "rel" or "cos"
    halt_kv: str = "live"  # what a frozen token's K/V are in later iterations: "live" (recomputed) or "held" (docs/halting.md)

    def __post_init__(self) -> None:
        reg = regularizer(self.reg)  # refuses an unknown name
        if self.noise_seed is not None and (isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)):
            raise LoopgraphError(f"noise seed must be an integer, got {self.noise_seed!r}")
        if self.noise_seed is not None and self.noise_seed < 0:
            raise LoopgraphError(f"--noise-control {self.noise_seed}: a seed is a non-negative integer")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int):
            raise LoopgraphError(f"--iters must be an integer, got {self.iters!r}")
        if not 1 <= self.iters <= MAX_ITERS:
            raise LoopgraphError(f"--iters {self.iters} is out of range; use 1..{MAX_ITERS}")
        if self.kv not in KV_MODES:
            raise LoopgraphError(f"unknown --kv mode {self.kv!r}; choose one of {', '.join(KV_MODES)}")
        self._check_halt()
        param = reg.param
        if param == "alpha":
            if self.alpha is None:
                object.__setattr__(self, "alpha", reg.default)
            if not 0.0 < self.alpha <= 1.0:  # (nan fails this too)
                raise LoopgraphError(f"--alpha {self.alpha} is outside (0, 1]; pick e.g. 0.5")
        elif self.alpha is not None:
            raise LoopgraphError(f"--alpha applies to ema and anchor, not to {self.reg}; drop it")
        if param == "k":
            if self.k is None:
                object.__setattr__(self, "k", reg.default)
            if not 1.0 <= self.k < float("inf"):  # inf: a step of 0, the loop would do nothing
                raise LoopgraphError(f"--k {self.k} must be >= 1 (1/K is the step size); pick e.g. 2")
        elif self.k is not None:
            raise LoopgraphError(f"--k applies to damped, not to {self.reg}; drop it")

    def _check_halt(self) -> None:
        """``halt`` is a finite number >= 0; ``halt_metric`` is one of :data:`HALT_METRICS` and needs ``halt``."""
        if self.halt_metric not in HALT_METRICS:
            raise LoopgraphError(f"unknown --halt-metric {self.halt_metric!r}; choose one of {', '.join(HALT_METRICS)}")
        if self.halt_kv not in HALT_KV:
            raise LoopgraphError(f"unknown --halt-kv {self.halt_kv!r}; choose one of {', '.join(HALT_KV)}")
        if self.halt is None:
            if self.halt_metric != "rel":
                raise LoopgraphError("--halt-metric needs --halt TOL (the tolerance it is compared with); add e.g. --halt 0.01")
            if self.halt_kv != "live":
                raise LoopgraphError("--halt-kv needs --halt TOL (it says what frozen tokens contribute); add e.g. --halt 0.01")
            return
        if self.halt_kv == "held" and self.unroll:
            raise LoopgraphError("--halt-kv held is a Loop form (each iteration runs only the moving tokens); drop --unroll")
        if isinstance(self.halt, bool) or not isinstance(self.halt, (int, float)) or not math.isfinite(self.halt) or self.halt < 0:
            raise LoopgraphError(f"--halt {self.halt!r} must be a finite number >= 0 (0 freezes only unchanged tokens); pick e.g. 0.01")
        object.__setattr__(self, "halt", float(self.halt))

    @property
    def weight(self) -> float | None:
        """The interpolation weight of the new state for t >= 2 (alpha, or 1/K), if any."""
        if self.alpha is not None:
            return self.alpha
        if self.k is not None:
            return 1.0 / self.k
        return None

    def resolve(self, num_blocks: int, how: str = "") -> LoopSpec:
        """Return the spec with absolute ``start``/``end`` for a model of ``num_blocks`` blocks,
        or raise a one-line error that shows the blocks the model has."""
        start, end, step = slice(self.start, self.end).indices(num_blocks)
        given = f"{'' if self.start is None else self.start}:{'' if self.end is None else self.end}"
        found = f" (found by {how})" if how else ""
        for v in (self.start, self.end):
            if v is not None and not -num_blocks <= v <= num_blocks:
                raise LoopgraphError(
                    f"--range {given} but the model has blocks 0..{num_blocks - 1}{found}; "
                    f"try --range 0:{num_blocks}"
                )
        if start >= end:
            raise LoopgraphError(
                f"--range {given} is empty for a model with blocks 0..{num_blocks - 1}{found}; "
                f"the end must be after the start, e.g. --range 0:{num_blocks}"
            )
        return dataclasses.replace(self, start=start, end=end)

    @property
    def range_str(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.end is None else self.end}"

    def slug(self) -> str:
        """A file-name fragment such as ``loop10-20x3-uniform`` (``-a0.5``, ``-k2`` ...)."""
        s = f"loop{self.start}-{self.end}x{self.iters}-{self.reg}"
        if self.alpha is not None:
            s += f"-a{self.alpha:g}"
        if self.k is not None:
            s += f"-k{self.k:g}"
        if self.dynamic:
            s += "-dyn"
        if self.noise_seed is not None:
            s += f"-noise{self.noise_seed}"
        if self.trace:
            s += "-trace"
        if self.unroll:
            s += "-unrolled"
        if self.halt is not None:
            s += f"-halt{self.halt:g}" + ("" if self.halt_metric == "rel" else f"-{self.halt_metric}")
            s += "" if self.halt_kv == "live" else f"-{self.halt_kv}"
        return s

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if self.halt is None:  # files without halting keep the spec they had before halting existed
            del data["halt"], data["halt_metric"]
        if self.halt_kv == "live":  # and files with live halting keep the spec they had before held K/V existed
            del data["halt_kv"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoopSpec:
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, expected an object")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def parse_range(text: str) -> tuple[int | None, int | None]:
    """``"6:12"`` -> (6, 12); ``"6:"`` -> (6, None); ``":-2"`` -> (None, -2)."""
    m = _RANGE_RE.match(text or "")
    if not m:
        raise LoopgraphError(
            f"--range {text!r} is not of the form S:E (0-based, end exclusive), e.g. --range 6:12"
        )
    start, end = (None if g is None else int(g) for g in m.groups())
    return start, end
