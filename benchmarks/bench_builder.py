#!/usr/bin/env python
"""onnxruntime-genai decode tokens/s and prefill latency of SmolLM2-135M: the model builder's int4 graph,
that graph looped, and the Optimum fp32 export looped, through onnxruntime-genai, same threads, side by side.

    python benchmarks/bench_builder.py --work out/bench-builder --threads 2 --range 10:20 --iters 3

Folders made once under --work when missing: ``builder-int4`` (``loopgraph export smollm2-135m --builder genai
--precision int4``), ``builder-int4-looped/`` and ``optimum-fp32-looped/`` (``loopgraph rewrite ... -o DIR/``, the
standard-layout KV cache with genai_config.json), from ``optimum-fp32`` (``loopgraph export smollm2-135m
--with-past``). Each repeat runs the three in turn: one prompt of --prompt-tokens tokens (prefill: the time of
``append_tokens``), then exactly --new-tokens greedy tokens (decode tokens/s); medians over the repeats, after one
warm-up each. ``intra_op_num_threads`` is written into each folder's genai_config.json session options.
Printed: the figures, looped/original time ratios against the ideal from the block share
(V/L = (L + (N-1)(E-S))/L, an upper bound: embedding, lm_head and sampling do not loop), and the target
ratio builder int4 looped decode / Optimum fp32 looped decode (>= 2x). Not a test: no time is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loopgraph.spec import LoopSpec, parse_range  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
          "combined movable metal type, oil-based ink and a wooden screw press into one system. ") * 4


def prepare(work: Path, spec: LoopSpec) -> dict[str, Path]:
    from loopgraph.exporters.export import export
    from loopgraph.rewrite import rewrite
    builder, optimum = work / "builder-int4", work / "optimum-fp32"
    if not (builder / "model.onnx").is_file():
        export("smollm2-135m", builder, builder="genai", precision="int4", force=True)
    if not (optimum / "model.onnx").is_file():
        export("smollm2-135m", optimum, with_past=True, force=True)
    folders = {"builder int4": builder}
    for name, src in (("builder int4 looped", builder), ("optimum fp32 looped", optimum)):
        out = work / f"{src.name}-looped"
        if not (out / "model.onnx").is_file():
            rewrite(src / "model.onnx", spec, f"{out}/", copy_weights=True)
        folders[name] = out
    return folders


def set_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def run_once(model, og, prompt_ids, new_tokens: int) -> tuple[float, float, list[int]]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, min_length=len(prompt_ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens([prompt_ids])
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
    t2 = time.perf_counter()
    seq = list(gen.get_sequence(0))[len(prompt_ids):]
    return t1 - t0, (new_tokens - 1) / (t2 - t1), seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench-builder")
    ap.add_argument("--range", default="10:20")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import onnxruntime_genai as og
    start, end = parse_range(args.range)
    spec = LoopSpec(start, end, iters=args.iters, reg="uniform")
    folders = prepare(args.work, spec)
    models = {}
    for name, folder in folders.items():
        set_threads(folder, args.threads)
        models[name] = og.Model(str(folder))
    from transformers import AutoTokenizer  # genai's tokenizer misreads SmolLM2's GGUF-converted tokenizer.json (ids -1)
    tok = AutoTokenizer.from_pretrained(str(folders["builder int4"]))
    prompt = tok(PROMPT)["input_ids"][: args.prompt_tokens]
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in models}
    tokens = {}
    for m in models.values():  # warm-up
        run_once(m, og, prompt, 4)
    for _ in range(args.repeats):
        for name, m in models.items():
            pre, tps, seq = run_once(m, og, prompt, args.new_tokens)
            results[name].append((pre, tps))
            tokens[name] = seq
    layers = 30
    ideal = (layers + (args.iters - 1) * (end - start)) / layers
    print(f"SmolLM2-135M, onnxruntime-genai {og.__version__}, CPU, {args.threads} threads, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats (medians); loop {args.range} x{args.iters} uniform")
    med = {n: (statistics.median(p for p, _ in r), statistics.median(t for _, t in r)) for n, r in results.items()}
    for n, (pre, tps) in med.items():
        print(f"  {n:22s} prefill {pre * 1000:8.1f} ms   decode {tps:7.1f} tokens/s")
    o, lp = med["builder int4"], med["builder int4 looped"]
    print(f"  looped/original (builder int4): prefill {lp[0] / o[0]:.2f}x, decode time {o[1] / lp[1]:.2f}x; ideal from the block share {ideal:.2f}x")
    ratio = lp[1] / med["optimum fp32 looped"][1]
    print(f"  builder int4 looped decode / optimum fp32 looped decode: {ratio:.2f}x (target >= 2x)")
    print(f"  tokens equal position by position (builder int4 looped vs optimum fp32 looped): "
          f"{sum(a == b for a, b in zip(tokens['builder int4 looped'], tokens['optimum fp32 looped']))}/{args.new_tokens}")


if __name__ == "__main__":
    main()
