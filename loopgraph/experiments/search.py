"""The search of ``loopgraph tune``: successive halving on a continuous paired signal.

**Signal.** For each item, the probability the model gives the gold option among the item's
options: ``p = softmax(lls)[gold]`` over the same per-option scores the metric takes the argmax
of (log-likelihoods for ``acc``; divided by the option's length in characters for ``acc_norm``).
For two options this is ``sigmoid(margin)``, the gold log-likelihood margin squashed into
(0, 1), so one very confident item cannot outweigh the others, and the item's 0/1 accuracy is
``p > 1/2`` (for two options). A cell is scored by the **paired** mean ``mean_i(p_cell,i -
p_base,i)`` over the items it has seen; the paired difference cancels how hard each item is,
which is most of the variance, and it moves with every small change of the model, where
accuracy moves only on the few items near the decision boundary.

**Schedule** (:func:`schedule`): round 0 scores every cell on the first ``n0`` items of the
tuning split (in a seeded random order); each later round keeps the best ``1/eta`` of the cells
by the signal (never fewer than ``keep``) and scores them on ``eta`` times as many items, the
earlier items reused. The last round scores its survivors on every tuning item. The schedule is
fixed by (cells, items, n0, eta, keep), so ``--dry-run`` knows the work in advance and a resumed
run asks for exactly the same (cell, item) pairs.

**Finalists** (:func:`finalists`): among the cells scored on every tuning item, the best ``k``
by accuracy delta on the tuning split, ties broken by the signal.

What it guarantees and what it can miss (also in docs/tune.md): every cell is scored on the
same first ``n0`` items, and a cell is dropped only when at least ``(1 - 1/eta)`` of the cells
still in the race score better on the same items; a cell whose gain shows only on items after
the ones it saw, or whose gain in accuracy is not reflected in the probability of the gold
option (possible when it fixes items by tiny margins while lowering confident ones), can be
dropped early. Cells that were dropped are reported with the items they got.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence

import numpy as np


def gold_probability(values: Sequence[float], gold: int) -> float:
    """softmax(values)[gold] in float64 (``values``: the option scores the metric compares)."""
    v = np.asarray(values, np.float64)
    z = np.exp(v - v.max())
    return float(z[gold] / z.sum())


@dataclasses.dataclass(frozen=True)
class Round:
    items: int  # the round scores its cells on the first ``items`` tuning items
    cells: int  # how many cells race in this round


def schedule(cells: int, items: int, n0: int, eta: int, keep: int) -> list[Round]:
    """Rounds of successive halving: ``n0``, ``n0 * eta``, ... items (capped at ``items``), the
    cells divided by ``eta`` each round, never below ``keep`` (nor above what there is)."""
    if cells < 1 or items < 1:
        return []
    rounds = [Round(min(items, n0), cells)]
    while rounds[-1].items < items:
        survivors = max(min(keep, rounds[-1].cells), math.ceil(rounds[-1].cells / eta))
        rounds.append(Round(min(items, rounds[-1].items * eta), survivors))
    return rounds


def pairs(rounds: Sequence[Round]) -> int:
    """(cell, item) pairs scored by a schedule (each item of a cell once)."""
    total, before = 0, 0
    for r in rounds:
        total += r.cells * (r.items - before)
        before = r.items
    return total


@dataclasses.dataclass
class Standing:
    """One cell in the race: the items it has seen, paired signal and accuracy vs the baseline."""
    key: Hashable
    items: int
    signal: float  # mean paired difference of gold probabilities
    signal_se: float  # its standard error (n - 1)
    delta: float  # accuracy delta on the same items
    dropped_after: int | None = None  # items seen when it left the race (None: still in / finalist)


def standing(key: Hashable, p_cell: np.ndarray, p_base: np.ndarray, acc_cell: np.ndarray, acc_base: np.ndarray) -> Standing:
    d = np.asarray(p_cell, np.float64) - np.asarray(p_base, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return Standing(key, len(d), float(d.mean()), se, float(np.mean(acc_cell) - np.mean(acc_base)))


def survivors(table: Sequence[Standing], count: int) -> list[Standing]:
    """The best ``count`` by the signal (ties: accuracy delta, then the cell order given)."""
    order = sorted(range(len(table)), key=lambda i: (-table[i].signal, -table[i].delta, i))
    return [table[i] for i in order[:count]]


def finalists(table: Sequence[Standing], k: int) -> list[Standing]:
    """The best ``k`` by accuracy delta, ties broken by the signal, then the cell order given."""
    order = sorted(range(len(table)), key=lambda i: (-table[i].delta, -table[i].signal, i))
    return [table[i] for i in order[:k]]
