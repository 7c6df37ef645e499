"""Items/s of the ONNX Runtime scorer against the independent PyTorch scorer on the real SmolLM2-135M:
the same items, the same number of CPU threads, and how each scales with batch size.

    .venv/bin/loopgraph export smollm2-135m -o /tmp/lg-real       # once
    .venv/bin/python benchmarks/bench_eval.py --export /tmp/lg-real [--task arc_easy] [--items 24] [--threads 1 2] [--rounds 3]

The ONNX scorer computes logits only at the scored positions (:mod:`loopgraph.passes.logits`);
the same scorer on the unmodified graph (logits everywhere, the positions picked in numpy) is a
third baseline, to show what the gather buys.

Timed: ``score(task, items)`` = tokenization, batching, forward passes and log-softmax; model
loading is not timed and one warm-up call precedes the measurements. The configurations are
measured in interleaved rounds (every configuration once per round) and the median per
configuration is reported, so a load change on a shared machine hits all of them alike. CPU
seconds of the process are reported too: on a machine other jobs keep busy, they measure the
work far more steadily than wall time (with one thread they are the single core's busy time). Batch size is
``--max-batch-tokens`` for the ONNX scorer (rows x widest row per forward pass, rows sharing a
context read once) and items per forward pass for the PyTorch scorer (every option its own row).
The PyTorch scorer runs its LM head only where scored (``logits_to_keep``) and, as a second
baseline, the way lm-eval's Hugging Face backend does (logits and log-softmax everywhere). Both
scorers' per-request log-likelihoods are compared on the same items (max |Δ| and the share of
items with the same choice). The load average at the start is printed: on a shared machine the
absolute numbers move with it, the ratio measured side by side much less.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loopgraph.eval.runner import SAMPLES_DIR, OnnxScorer, open_model, select  # noqa: E402
from loopgraph.eval.tasks import TASKS, load_items  # noqa: E402
from loopgraph.exportdir import reference_dir  # noqa: E402

ONNX_BATCH_TOKENS = (128, 512, 2048)
HF_BATCH_ITEMS = (1, 4)


def score_with(scorer, attr: str, value: int, task, items):
    setattr(scorer, attr, value)
    return scorer.score(task, items)


def score_full(hf, task, items):
    hf.batch_items, hf.full_logits = 4, True
    try:
        return hf.score(task, items)
    finally:
        hf.full_logits = False


def interleaved(configs: dict, task, items, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, CPU seconds of this process) of ``score(task, items)`` per configuration, round-robin."""
    for score in configs.values():
        score(task, items[:2])  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, score in configs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            score(task, items)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            print(f"  {name}: {times[name][-1][0]:.1f} s wall, {times[name][-1][1]:.1f} s CPU", flush=True)
    return {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=Path("/tmp/lg-real"), help="export folder of smollm2-135m (with hf/)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LOOPGRAPH_DATA", ROOT.parent / "shared/data/benchmarks")))
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()

    from loopgraph.reference.hf_scorer import HFScorer
    data = args.data_dir if args.data_dir.is_dir() else SAMPLES_DIR
    task = TASKS[args.task]
    items = select(load_items(task, data), args.items, 1234)
    print(f"{args.task}: {len(items)} items from {data}; load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    model = open_model(args.export / "model.onnx")
    rows = []
    for threads in args.threads:
        onnx_scorer = OnnxScorer(model, threads=threads)
        onnx_full = OnnxScorer(model, threads=threads, gather=False)
        hf = HFScorer(reference_dir(args.export), threads=threads)
        configs = {}
        for b in ONNX_BATCH_TOKENS:
            configs[f"onnx|{b} tokens"] = functools.partial(score_with, onnx_scorer, "max_batch_tokens", b)
        configs["onnx, full logits (no gather before the LM head)|128 tokens"] = functools.partial(
            score_with, onnx_full, "max_batch_tokens", 128)
        for k in HF_BATCH_ITEMS:
            configs[f"pytorch|{k} items"] = functools.partial(score_with, hf, "batch_items", k)
        configs["pytorch, lm-eval style (LM head + log-softmax everywhere)|4 items"] = functools.partial(score_full, hf)
        print(f"threads {threads}:")
        for name, (wall, cpu) in interleaved(configs, task, items, args.rounds).items():
            scorer, batch = name.split("|")
            rows.append({"threads": threads, "scorer": scorer, "batch": batch, "seconds": wall, "cpu_seconds": cpu})
        a = score_with(onnx_scorer, "max_batch_tokens", 512, task, items)
        b = score_with(hf, "batch_items", 4, task, items)
        diff = max(abs(x.ll - y.ll) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
        same = np.mean([np.argmax([s.ll for s in x]) == np.argmax([s.ll for s in y]) for x, y in zip(a, b)])
        print(f"threads {threads}: max |Δ log-likelihood| ONNX vs PyTorch {diff:.2e}, same choice on {same:.1%} of items")
        del onnx_scorer, onnx_full, hf
    print(f"load average at the end {os.getloadavg()[0]:.2f}")

    print("\n| threads | scorer | batch | items/s (wall) | items per CPU-second | vs best PyTorch (wall / CPU) |\n|---|---|---|---|---|---|")
    for r in rows:
        hf_rows = [x for x in rows if x["threads"] == r["threads"] and x["scorer"] == "pytorch"]
        best_wall, best_cpu = min(x["seconds"] for x in hf_rows), min(x["cpu_seconds"] for x in hf_rows)
        r["items_per_s"], r["items_per_cpu_s"] = len(items) / r["seconds"], len(items) / r["cpu_seconds"]
        print(f"| {r['threads']} | {r['scorer']} | {r['batch']} | {r['items_per_s']:.2f} | {r['items_per_cpu_s']:.2f} "
              f"| {best_wall / r['seconds']:.2f}x / {best_cpu / r['cpu_seconds']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"task": args.task, "items": len(items), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
