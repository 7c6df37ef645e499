"""Speed and memory of export, inspect and rewrite on the real SmolLM2-135M, and ORT CPU latency of
the original vs the Loop and unrolled forms. Ratios are measured side by side in one run.

    .venv/bin/python benchmarks/bench_graph.py [--workdir /tmp/lg-bench] [--threads 2] [--repeats 15]

Each measured command runs in its own process so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PY = sys.executable


def measure(code: str) -> tuple[float, float, str]:
    """Run ``code`` in a fresh interpreter: (wall seconds, peak RSS MB, stdout)."""
    script = ("import resource, time, sys\nt0 = time.perf_counter()\n" + code +
              "\nprint('@@', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("@@")][-1].split()
    return float(line[1]), float(line[2]), out


def baseline_rss() -> float:
    return measure("import onnx, onnx_graphsurgeon, numpy, loopgraph")[1]


def latency(path: Path, feeds: dict, threads: int, repeats: int) -> list[float]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        s.run(["logits"], feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(["logits"], feeds)
        times.append(time.perf_counter() - t)
    return times


def matmul_share(path: Path, start: int, end: int) -> float:
    """Fraction of the per-token matmul work spent in blocks [start, end) (weights elements)."""
    import onnx

    from loopgraph.passes.blocks import find_blocks
    from loopgraph.passes.dataflow import GraphIndex
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    index = GraphIndex(model.graph)
    blocks = find_blocks(model)
    in_range = index.between(blocks.blocks[start].input, [blocks.blocks[end - 1].output])
    # a weight may reach its MatMul through a Transpose (the tied unembedding): look one op back
    via = {o: n.input[0] for n in model.graph.node if n.op_type in ("Transpose", "Identity", "Cast") for o in n.output}
    total = ranged = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("MatMul", "Gemm"):
            w = sum(sizes.get(t, sizes.get(via.get(t, ""), 0)) for t in node.input)
            total += w
            ranged += w if i in in_range else 0
    return ranged / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lg-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--only", choices=["all", "latency"], default="all", help="latency: reuse WORKDIR/smollm2 and time only")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    exp = work / "smollm2"
    res: dict = {}

    if args.only == "latency":
        return latencies(exp / "model.onnx", exp, args, res, work)
    # 1. export
    t, rss, _ = measure(f"from loopgraph.exporters.export import export; export('smollm2-135m', {str(exp)!r}, force=True, say=lambda m: None)")
    res["export_s"], res["export_rss_mb"] = t, rss
    model = exp / "model.onnx"
    weights_mb = model.stat().st_size / 1e6
    print(f"export smollm2-135m: {t:.1f} s, peak RSS {rss:.0f} MB (model.onnx {weights_mb:.0f} MB)")

    # 2. inspect, inline and with external data
    ext_dir = work / "external"
    ext_dir.mkdir(exist_ok=True)
    measure(f"import onnx; m = onnx.load({str(model)!r}); onnx.save_model(m, {str(ext_dir / 'model.onnx')!r}, save_as_external_data=True, "
            "location='model.onnx.data')")
    base = baseline_rss()
    for label, p in (("inline", model), ("external", ext_dir / "model.onnx")):
        t, rss, _ = measure(f"from loopgraph.deploy.describe import describe; describe({str(p)!r})")
        res[f"inspect_{label}_s"], res[f"inspect_{label}_rss_mb"] = t, rss
        print(f"inspect ({label}): {t:.2f} s, peak RSS {rss:.0f} MB (interpreter + libraries alone: {base:.0f} MB; weights {weights_mb:.0f} MB)")

    # 3. rewrite vs a bare onnx.load + onnx.save round trip
    t_rt, rss_rt, _ = measure(f"import onnx; m = onnx.load({str(model)!r}); onnx.save(m, {str(work / 'roundtrip.onnx')!r})")
    spec = "LoopSpec(10, 20, iters=3, reg='uniform')"
    t_rw, rss_rw, _ = measure(f"from loopgraph import rewrite, LoopSpec; rewrite({str(model)!r}, {spec}, {str(exp / 'looped.onnx')!r})")
    t_rwe, rss_rwe, _ = measure(f"from loopgraph import rewrite, LoopSpec; rewrite({str(ext_dir / 'model.onnx')!r}, {spec}, "
                                f"{str(ext_dir / 'looped.onnx')!r})")
    res.update(roundtrip_s=t_rt, roundtrip_rss_mb=rss_rt, rewrite_s=t_rw, rewrite_rss_mb=rss_rw, rewrite_external_s=t_rwe,
               rewrite_external_rss_mb=rss_rwe)
    print(f"onnx.load+save round trip: {t_rt:.1f} s, {rss_rt:.0f} MB | rewrite 10:20 x3 (inline): {t_rw:.1f} s ({t_rw / t_rt:.2f}x), "
          f"{rss_rw:.0f} MB ({rss_rw / rss_rt:.2f}x) | rewrite (external data): {t_rwe:.1f} s, {rss_rwe:.0f} MB")
    print(f"file sizes: original {model.stat().st_size:,} B, looped {(exp / 'looped.onnx').stat().st_size:,} B "
          f"({(exp / 'looped.onnx').stat().st_size / model.stat().st_size - 1:+.4%})")

    latencies(model, exp, args, res, work)


def latencies(model: Path, exp: Path, args: argparse.Namespace, res: dict, work: Path) -> None:
    """ORT CPU latency, batch 1, seq 128: original, Loop N = 1..4, unrolled N = 1..4."""
    from loopgraph import LoopSpec, rewrite
    variants = {"original": model}
    for n in (1, 2, 3, 4):
        for unroll in (False, True):
            p = exp / f"{'unrolled' if unroll else 'loop'}{n}.onnx"
            rewrite(model, LoopSpec(10, 20, iters=n, unroll=unroll), p)
            variants[p.stem] = p
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (1, args.seq))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(args.seq)[None]}
    loads = {}
    for name, p in variants.items():
        t = time.perf_counter()
        latency(p, feeds, args.threads, 0)
        loads[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):  # interleave rounds so drift hits every variant alike
        for name, p in variants.items():
            times[name] += latency(p, feeds, args.threads, max(1, args.repeats // 3))
    med = {k: statistics.median(v) for k, v in times.items()}
    share = matmul_share(model, 10, 20)
    print(f"\nORT CPU latency, batch 1, seq {args.seq}, {args.threads} threads (median of {args.repeats}); "
          f"blocks 10:20 hold {share:.1%} of the matmul work")
    print(f"{'variant':<12} {'ms':>8} {'vs original':>12} {'ideal':>7} {'load s':>7} {'file MB':>8}")
    for name in variants:
        n = int(name[-1]) if name != "original" else 1
        ideal = 1 + (n - 1) * share
        print(f"{name:<12} {med[name] * 1e3:>8.1f} {med[name] / med['original']:>12.3f} {ideal:>7.3f} {loads[name]:>7.2f} "
              f"{variants[name].stat().st_size / 1e6:>8.1f}")
    for n in (1, 2, 3, 4):
        print(f"Loop / unrolled at N = {n}: {med[f'loop{n}'] / med[f'unrolled{n}']:.3f}")
    res.update(latency_ms={k: v * 1e3 for k, v in med.items()}, load_s=loads, matmul_share=share)
    (work / "bench_graph.json").write_text(json.dumps(res, indent=2))
    print(f"\nraw figures: {work / 'bench_graph.json'}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
