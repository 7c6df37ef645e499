#!/usr/bin/env python
"""int4 / int8 / fp16 looped SmolLM2 side by side with fp32 (ONNX Runtime CPU, same threads).

    python benchmarks/bench_precision.py                        # --export out/smollm2-past, 10:20 x3 uniform, 2 threads
    python benchmarks/bench_precision.py --threads 2 --repeats 3 --new-tokens 32

For each precision (fp32, int8, int4, fp16) of the with-past export looped 10:20 x3 (``kv=exact``),
made once next to the export with ``loopgraph rewrite`` and ``loopgraph quantize``: file size,
session load time of the file as it is and of its ``loopgraph optimize`` copy (loaded with
optimizations disabled, as a pre-optimized file is meant to be), prefill latency (batch 1, seq
128), decode tokens/s (greedy, --new-tokens, EOS ignored, with the cache). Printed as ratios to
fp32 measured in the same run; the figures are medians over --repeats. Targets (issue 14): int4
decode >= 1.8x fp32 tokens/s; int4 file <= 0.4x fp32; optimized file loads >= 1.5x faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from loopgraph.spec import LoopSpec, parse_range  # noqa: E402

PRECISIONS = ("fp32", "int8", "int4", "int4-acc0", "fp16")
#: quantize options per variant; int4: the default accuracy level 4 (int8 compute on CPU); int4-acc0: fp32 compute
OPTIONS = {"int8": ("int8", None), "int4": ("int4", None), "int4-acc0": ("int4", 0), "fp16": ("fp16", None)}


def ensure_files(folder: Path, spec: LoopSpec, variants: tuple[str, ...] = PRECISIONS) -> dict[str, Path]:
    """The looped fp32 file and its quantized copies, made once (never overwritten)."""
    from loopgraph.deploy.quantize import quantize_file
    from loopgraph.rewrite import rewrite
    if not (folder / "model.onnx").is_file():
        from loopgraph.exporters.export import export
        print(f"exporting smollm2-135m with past to {folder} ...", flush=True)
        export("smollm2-135m", folder, with_past=True, force=True, say=lambda m: None)
    looped = folder / f"model.{spec.slug()}-kv{spec.kv}.onnx"
    if not looped.is_file():
        rewrite(folder / "model.onnx", spec, looped)
    files = {"fp32": looped}
    for name in variants[1:] if variants[0] == "fp32" else variants:
        files[name] = looped.with_suffix(f".{name}.onnx")
        if not files[name].is_file():
            print(f"quantizing to {files[name].name} ...", flush=True)
            to, level = OPTIONS[name]
            quantize_file(looped, files[name], to, accuracy_level=level)
    return files


def ensure_optimized(path: Path, level: str) -> Path:
    from loopgraph.deploy.optimize import optimize_file
    out = path.with_suffix(f".opt-{level}.onnx")
    if not out.is_file():
        optimize_file(path, out, level=level)
    return out


def load_seconds(path: Path, threads: int, opt_level: str) -> float:
    from loopgraph.runtime.session import open_session
    t0 = time.perf_counter()
    open_session(path, threads=threads, opt_level=opt_level)
    return time.perf_counter() - t0


def measure(path: Path, folder: Path, threads: int, seq: int, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds at batch 1 x seq, decode tokens/s, the greedy tokens)."""
    from loopgraph.runtime.generate import generate, open_lm
    from loopgraph.runtime.session import open_session
    lm = open_lm(open_session(path, threads=threads), folder)
    prompt = list(np.random.default_rng(0).integers(100, 40000, seq))
    generate(lm, [prompt[:8]], 2)  # warm-up
    gen = generate(lm, [prompt], new_tokens)
    return gen.prefill_seconds, gen.decode_tokens_per_second, gen.tokens[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=ROOT / "out" / "smollm2-past", help="with-past export folder (made when missing)")
    ap.add_argument("--range", default="10:20")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128, help="prefill length")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--opt-level", default="all", help="level of the optimize copies and of loading the plain files")
    ap.add_argument("--only", choices=("load", "speed"), help="run one part")
    ap.add_argument("--variants", default=",".join(PRECISIONS), help=f"comma-separated, fp32 always first (default {','.join(PRECISIONS)})")
    args = ap.parse_args(argv)
    spec = LoopSpec(*parse_range(args.range), iters=args.iters, reg="uniform", kv="exact")
    variants = ("fp32", *[v for v in args.variants.split(",") if v and v != "fp32"])
    unknown = [v for v in variants[1:] if v not in OPTIONS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(PRECISIONS)}")
    files = ensure_files(args.export, spec, variants)
    sizes = {k: p.stat().st_size for k, p in files.items()}
    print(f"SmolLM2-135M with past, looped {spec.range_str} x{spec.iters} uniform kv=exact; ORT CPU, {args.threads} threads, "
          f"median of {args.repeats}")
    print("\n| precision | file MB | vs fp32 |")
    print("|---|---|---|")
    for k, s in sizes.items():
        print(f"| {k} | {s / 1e6:.1f} | {s / sizes['fp32']:.3f} |")
    if args.only in (None, "load"):
        print(f"\n| precision | load s (plain, {args.opt_level}) | load s (optimize'd, disabled) | speed-up |")
        print("|---|---|---|---|")
        for k, p in files.items():
            opt = ensure_optimized(p, args.opt_level)
            plain = statistics.median(load_seconds(p, args.threads, args.opt_level) for _ in range(args.repeats))
            fast = statistics.median(load_seconds(opt, args.threads, "disable") for _ in range(args.repeats))
            print(f"| {k} | {plain:.2f} | {fast:.2f} | {plain / fast:.2f}x |", flush=True)
    if args.only in (None, "speed"):
        rows = {}
        for _ in range(args.repeats):
            for k, p in files.items():
                rows.setdefault(k, []).append(measure(p, args.export, args.threads, args.seq, args.new_tokens))
        base_prefill = statistics.median(r[0] for r in rows["fp32"])
        base_tps = statistics.median(r[1] for r in rows["fp32"])
        print(f"\n| precision | prefill ms (seq {args.seq}) | vs fp32 | decode tok/s | vs fp32 | same tokens as fp32 |")
        print("|---|---|---|---|---|---|")
        for k, r in rows.items():
            pre, tps = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
            same = sum(a == b for a, b in zip(r[0][2], rows["fp32"][0][2]))
            print(f"| {k} | {pre * 1e3:.0f} | {pre / base_prefill:.2f} | {tps:.1f} | {tps / base_tps:.2f}x | "
                  f"{same}/{len(r[0][2])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
