"""Packed items against a row per option in ``tune``'s block chain: ids fed, wall time and parity.

    python benchmarks/bench_pack.py DIR                     # DIR: loopgraph export smollm2-135m -o DIR
    python benchmarks/bench_pack.py DIR --task arc_easy --items 32

Scores the same tuning items with the chain twice, side by side in one process (1 ORT thread):
once as ``score_groups`` feeds them (a row per option) and once packed (the options' common
context once, :mod:`loopgraph.eval.packing`), for the baseline and two looped cells. Prints the
ids fed and block-tokens of each, the wall-time ratio, and the largest |Δ log-likelihood| and
the items whose acc / acc_norm answer differs between the two.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data/benchmarks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="an export folder of smollm2-135m")
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed passes of each (the minimum is reported)")
    args = ap.parse_args()

    import numpy as np

    from loopgraph.eval.packing import packed_tokens, score_packed
    from loopgraph.eval.runner import open_model
    from loopgraph.eval.scoring import DEFAULT_BATCH_TOKENS, score_groups
    from loopgraph.experiments.chain import BlockChain, Variant, split_model
    from loopgraph.experiments.grid import Cell, Reg
    from loopgraph.experiments.sweep import tokenize
    from loopgraph.experiments.tune import item_tokens, make_splits, option_values
    from loopgraph.onnxio import load_model

    base = open_model(args.export / "model.onnx")
    splits = make_splits(args.task, DATA, 1234, args.items, 1)
    items = splits.tune
    groups = tokenize(items, base.path.parent)
    L = len(split_model(load_model(base.path, load_weights=True)).blocks)
    plain = BlockChain(split_model(load_model(base.path, load_weights=True)), threads=1)
    packed = BlockChain(split_model(load_model(base.path, load_weights=True), allow=True), threads=1)
    variants = [None, Variant(Cell(12, 18, 3, Reg("uniform"))), Variant(Cell(26, 29, 2, Reg("uniform")))]
    kw = {"max_length": base.max_length, "max_batch_tokens": DEFAULT_BATCH_TOKENS}
    ids_plain, ids_packed = sum(item_tokens(groups, base.max_length, DEFAULT_BATCH_TOKENS)), sum(packed_tokens(groups, base.max_length))

    def run(chain: BlockChain, fn, forward) -> tuple[list, float, int]:
        chain.clear()
        tokens = chain.block_tokens
        t0 = time.perf_counter()
        out = []
        for v in variants:
            chain.forget_loops()
            out.append(fn(groups, forward(v), **kw))
        return out, time.perf_counter() - t0, chain.block_tokens - tokens

    walls: dict[str, list[float]] = {"plain": [], "packed": []}
    for _ in range(args.repeats):
        a, wa, bt_a = run(plain, score_groups, plain.forward)
        b, wb, bt_b = run(packed, score_packed, packed.packed_forward)
        walls["plain"].append(wa)
        walls["packed"].append(wb)
    worst, flips = 0.0, 0
    for va, vb in zip(a, b):
        for it, sa, sb in zip(items, va, vb):
            worst = max(worst, max(abs(x.ll - y.ll) for x, y in zip(sa, sb)))
            for metric in ("acc", "acc_norm"):
                flips += int(np.argmax(option_values(splits.task, it, sa, metric)) != np.argmax(option_values(splits.task, it, sb, metric)))
    wa, wb = min(walls["plain"]), min(walls["packed"])
    print(f"{args.task}: {len(items)} tuning items, {sum(map(len, groups))} options, {L} blocks; baseline + 12:18x3 + 26:29x2 "
          f"uniform, 1 ORT thread, min of {args.repeats} alternating passes")
    print(f"ids fed per pass      row per option {ids_plain:>9,}   packed {ids_packed:>9,}   ratio {ids_packed / ids_plain:.3f}")
    print(f"block-tokens (3 vars) row per option {bt_a:>9,}   packed {bt_b:>9,}   ratio {bt_b / bt_a:.3f}")
    print(f"wall                  row per option {wa:>8.1f}s   packed {wb:>8.1f}s   ratio {wb / wa:.3f}")
    print(f"parity: max |Δ ll| {worst:.2e} over {len(variants)} variants; answers (acc, acc_norm) that differ: {flips}")


if __name__ == "__main__":
    main()
