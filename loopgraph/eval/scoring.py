"""Batched log-likelihood scoring of token requests with any ``forward(ids, mask, at) -> logits``.

A *group* is the list of token requests of one item (its options). Handled:

- **Shared rows.** Within a group, a request whose fed ids are a prefix of another request's
  fed ids is read from that row (causal attention: the logits at a position depend only on
  the ids up to it). BoolQ's ``" no"``/``" yes"`` are one token each, so both are read from
  one forward pass of the context; lm-eval does the same for one-token continuations.
- **Batches by length.** Items are taken longest first, each item's rows together, and rows
  are packed while ``rows x widest <= max_batch_tokens`` (a longer single row runs alone),
  right-padded with mask 0, so real positions never see padding.
- **Logits only where scored.** ``forward`` is asked for the logits of the continuation
  positions only (``at``: flat indices ``row * width + position``; the ONNX scorer gathers them
  before the LM head, :mod:`loopgraph.passes.logits`), which are converted to float64 in chunks
  and normalised.

Refused: a continuation longer than ``max_length`` (see :func:`encoding.model_input`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from loopgraph.errors import LoopgraphError
from loopgraph.eval.encoding import TokenRequest, model_input
from loopgraph.runtime.inputs import right_pad

#: ids, mask [batch, seq] int64, at [positions] int64 (row * seq + position) -> logits [positions, vocab]
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: rows x widest row per forward pass (benchmarks/bench_eval.py measures the scaling)
DEFAULT_BATCH_TOKENS = 128
_CHUNK_ELEMENTS = 1 << 20  # float64 values converted at a time (8 MiB: a few rows of a large vocabulary)


@dataclasses.dataclass(frozen=True)
class Score:
    ll: float  # sum of the continuation tokens' log-probs
    greedy: bool  # every continuation token is the argmax of its position


@dataclasses.dataclass(frozen=True)
class _Read:
    group: int
    slot: int  # the request's position in its group
    end: int  # the request's fed length: its scored positions are [end - len(targets), end)
    targets: tuple[int, ...]


@dataclasses.dataclass
class Plan:
    rows: list[list[int]]  # the ids fed, one list per row
    owner: list[int]  # per row, its group (rows are never shared between groups)
    reads: list[list[_Read]]  # per row, the requests read from it
    batches: list[list[int]]  # row indices per batch


def plan(groups: Sequence[Sequence[TokenRequest]], max_length: int, max_batch_tokens: int, max_batch_rows: int) -> Plan:
    rows: list[list[int]] = []
    owner: list[int] = []
    reads: list[list[_Read]] = []
    for g, requests in enumerate(groups):
        fed = [model_input(r, max_length) for r in requests]
        mine: list[int] = []  # rows of this group
        for i in sorted(range(len(requests)), key=lambda i: -len(fed[i][0])):
            ids, count = fed[i]
            if count > len(ids):
                raise LoopgraphError(f"a request has {count} continuation tokens but only {len(ids)} ids to condition them on "
                                     "(its context tokenizes to nothing); such a request cannot be scored")
            row = next((r for r in mine if rows[r][:len(ids)] == ids), None)
            if row is None:
                rows.append(ids)
                owner.append(g)
                reads.append([])
                mine.append(row := len(rows) - 1)
            reads[row].append(_Read(g, i, len(ids), tuple(requests[i][1][len(requests[i][1]) - count:])))
    # longest items first, an item's rows together: items finish one after another (so an
    # interrupted run has cached whole items) while neighbours still have similar lengths
    longest = [0] * len(groups)
    for r, g in enumerate(owner):
        longest[g] = max(longest[g], len(rows[r]))
    order = sorted(range(len(rows)), key=lambda r: (-longest[owner[r]], owner[r], -len(rows[r])))
    return Plan(rows, owner, reads, batch_rows(order, [len(r) for r in rows], max_batch_tokens, max_batch_rows))


def batch_rows(order: Sequence[int], lengths: Sequence[int], max_batch_tokens: int, max_batch_rows: int) -> list[list[int]]:
    """Rows (indices, in ``order``) packed into batches while ``rows x widest <= max_batch_tokens``
    and ``rows <= max_batch_rows`` (a longer single row runs alone)."""
    batches: list[list[int]] = []
    widest = 0
    for r in order:
        if batches and len(batches[-1]) < max_batch_rows and (len(batches[-1]) + 1) * max(widest, lengths[r]) <= max_batch_tokens:
            batches[-1].append(r)
            widest = max(widest, lengths[r])
        else:
            batches.append([r])
            widest = lengths[r]
    return batches


def _log_probs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(target) and argmax == target per row of ``logits`` [positions, vocab], in float64, a
    few rows at a time, in place (a chunk stays in cache). The argmax, the max and the target's
    logit are read from the float32 logits: float64 holds them exactly, so every value is the one
    of a whole-array float64 computation, bit for bit (tests)."""
    lp = np.empty(len(targets), np.float64)
    hit = logits.argmax(-1) == targets
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    top = logits.max(-1).astype(np.float64)
    step = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    for s in range(0, len(targets), step):
        x = logits[s:s + step].astype(np.float64)
        m = top[s:s + step]
        np.subtract(x, m[:, None], out=x)
        np.exp(x, out=x)
        lp[s:s + step] = picked[s:s + step] - (m + np.log(x.sum(-1)))
    return lp, hit


def score_groups(groups: Sequence[Sequence[TokenRequest]], forward: Forward, *, max_length: int, max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 max_batch_rows: int = 64, pad_id: int = 0, on_group: Callable[[int, list[Score]], None] | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> list[list[Score]]:
    """Score every request of every group. ``on_group(g, scores)`` is called as soon as group ``g``
    is complete (for caching); ``on_batch(tokens_done, tokens_total)`` after each batch (for
    progress; tokens are the ids fed, padding excluded)."""
    p = plan(groups, max_length, max_batch_tokens, max_batch_rows)
    results: list[list[Score | None]] = [[None] * len(g) for g in groups]
    rows_left = [0] * len(groups)
    for g in p.owner:
        rows_left[g] += 1
    for g, n in enumerate(rows_left):
        if n == 0 and on_group:  # an item without requests
            on_group(g, [])
    total, done = sum(map(len, p.rows)), 0
    for batch in p.batches:
        ids, mask = right_pad([p.rows[r] for r in batch], pad_id)
        width = ids.shape[1]
        reads = [(i, rd) for i, r in enumerate(batch) for rd in p.reads[r]]
        at = np.array([i * width + pos for i, rd in reads for pos in range(rd.end - len(rd.targets), rd.end)], np.int64)
        targets = np.array([tok for _, rd in reads for tok in rd.targets], np.int64)
        logits = forward(ids, mask, at)
        if logits.ndim != 2 or logits.shape[0] != len(at):
            raise LoopgraphError(f"forward returned logits of shape {logits.shape} for {len(at)} positions; expected [positions, vocab]")
        lp, hit = _log_probs(logits, targets)
        del logits
        offset = 0
        for _, rd in reads:
            n = len(rd.targets)
            results[rd.group][rd.slot] = Score(float(lp[offset:offset + n].sum()), bool(hit[offset:offset + n].all()))
            offset += n
        for r in batch:
            rows_left[p.owner[r]] -= 1
            if rows_left[p.owner[r]] == 0 and on_group:
                on_group(p.owner[r], results[p.owner[r]])
        done += sum(len(p.rows[r]) for r in batch)
        if on_batch:
            on_batch(done, total)
    return results  # type: ignore[return-value]
