"""What ``loopgraph tune``'s search costs against an exhaustive ``sweep`` of the same grid on the
same tuning items, and whether they agree on the winner; then the ``--dry-run`` estimate of the
full-triangle target (465 ranges x N in {2, 3} x uniform on WinoGrande's tuning half, SmolLM2).

    python benchmarks/bench_tune.py --tiny               # the tiny Llama fixture (built by the tests)
    python benchmarks/bench_tune.py --smollm2 DIR        # an export of smollm2-135m (loopgraph export smollm2-135m -o DIR)
    python benchmarks/bench_tune.py --smollm2 DIR --target-only

Cost is counted three ways: wall seconds, ids fed to a session (sweep: one full forward per cell
per item; tune: block-session ids / L, i.e. full-forward equivalents) and block-tokens (blocks run
x ids: sweep's cell costs L + (N - 1)(E - S) blocks, the chain's what it ran). Both runs use a
fresh cache (nothing reused) and 1 ORT thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data/benchmarks")


def _data_dir_of(items, task: str, dest: Path) -> Path:
    from loopgraph.eval.tasks import get_task
    rel = get_task(task).files[0]
    lines = (DATA / rel).read_text(encoding="utf-8").splitlines()
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    (dest / rel).write_text("".join(lines[i.index] + "\n" for i in items), encoding="utf-8")
    return dest


def compare(model: Path, ranges: str, iters: str, regs: str, tune_limit: int, n0: int, threads: int) -> dict:
    from loopgraph.eval.runner import open_model
    from loopgraph.experiments.sweep import sweep, tokenize
    from loopgraph.experiments.tune import item_tokens, make_splits, tune
    quiet = {"threads": threads, "progress": False, "say": lambda m: None}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = tune(model, ["winogrande"], ranges=ranges, iters=iters, regs=regs, data_dir=DATA, tune_limit=tune_limit, confirm_limit=16,
                   n0=n0, confirm=1, keep=2, cache_dir=Path(tmp) / "tune", **quiet)
        tune_wall = time.perf_counter() - t0
        t = res.tasks[0]
        data = _data_dir_of(t.splits.tune, "winogrande", Path(tmp) / "data")
        t1 = time.perf_counter()
        ex = sweep(model, "winogrande", ranges=ranges, iters=iters, regs=regs, data_dir=data, cache_dir=Path(tmp) / "sweep", **quiet)
        sweep_wall = time.perf_counter() - t1
    base = open_model(model)
    splits = make_splits("winogrande", DATA, 1234, tune_limit, 16)
    tokens = item_tokens(tokenize(splits.tune, base.path.parent), base.max_length, 128)
    L = t.num_blocks
    sweep_bt = sum(tokens) * (L + sum(L + (c.iters - 1) * (c.end - c.start) for c in t.cells))  # baseline + every cell
    rows = {r.cell: r for r in ex.rows}
    best = max(ex.rows, key=lambda r: r.delta)
    pick = t.finalists[0].key
    return {"model": str(model), "cells": len(t.cells), "items": len(t.splits.tune), "blocks": L,
            "rounds": [(r.cells, r.items) for r in t.rounds],
            "sweep_wall_s": round(sweep_wall, 1), "sweep_setup_s": round(ex.setup_seconds, 1), "sweep_ids_fed": ex.tokens,
            "sweep_block_tokens": sweep_bt,
            "tune_search_wall_s": round(t.work["search_seconds"], 1), "tune_wall_incl_confirmation_s": round(tune_wall, 1),
            "tune_confirm_s": round(t.work["confirm_seconds"], 1), "tune_pairs": t.work["pairs"], "exhaustive_pairs": len(t.cells) * len(t.splits.tune),
            "tune_block_tokens": t.work["block_tokens"], "tune_ids_fed_full_forward_equiv": round(t.work["block_tokens"] / L),
            "sweep_best": f"{best.cell.start}:{best.cell.end} x{best.cell.iters} {best.cell.reg.label}", "sweep_best_delta": best.delta,
            "sweep_best_ci95": best.ci95, "tune_pick": f"{pick.start}:{pick.end} x{pick.iters} {pick.reg.label}",
            "tune_pick_exhaustive_delta": rows[pick].delta, "same_winner": pick == best.cell,
            "pick_within_best_ci": best.ci95[0] <= rows[pick].delta <= best.ci95[1],
            "ratio_wall": round(sweep_wall / max(t.work["search_seconds"], 1e-9), 2),
            "ratio_block_tokens": round(sweep_bt / max(1, t.work["block_tokens"]), 2)}


def engines(model: Path, start: int, end: int, items: int, threads: int) -> dict:
    """Scoring one range's cells (N = 2 and 3, uniform) three ways on the same items, after the
    baseline: (a) the block chain; (b) a per-start *suffix* session: the Loop rewrite of the range
    cut so that it takes the hidden state entering block ``start`` (computed once, here by the
    chain) and returns the last block's output, then the same head; (c) sweep's full Loop session
    (gathered logits). Setup (rewrite + cut + session) and scoring seconds each."""
    import numpy as np

    from loopgraph.eval.runner import open_model
    from loopgraph.eval.scoring import score_groups
    from loopgraph.experiments.chain import BlockChain, Variant, _closure, _inferred_infos, _submodel, split_model
    from loopgraph.experiments.graphs import lens_feeds
    from loopgraph.experiments.grid import Cell, Reg
    from loopgraph.experiments.sweep import tokenize
    from loopgraph.experiments.tune import make_splits
    from loopgraph.onnxio import load_model
    from loopgraph.passes.blocks import find_blocks
    from loopgraph.passes.dataflow import GraphIndex
    from loopgraph.passes.loop import ITERS_NAME
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.logits import LogitsSession
    from loopgraph.runtime.session import open_session

    base = open_model(model)
    groups = tokenize(make_splits("winogrande", DATA, 1234, items, 8).tune, base.path.parent)
    m = load_model(model, load_weights=True)
    t0 = time.perf_counter()
    chain = BlockChain(split_model(m), threads=threads)
    chain_setup = time.perf_counter() - t0
    cells = [Cell(start, end, n, Reg("uniform")) for n in (2, 3)]
    t0 = time.perf_counter()
    score_groups(groups, chain.forward(None), max_length=base.max_length)  # the boundaries, shared by every cell
    boundaries_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    chain_scores = [score_groups(groups, chain.forward(Variant(c)), max_length=base.max_length) for c in cells]
    chain_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    looped = rewrite(m, cells[0].reg.spec(start, end, 3)).model
    blocks = find_blocks(m).blocks
    index = GraphIndex(looped.graph)
    boundary_names = {b.input for b in blocks} | {blocks[-1].output}
    ids, redirect, inputs = _closure(index, blocks[-1].output, blocks[start].input, boundary_names)
    inputs -= {ITERS_NAME}
    sub = _submodel(looped, index, _inferred_infos(looped), ids, redirect, [blocks[start].input, *sorted(inputs), ITERS_NAME],
                    blocks[-1].output, "suffix")
    suffix = open_session(sub, threads=threads)
    suffix_setup = time.perf_counter() - t0

    def suffix_forward(n):
        def forward(ids_, mask, at):
            h, feeds = chain.boundaries(ids_, mask)
            run = {blocks[start].input: h[start], **{k: feeds[k] for k in inputs}, ITERS_NAME: np.array(n, np.int64)}
            x = suffix.run(run)[suffix.output_names[0]]
            picked = x.reshape(-1, x.shape[-1])[at][None]
            return chain.head.run(lens_feeds(chain.models.head, picked))[chain.head.output_names[0]][0]
        return forward
    t0 = time.perf_counter()
    suffix_scores = [score_groups(groups, suffix_forward(c.iters), max_length=base.max_length) for c in cells]
    suffix_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    lm = LogitsSession(looped, threads=threads)
    full_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    full_scores = [score_groups(groups, lambda i, k, a, n=c.iters: lm.logits_at(i, k, a, {ITERS_NAME: np.array(n, np.int64)}),
                                max_length=base.max_length) for c in cells]
    full_s = time.perf_counter() - t0
    diff = max(abs(a.ll - b.ll) for x, y in ((chain_scores, full_scores), (suffix_scores, full_scores))
               for cx, cy in zip(x, y) for gx, gy in zip(cx, cy) for a, b in zip(gx, gy))
    return {"range": f"{start}:{end}", "items": len(groups), "chain_setup_s": round(chain_setup, 1), "boundaries_s": round(boundaries_s, 2),
            "chain_two_cells_s": round(chain_s, 2), "suffix_setup_s": round(suffix_setup, 1), "suffix_two_cells_s": round(suffix_s, 2),
            "full_loop_setup_s": round(full_setup, 1), "full_loop_two_cells_s": round(full_s, 2),
            "max_abs_ll_diff_vs_full_loop": diff}


def target(model: Path, threads: int) -> str:
    from loopgraph.experiments.tune import tune
    from loopgraph.experiments.tune_report import format_dry_run
    res = tune(model, ["winogrande"], ranges="all", iters="2,3", regs="uniform", data_dir=DATA, dry_run=True, threads=threads,
               cache_dir=None, progress=False, say=lambda m: None)
    return format_dry_run(res) + "\n" + json.dumps(res.tasks[0].estimate, indent=1, default=str)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--smollm2", type=Path)
    ap.add_argument("--target-only", action="store_true")
    ap.add_argument("--engines", action="store_true", help="with --smollm2: only the chain vs suffix-session vs full-Loop timing")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.tiny:
        from tests import fixtures
        model = ROOT / ".pytest_cache" / "loopgraph-fixtures" / fixtures.cache_key() / "llama-onnx" / "model.onnx"
        print(json.dumps(compare(model, "all", "2,3", "uniform", 64, 8, args.threads), indent=1, default=str), flush=True)
    if args.smollm2:
        model = args.smollm2 / "model.onnx"
        if args.engines:
            for s, e in ((3, 6), (12, 18)):
                print(json.dumps(engines(model, s, e, 16, args.threads), indent=1), flush=True)
            return 0
        if not args.target_only:
            print(json.dumps(compare(model, "4:6,12:18,24:27,27:30", "2,3", "uniform", 32, 8, args.threads), indent=1, default=str), flush=True)
        print(target(model, args.threads), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
