"""Score an item's options in one row that holds their common context once.

The options of a multiple-choice item share a context (HellaSwag: about 60 of its 100 ids), yet
:func:`loopgraph.eval.scoring.score_groups` feeds each option as a row of its own, so every block
computes the context once per option. A *packed row* holds the ids the options have in common
(their fed ids' longest common prefix) once, then each option's own ids one after another:

    prefix p_0 .. p_{k-1} | option 1's rest | option 2's rest | ...

with the **position ids** each token would have in its own row (every option's rest starts at
``k``) and an **allow** mask ``[batch, 1, seq, seq]`` under which a token sees the prefix and the
earlier tokens of its own option, and nothing else. Under causal attention a token's state depends
only on what it sees, through every block and every loop iteration (the regularizers, the noise
control and halting act per token), so each option's log-likelihood is the one of its own row,
to float rounding: the attention rows are longer (masked keys between), which changes the order of
the softmax sums. The forward must honour ``allow`` (the block chain split with ``allow=True``).

Rows are batched as ``score_groups`` batches (longest first, ``rows x widest <= max_batch_tokens``,
right-padded; a padded query row is allowed every key, so it never softmaxes an empty row, and no
real token sees it). A row wider than ``window`` (a sliding-window model's span) is not packed: its
options get rows of their own, as ``score_groups`` feeds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from loopgraph.errors import LoopgraphError
from loopgraph.eval.encoding import TokenRequest, model_input
from loopgraph.eval.scoring import Score, _log_probs, batch_rows
from loopgraph.runtime.inputs import right_pad

#: ids, mask, positions [batch, seq] int64, allow [batch, 1, seq, seq] bool, at [positions] -> logits [positions, vocab]
PackedForward = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class PackedRow:
    group: int
    ids: list[int]
    positions: list[int]
    segment: list[int]  # 0: the shared prefix; s > 0: the rest of the row's s-th option
    reads: list[tuple[int, list[int], tuple[int, ...]]]  # (slot in the group, packed logit indices, target ids)


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(map(len, rows))
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows[1:]):
            return k
    return n


def pack_group(group: int, requests: Sequence[TokenRequest], max_length: int, window: int | None = None) -> list[PackedRow]:
    """The packed row of one item (or, when it would be wider than ``window``, a row per option)."""
    fed = [model_input(r, max_length) for r in requests]
    if any(count > len(ids) for ids, count in fed):
        raise LoopgraphError("a request has more continuation tokens than ids to condition them on (its context tokenizes "
                             "to nothing); such a request cannot be scored")
    targets = [tuple(r[1][len(r[1]) - count:]) for r, (_, count) in zip(requests, fed)]
    if not fed:
        return []
    k = _common_prefix([ids for ids, _ in fed])
    width = k + sum(len(ids) - k for ids, _ in fed)
    if window is not None and width > window:
        return [PackedRow(group, list(ids), list(range(len(ids))), [0] * len(ids),
                          [(slot, list(range(len(ids) - count, len(ids))), targets[slot])])
                for slot, (ids, count) in enumerate(fed)]
    row = PackedRow(group, list(fed[0][0][:k]), list(range(k)), [0] * k, [])
    for slot, (ids, count) in enumerate(fed):
        base = len(row.ids) - k  # packed index of this option's position k
        rest = ids[k:]
        row.ids += rest
        row.positions += range(k, len(ids))
        row.segment += [slot + 1] * len(rest)
        where = [q if q < k else base + q for q in range(len(ids) - count, len(ids))]
        row.reads.append((slot, where, targets[slot]))
    return [row]


def allow_mask(segments: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """``[rows, 1, width, width]``: query u sees key v <= u of the prefix or of u's own option;
    padding queries see every key, no real query sees padding."""
    out = np.ones((len(segments), 1, width, width), bool)
    for r, seg in enumerate(segments):
        s = np.asarray(seg)
        n = len(s)
        causal = np.tril(np.ones((n, n), bool))
        same = (s[None, :] == 0) | (s[None, :] == s[:, None])
        out[r, 0, :n, :n] = causal & same
        out[r, 0, :n, n:] = False
    return out


def plan_packed(groups: Sequence[Sequence[TokenRequest]], max_length: int, max_batch_tokens: int, max_batch_rows: int = 64,
                window: int | None = None) -> tuple[list[PackedRow], list[list[int]]]:
    """The packed rows of every group and their batches (row indices), longest rows first."""
    rows = [row for g, requests in enumerate(groups) for row in pack_group(g, requests, max_length, window)]
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].ids), rows[r].group))
    return rows, batch_rows(order, [len(r.ids) for r in rows], max_batch_tokens, max_batch_rows)


def packed_tokens(groups: Sequence[Sequence[TokenRequest]], max_length: int, window: int | None = None) -> list[int]:
    """Ids fed per group when packed."""
    return [sum(len(row.ids) for row in pack_group(g, r, max_length, window)) for g, r in enumerate(groups)]


def score_packed(groups: Sequence[Sequence[TokenRequest]], forward: PackedForward, *, max_length: int, max_batch_tokens: int,
                 max_batch_rows: int = 64, pad_id: int = 0, window: int | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> list[list[Score]]:
    """Every request of every group scored from packed rows (the result of ``score_groups``, to
    float rounding). ``on_batch(tokens_done, tokens_total)`` after each batch (ids fed)."""
    rows, batches = plan_packed(groups, max_length, max_batch_tokens, max_batch_rows, window)
    results: list[list[Score | None]] = [[None] * len(g) for g in groups]
    total, done = sum(len(r.ids) for r in rows), 0
    for batch in batches:
        picked = [rows[r] for r in batch]
        ids, mask = right_pad([r.ids for r in picked], pad_id)
        width = ids.shape[1]
        positions = np.zeros_like(ids)
        for i, r in enumerate(picked):
            positions[i, :len(r.positions)] = r.positions
        allow = allow_mask([r.segment for r in picked], width)
        reads = [(r.group, slot, [i * width + q for q in where], tg) for i, r in enumerate(picked) for slot, where, tg in r.reads]
        at = np.array([q for *_, where, _ in reads for q in where], np.int64)
        logits = forward(ids, mask, positions, allow, at)
        lp, hit = _log_probs(logits, np.array([t for *_, tg in reads for t in tg], np.int64))
        del logits
        offset = 0
        for g, slot, where, _ in reads:
            n = len(where)
            results[g][slot] = Score(float(lp[offset:offset + n].sum()), bool(hit[offset:offset + n].all()))
            offset += n
        done += sum(len(r.ids) for r in picked)
        if on_batch:
            on_batch(done, total)
    return results  # type: ignore[return-value]
