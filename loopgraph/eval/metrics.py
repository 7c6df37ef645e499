"""Per-item metrics and their aggregation, as lm-evaluation-harness computes them.

- multiple choice: ``acc`` = argmax of the summed log-likelihoods is the gold option;
  ``acc_norm`` = the same after dividing each by the option's length in **characters**
  (without the leading space). Ties go to the first maximum (``np.argmax``).
- ``lambada_openai``: ``acc`` = every target token is the greedy argmax; ``perplexity`` =
  ``exp(-mean ll)`` over items.
- ``wikitext``: ``word_perplexity = exp(-sum ll / sum words)``, ``byte_perplexity =
  exp(-sum ll / sum bytes)``, ``bits_per_byte = -sum ll / sum bytes / ln 2`` (ratios of sums).

Means get a standard error (n - 1 sample std / sqrt n); perplexities get none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from loopgraph.eval.scoring import Score
from loopgraph.eval.stats import stderr
from loopgraph.eval.tasks import LOGLIKELIHOOD, MULTIPLE_CHOICE, ROLLING, Item, Task

#: metrics that are per-item 0/1 means (these get a stderr and a paired test)
BINARY = ("acc", "acc_norm")


def multiple_choice(lls: Sequence[float], gold: int, choices: Sequence[str]) -> dict[str, int]:
    lls_ = np.array(lls, np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return {"acc": int(np.argmax(lls_) == gold), "acc_norm": int(np.argmax(lls_ / lengths) == gold)}


def item_metrics(task: Task, item: Item, scores: Sequence[Score]) -> dict[str, float]:
    """The per-item values lm-eval's ``process_results`` gives (only the task's metrics)."""
    if task.output_type == MULTIPLE_CHOICE:
        values = multiple_choice([s.ll for s in scores], item.gold, item.choices)
        return {m: values[m] for m in task.metrics}
    if task.output_type == LOGLIKELIHOOD:
        (s,) = scores
        return {"acc": int(s.greedy), "perplexity": s.ll}
    if task.output_type == ROLLING:
        return {"ll": sum(s.ll for s in scores), "words": item.words, "bytes": item.bytes}
    raise ValueError(f"unknown output type {task.output_type}")


def aggregate(task: Task, per_item: Sequence[dict[str, float]]) -> dict[str, float]:
    """Task-level metrics, plus ``<metric>_stderr`` for the means."""
    if not per_item:
        raise ValueError("no items to aggregate")
    col = {k: np.array([d[k] for d in per_item], np.float64) for k in per_item[0]}
    out: dict[str, float] = {}
    if task.output_type == ROLLING:
        ll, words, nbytes = col["ll"].sum(), col["words"].sum(), col["bytes"].sum()
        out["word_perplexity"] = math.exp(-ll / words)
        out["byte_perplexity"] = math.exp(-ll / nbytes)
        out["bits_per_byte"] = -ll / nbytes / math.log(2)
        return out
    for m in task.metrics:
        if m == "perplexity":
            out[m] = math.exp(-col[m].mean())
        else:
            out[m] = float(col[m].mean())
            out[f"{m}_stderr"] = stderr(col[m])
    return out
