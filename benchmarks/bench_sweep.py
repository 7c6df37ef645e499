"""Work saved by loopgraph sweep's design against the naive one-rewrite-one-run-per-cell approach.

    .venv/bin/python benchmarks/bench_sweep.py --model /tmp/lg-real-sweep/model.onnx --task winogrande --limit 20 \\
        --ranges 6:12,12:18 --iters 2,3 --reg uniform [--threads 2] [--workdir /tmp/lg-bench-sweep] [--json out.json]

Both paths score the same cells on the same items with the same scoring code
(:func:`loopgraph.eval.scoring.score_groups`), one after the other in this process:

- **sweep**: :func:`loopgraph.experiments.sweep.sweep` with a fresh cache (one in-memory
  ``--dynamic`` rewrite and one session per range and regularizer, baseline once, tokenized
  once), then the same sweep again (resume: everything from the cache).
- **naive**: per cell, rewrite a baked file to disk (``rewrite(path, spec, file)``), open a
  session on it, tokenize the items, score them; the baseline is scored once per cell, as a
  per-cell ``loopgraph eval baseline looped --no-cache`` would (its time is measured once and
  counted per cell; the table also shows naive with the baseline scored only once). On a rerun
  the naive loop does everything again.

Printed: wall time of each path and its parts, rewrites, sessions opened, bytes written, tokens
fed, and the ratios. The per-cell scores of both paths are checked to be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from loopgraph.eval.runner import open_model, select
from loopgraph.eval.scoring import DEFAULT_BATCH_TOKENS, score_groups
from loopgraph.eval.tasks import load_items
from loopgraph.experiments.grid import make_cells, parse_iters, parse_ranges, parse_regs
from loopgraph.experiments.sweep import sweep, sweep_task, tokenize
from loopgraph.onnxio import load_model
from loopgraph.passes.blocks import find_blocks
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession

DATA = Path(os.environ.get("LOOPGRAPH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"))


def naive(model: Path, task_name: str, cells, limit: int, threads: int, workdir: Path, max_length: int, batch: int) -> dict:
    task, _ = sweep_task(task_name, DATA)
    items = select(load_items(task, DATA), limit, 1234)
    parts = {"rewrite_and_write": 0.0, "open_session": 0.0, "tokenize": 0.0, "score": 0.0}
    written = tokens = 0
    accuracy = {}
    t0 = time.perf_counter()
    # the baseline, measured once (a per-cell eval would repeat it for every cell)
    t = time.perf_counter()
    base_session = LogitsSession(model, threads=threads)
    base_open = time.perf_counter() - t
    t = time.perf_counter()
    groups = tokenize(items, model.parent)
    score_groups(groups, base_session.logits_at, max_length=max_length, max_batch_tokens=batch)
    base_score = time.perf_counter() - t
    del base_session
    for cell in cells:
        out = workdir / "naive.onnx"
        t = time.perf_counter()
        rewrite(model, cell.reg.spec(cell.start, cell.end, cell.iters, dynamic=False), out)
        parts["rewrite_and_write"] += time.perf_counter() - t
        written += out.stat().st_size
        t = time.perf_counter()
        session = LogitsSession(out, threads=threads)
        parts["open_session"] += time.perf_counter() - t
        t = time.perf_counter()
        groups = tokenize(items, model.parent)
        parts["tokenize"] += time.perf_counter() - t
        t = time.perf_counter()
        totals: list[int] = []
        scores = score_groups(groups, session.logits_at, max_length=max_length, max_batch_tokens=batch, on_batch=lambda d, n, seen=totals: seen.append(n))
        parts["score"] += time.perf_counter() - t
        tokens += totals[-1] if totals else 0
        accuracy[cell] = [max(range(len(s)), key=lambda i: s[i].ll) for s in scores]
        del session
        out.unlink()
    looped = time.perf_counter() - t0 - base_open - base_score
    return {"seconds_baseline_once": time.perf_counter() - t0, "seconds_baseline_per_cell": looped + len(cells) * (base_open + base_score),
            "baseline_open_s": base_open, "baseline_score_s": base_score, "parts": parts, "rewrites": len(cells),
            "sessions_baseline_per_cell": 2 * len(cells), "bytes_written": written, "tokens_looped": tokens, "choices": accuracy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--task", default="winogrande")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--ranges", default="6:12,12:18")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--iters", default="2,3")
    ap.add_argument("--reg", default="uniform")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lg-bench-sweep"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    blocks = find_blocks(load_model(args.model))
    cells = make_cells(parse_ranges(args.ranges, len(blocks), args.stride), parse_iters(args.iters), parse_regs(args.reg))
    max_length = open_model(args.model).max_length
    quiet = {"progress": False, "say": lambda m: None, "max_batch_tokens": args.max_batch_tokens}

    t = time.perf_counter()
    first = sweep(args.model, args.task, ranges=args.ranges, stride=args.stride, iters=args.iters, regs=args.reg, limit=args.limit,
                  data_dir=DATA, cache_dir=args.workdir / "cache", threads=args.threads, **quiet)
    sweep_s = time.perf_counter() - t
    t = time.perf_counter()
    again = sweep(args.model, args.task, ranges=args.ranges, stride=args.stride, iters=args.iters, regs=args.reg, limit=args.limit,
                  data_dir=DATA, cache_dir=args.workdir / "cache", threads=args.threads, **quiet)
    resume_s = time.perf_counter() - t
    assert again.cells_computed == 0

    nv = naive(args.model, args.task, cells, args.limit, args.threads, args.workdir, max_length, args.max_batch_tokens)
    # same cells, same items: the looped accuracies must agree (the baked and dynamic graphs are the same computation)
    by_cell = {r.cell: r.value for r in first.rows}
    task, _ = sweep_task(args.task, DATA)
    items = select(load_items(task, DATA), args.limit, 1234)
    if first.metric == "acc":  # (acc_norm would need the option lengths: checked on acc tasks only)
        for cell, choices in nv["choices"].items():
            acc = float(np.mean([c == it.gold for c, it in zip(choices, items)]))
            assert abs(acc - by_cell[cell]) < 1e-12, f"{cell}: naive acc {acc} != sweep {by_cell[cell]}"

    report = {
        "model": str(args.model), "task": args.task, "limit": args.limit, "cells": len(cells), "units": first.units,
        "threads": args.threads, "max_batch_tokens": args.max_batch_tokens,
        "sweep": {"seconds": sweep_s, "rewrites": first.rewrites, "sessions": first.rewrites + 1, "bytes_written": 0,
                  "tokens": first.tokens, "setup_s": first.setup_seconds, "score_s": first.score_seconds},
        "sweep_resumed": {"seconds": resume_s, "rewrites": again.rewrites, "tokens": again.tokens},
        "naive": {k: v for k, v in nv.items() if k != "choices"},
    }
    report["speedup_vs_naive_baseline_per_cell"] = nv["seconds_baseline_per_cell"] / sweep_s
    report["speedup_vs_naive_baseline_once"] = nv["seconds_baseline_once"] / sweep_s
    report["resume_speedup_vs_naive_rerun"] = nv["seconds_baseline_per_cell"] / resume_s
    p = nv["parts"]
    print(f"{args.model} · {args.task} · {args.limit} items · {len(cells)} cells in {first.units} rewrite units · {args.threads} threads")
    print("| path | wall s | rewrites | sessions | bytes written | tokens fed |\n|---|---|---|---|---|---|")
    print(f"| sweep (fresh cache) | {sweep_s:.1f} | {first.rewrites} | {first.rewrites + 1} | 0 | {first.tokens} |")
    print(f"| sweep (resumed) | {resume_s:.1f} | 0 | 0 | 0 | 0 |")
    print(f"| naive, baseline once | {nv['seconds_baseline_once']:.1f} | {len(cells)} | {len(cells) + 1} | {nv['bytes_written']} | "
          f"{nv['tokens_looped']} + baseline |")
    print(f"| naive, baseline per cell | {nv['seconds_baseline_per_cell']:.1f} | {len(cells)} | {2 * len(cells)} | {nv['bytes_written']} | "
          f"{nv['tokens_looped']} + {len(cells)} x baseline |")
    print(f"naive parts: rewrite+write {p['rewrite_and_write']:.1f} s, sessions {p['open_session']:.1f} s, tokenize {p['tokenize']:.1f} s, "
          f"score {p['score']:.1f} s; baseline open {nv['baseline_open_s']:.1f} s + score {nv['baseline_score_s']:.1f} s")
    print(f"sweep parts (summed over jobs): setup {first.setup_seconds:.1f} s, score {first.score_seconds:.1f} s")
    print(f"speed-up: {report['speedup_vs_naive_baseline_per_cell']:.2f}x vs naive with the baseline per cell, "
          f"{report['speedup_vs_naive_baseline_once']:.2f}x vs naive with the baseline once, "
          f"{report['resume_speedup_vs_naive_rerun']:.0f}x on a rerun")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
