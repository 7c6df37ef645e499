"""The cells of a sweep: every (block range, N, regularizer) to score, and how they group into
units of work that share one ``--dynamic`` rewrite.

A regularizer changes the graph's structure, N and its weight (alpha or K) do not: with
``dynamic=True`` they are graph inputs (``loopgraph/iters``, ``loopgraph/alpha``/``loopgraph/k``).
So a :class:`Unit` is one (range, regularizer): one rewrite and one ORT session score all its
cells, each fed its own N and weight.

Grammar (the ``sweep`` options):

- ``--ranges all``: every ``S:E`` with ``0 <= S < E <= L``; ``width=K``: every ``S:S+K``;
  ``S:E,S:E,...``: the ranges given (Python slice rules, as ``--range``). ``stride=D`` (for
  ``all`` and ``width=K`` only) keeps starts that are multiples of D and, for ``all``, ends that
  are multiples of D or L.
- ``--iters 1,2,3``: N values, 1..64.
- ``--reg uniform,naive,anchor:0.3,damped:4``: regularizers, with an optional weight (alpha for
  ema/anchor, K for damped); without one the regularizer's default is used.

Refused (one-line errors): empty or malformed lists, a width outside 1..L, a stride below 1, a
range outside the model's blocks, a weight on a regularizer that takes none, duplicates.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from loopgraph.errors import LoopgraphError
from loopgraph.spec import MAX_ITERS, REGULARIZERS, LoopSpec, parse_range

_WIDTH_RE = re.compile(r"^width=(\d+)$")


@dataclasses.dataclass(frozen=True)
class Reg:
    """A regularizer with its weight (``alpha`` for ema/anchor, ``k`` for damped, else None) and,
    optionally, per-token halting (``halt`` = TOL with ``halt_metric``; docs/halting.md, the live rule)."""
    name: str
    weight: float | None = None
    halt: float | None = None
    halt_metric: str = "rel"

    def __lt__(self, other: Reg) -> bool:  # None sorts first (a plain loop before its halting variants)
        return self._order() < other._order()

    def _order(self) -> tuple:
        w, h = self.weight, self.halt
        return (self.name, w is not None, w or 0.0, h is not None, self.halt_metric, h or 0.0)

    @property
    def label(self) -> str:
        label = self.name if self.weight is None else f"{self.name}:{self.weight:g}"
        if self.halt is not None:
            label += f"+halt{'' if self.halt_metric == 'rel' else '-' + self.halt_metric}:{self.halt:g}"
        return label

    @property
    def plain(self) -> Reg:
        """The same regularizer without halting."""
        return dataclasses.replace(self, halt=None, halt_metric="rel")

    def spec(self, start: int, end: int, iters: int, dynamic: bool = True) -> LoopSpec:
        param = REGULARIZERS[self.name]
        return LoopSpec(start, end, iters=iters, reg=self.name, dynamic=dynamic,
                        alpha=self.weight if param == "alpha" else None, k=self.weight if param == "k" else None,
                        halt=self.halt, halt_metric=self.halt_metric)


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    """One point of the sweep: blocks ``[start, end)`` applied ``iters`` times with ``reg``."""
    start: int
    end: int
    iters: int
    reg: Reg

    def key(self, *extra) -> list:
        """What a cache key hashes: the cell, ``extra`` (a noise seed, ...), then the halting rule, which
        a plain cell leaves out so its keys are what they were before halting existed."""
        halting = [] if self.reg.halt is None else ["halt", self.reg.halt, self.reg.halt_metric]
        return [self.start, self.end, self.reg.name, self.reg.weight, self.iters, *extra, *halting]

    @property
    def unit_key(self) -> tuple:
        return (self.start, self.end, self.reg.name, self.reg.halt, self.reg.halt_metric)


@dataclasses.dataclass(frozen=True)
class Unit:
    """Cells sharing one rewrite: same range, regularizer and halting rule, any N and weight."""
    start: int
    end: int
    reg: str
    cells: tuple[Cell, ...]

    def spec(self) -> LoopSpec:
        """The ``dynamic`` rewrite serving every cell (the largest N and the first cell's weight as defaults)."""
        return self.cells[0].reg.spec(self.start, self.end, max(c.iters for c in self.cells))


def parse_ranges(text: str, num_blocks: int, stride: int = 1) -> list[tuple[int, int]]:
    """``all``, ``width=K`` or ``S:E,...`` -> sorted absolute (start, end) pairs for ``num_blocks`` blocks."""
    text = (text or "").strip()
    if stride < 1:
        raise LoopgraphError(f"stride={stride} must be at least 1, e.g. --ranges all --stride 3")
    if text == "all":
        ranges = [(s, e) for s in range(0, num_blocks, stride) for e in range(s + 1, num_blocks + 1)
                  if e % stride == 0 or e == num_blocks]
    elif m := _WIDTH_RE.match(text):
        width = int(m[1])
        if not 1 <= width <= num_blocks:
            raise LoopgraphError(f"--ranges width={width} but the model has {num_blocks} blocks; use width=1..{num_blocks}")
        ranges = [(s, s + width) for s in range(0, num_blocks - width + 1, stride)]
    else:
        if stride != 1:
            raise LoopgraphError("--stride applies to --ranges all and width=K, not to a list of ranges; drop --stride")
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise LoopgraphError("--ranges is empty; give all, width=K or a list such as 6:12,10:20")
        ranges = []
        for p in parts:
            spec = LoopSpec(*parse_range(p), iters=1).resolve(num_blocks)
            ranges.append((spec.start, spec.end))
        if len(set(ranges)) < len(ranges):
            raise LoopgraphError(f"--ranges {text} lists a range twice; give each range once")
    return sorted(ranges)


def parse_iters(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3] (sorted, each in 1..64)."""
    try:
        values = [int(p) for p in (text or "").split(",") if p.strip()]
    except ValueError:
        raise LoopgraphError(f"--iters {text!r} is not a comma-separated list of integers, e.g. --iters 2,3") from None
    if not values:
        raise LoopgraphError("--iters is empty; give N values such as --iters 2,3")
    bad = [v for v in values if not 1 <= v <= MAX_ITERS]
    if bad:
        raise LoopgraphError(f"--iters {bad[0]} is out of range; use 1..{MAX_ITERS}")
    if len(set(values)) < len(values):
        raise LoopgraphError(f"--iters {text} lists a value twice; give each N once")
    return sorted(values)


def parse_regs(text: str) -> list[Reg]:
    """``"uniform,anchor:0.3"`` -> regularizers with weights (validated as :class:`LoopSpec` does)."""
    regs = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, _, value = part.partition(":")
        if name not in REGULARIZERS:
            raise LoopgraphError(f"--reg {name!r} is not a regularizer; choose from {', '.join(REGULARIZERS)}")
        weight = None
        if value:
            if REGULARIZERS[name] is None:
                raise LoopgraphError(f"--reg {part}: {name} takes no weight; write {name}")
            try:
                weight = float(value)
            except ValueError:
                raise LoopgraphError(f"--reg {part}: {value!r} is not a number; write e.g. {name}:0.5") from None
        reg = Reg(name, weight)
        default = reg.spec(0, 1, 1)  # validates the weight and fills the default
        regs.append(Reg(name, default.alpha if default.alpha is not None else default.k))
    if not regs:
        raise LoopgraphError(f"--reg is empty; give regularizers such as uniform,naive (from {', '.join(REGULARIZERS)})")
    if len(set(regs)) < len(regs):
        raise LoopgraphError(f"--reg {text} lists a regularizer twice; give each once")
    return regs


def parse_halts(text: str | None, metric: str = "rel") -> list[float | None]:
    """``"none,0.1,0.24"`` -> [None, 0.1, 0.24]: halting tolerances (``none``: the plain loop), validated as :class:`LoopSpec` does."""
    if text is None:
        if metric != "rel":
            raise LoopgraphError("--halt-metric needs --halt TOL (the tolerance it is compared with); add e.g. --halt 0.2")
        return [None]
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "none":
            out.append(None)
            continue
        try:
            tol = float(part)
        except ValueError:
            raise LoopgraphError(f"--halt {part!r} is not a number; write tolerances such as --halt none,0.2") from None
        out.append(LoopSpec(0, 1, iters=3, halt=tol, halt_metric=metric).halt)  # validates: finite, >= 0
    if not out:
        raise LoopgraphError("--halt is empty; give tolerances such as --halt 0.2 (none: the plain loop)")
    if len(set(out)) < len(out):
        raise LoopgraphError(f"--halt {text} lists a value twice; give each once")
    return out


def make_cells(ranges: Sequence[tuple[int, int]], iters: Sequence[int], regs: Sequence[Reg],
               halts: Sequence[float | None] = (None,), halt_metric: str = "rel") -> list[Cell]:
    """Every (range, N, regularizer, halting) cell. Halting with N <= 2 is the plain loop (a token
    can freeze only after t = 2, the last iteration), so those cells are the plain ones, once."""
    out = set()
    for s, e in ranges:
        for n in iters:
            for r in regs:
                for h in halts:
                    out.add(Cell(s, e, n, r if h is None or n <= 2 else dataclasses.replace(r, halt=h, halt_metric=halt_metric)))
    return sorted(out)


def group_units(cells: Sequence[Cell]) -> list[Unit]:
    """Group cells by (range, regularizer name), in a stable order."""
    groups: dict[tuple, list[Cell]] = {}
    for c in sorted(cells):
        groups.setdefault(c.unit_key, []).append(c)
    return [Unit(key[0], key[1], key[2], tuple(cs)) for key, cs in groups.items()]


def format_duration(seconds: float) -> str:
    """An estimate as a person reads it: seconds, minutes or hours (hours to 0.01 h)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
