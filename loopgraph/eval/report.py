"""Turn an :class:`~loopgraph.eval.runner.EvalReport` into comparisons, a text table, JSON and per-item JSONL.

The first model is the baseline: every other model gets, per binary metric (``acc``,
``acc_norm``), the delta, a paired bootstrap 95 % interval and the exact McNemar p-value on the
same items. A noise control is also compared with the looped model it was made from (looped
minus noise), which is the test of "better than a random perturbation of the same size".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from loopgraph._version import package_versions
from loopgraph.eval.metrics import BINARY
from loopgraph.eval.runner import EvalReport, Model
from loopgraph.eval.stats import Paired, compare_paired
from loopgraph.onnxio import atomic_path

BOOTSTRAP_RESAMPLES = 10_000
_PACKAGES = ("loopgraph", "onnx", "onnxruntime", "tokenizers", "numpy")


@dataclasses.dataclass(frozen=True)
class Comparison:
    task: str
    base: str  # label of the reference model
    other: str
    metric: str
    paired: Paired


def pairs(models: list[Model]) -> list[tuple[str, str]]:
    """(reference, other): every model against the first; every looped model against its noise control."""
    return [(models[0].label, m.label) for m in models[1:]] + [(m.label, m.noise_of) for m in models if m.noise_of]


def comparisons(report: EvalReport, seed: int = 1234, resamples: int = BOOTSTRAP_RESAMPLES) -> list[Comparison]:
    out = []
    for task in report.tasks:
        res = report.results[task.name]
        for base, other in pairs(report.models):
            for metric in (m for m in task.metrics if m in BINARY):
                x = [d[metric] for d in res[base].per_item]
                y = [d[metric] for d in res[other].per_item]
                out.append(Comparison(task.name, base, other, metric, compare_paired(x, y, seed=seed, resamples=resamples)))
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def format_text(report: EvalReport, comps: list[Comparison]) -> str:
    lines = [f"data: {report.config['data_dir']}" + ("  (the shipped samples, not the full splits)" if report.config["samples"] else "")]
    for model in report.models:
        what = f"{model.spec.slug()} of {model.source.name if model.source else '?'}" if model.spec else "no loopgraph rewrite"
        lines.append(f"model {model.label}: {model.path} ({what}; max_length {model.max_length} from {model.max_length_from})")
    width = max(len(m.label) for m in report.models) + 2
    for task in report.tasks:
        n, total = len(report.items[task.name]), report.totals[task.name]
        subset = f"{n} of {total} items" + (f" (random subset, seed {report.config['seed']})" if n < total else "")
        lines += ["", f"== {task.name} ({task.split}; {subset})" + (f" - {task.note}" if task.note else "")]
        lines.append(f"{'model':<{width}}" + "".join(f"{m:>20}" for m in task.metrics) + f"{'time':>10}")
        for model in report.models:
            r = report.results[task.name][model.label]
            cells = []
            for m in task.metrics:
                v = r.metrics[m]
                cells.append(f"{_pct(v)} ± {_pct(r.metrics[f'{m}_stderr'])}" if m in BINARY else f"{v:.6g}")
            took = "cached" if r.from_cache == len(r.per_item) else f"{r.seconds:.0f} s"
            lines.append(f"{model.label:<{width}}" + "".join(f"{c:>20}" for c in cells) + f"{took:>10}")
        mine = [c for c in comps if c.task == task.name]
        if mine:
            lines.append("paired (points; 95% paired-bootstrap CI; exact McNemar p; +gained/-lost items):")
            for c in mine:
                p = c.paired
                lines.append(f"  {c.other} vs {c.base} {c.metric}: {_signed(p.delta)} [{_signed(p.ci95[0])}, {_signed(p.ci95[1])}]"
                             f" p={p.p_mcnemar:.3g} (+{p.gained}/-{p.lost})")
    lines += ["", f"total time {report.seconds:.0f} s"]
    return "\n".join(lines)


def _clean(x: Any) -> Any:
    """JSON has no NaN: write null."""
    return None if isinstance(x, float) and math.isnan(x) else x


def to_json(report: EvalReport, comps: list[Comparison]) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for task in report.tasks:
        res = report.results[task.name]
        tasks[task.name] = {
            "split": task.split, "output_type": task.output_type, "note": task.note or None,
            "items": len(report.items[task.name]), "items_in_file": report.totals[task.name], "licence": task.licence,
            "metrics": {label: {k: _clean(v) for k, v in r.metrics.items()} for label, r in res.items()},
            "comparisons": [{"model": c.other, "vs": c.base, "metric": c.metric, "delta": c.paired.delta,
                             "ci95": list(c.paired.ci95), "p_mcnemar": c.paired.p_mcnemar, "gained": c.paired.gained,
                             "lost": c.paired.lost, "n": c.paired.n} for c in comps if c.task == task.name],
        }
    return {
        "config": {**report.config, "tasks": [t.name for t in report.tasks], "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                   "baseline": report.models[0].label},
        "versions": package_versions(_PACKAGES),
        "models": [{"label": m.label, "path": str(m.path), "sha256": m.sha256,
                    "spec": None if m.spec is None else json.loads(m.spec.to_json()),
                    "source": None if m.source is None else str(m.source), "noise_of": m.noise_of,
                    "max_length": m.max_length, "max_length_from": m.max_length_from} for m in report.models],
        "timing": {"total_seconds": report.seconds,
                   "per_task": {t: {label: {"seconds": r.seconds, "items_from_cache": r.from_cache, "tokens_fed": r.tokens}
                                    for label, r in res.items()} for t, res in report.results.items()}},
        "tasks": tasks,
    }


def write_json(data: dict[str, Any], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_items(report: EvalReport, path: str | Path) -> int:
    """One JSON line per (task, model, item): index, gold, per-request log-likelihoods and greedy flags, metrics."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for task in report.tasks:
            for model in report.models:
                r = report.results[task.name][model.label]
                for item, scores, values in zip(report.items[task.name], r.scores, r.per_item):
                    f.write(json.dumps({"task": task.name, "model": model.label, "index": item.index, "gold": item.gold,
                                        "ll": [s.ll for s in scores], "greedy": [s.greedy for s in scores], **values}) + "\n")
                    n += 1
    return n
