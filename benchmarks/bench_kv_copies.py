#!/usr/bin/env python
"""What ONNX Runtime copies per decode step for each KV layout, counted in copies of the looped cache.

A toy decoder (``tests/toy.py``: 4 blocks, hidden 8, one-head attention that concatenates past and
new keys) with a very long cache (``--past``, default 1,000,000 positions: 32 MB per cache tensor), so
that moving cache bytes dominates everything else; range 1:3 looped N = 3. Variants, one decode step
each (1 new token, random cache values), interleaved, fastest of ``--repeats``:

- ``unrolled``: the standard layout, ``--unroll`` (each copy reads and writes its own pair): the floor;
- ``standard``: the standard layout in the Loop form (rotating loop-carried slots);
- ``stacked``: rank-N+1 caches, ``Gather`` of iteration t's slice + scan output;
- ``concat+gather``: ordinary pairs outside, Unsqueeze + Concat into the stacked input, Split back.

Printed: ms per step, and the time above ``unrolled`` in units of one copy of the looped cache
(the presents of the looped blocks, all iterations; timed as a numpy copy of that many bytes in the
same run). Expected from ORT's sources: standard 1 (the Loop copies its final carried values to its
outputs once), stacked 2 (Gather + scan-output concatenation), concat+gather 4 (+ Concat + Split).

    python benchmarks/bench_kv_copies.py --past 1000000 --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipelines import concat_gather_adapter  # noqa: E402
from loopgraph.rewrite import rewrite  # noqa: E402
from loopgraph.runtime.session import open_session  # noqa: E402
from loopgraph.spec import LoopSpec  # noqa: E402
from tests import toy  # noqa: E402


def feeds_for(session, past: int, iters: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {"x": rng.standard_normal((1, 1, toy.HIDDEN)).astype(np.float32)}
    for name, info in session.inputs.items():
        if name.startswith("past_key_values."):
            lead = (iters,) if len(info.shape) == 4 else ()
            feeds[name] = rng.standard_normal((*lead, 1, past, toy.HIDDEN)).astype(np.float32)
    return feeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--past", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    original = toy.model(kv=True)
    spec = LoopSpec(1, 3, iters=3, reg="uniform")
    models = {
        "unrolled": rewrite(original, LoopSpec(1, 3, iters=3, reg="uniform", unroll=True)).model,
        "standard": rewrite(original, spec).model,
        "stacked": rewrite(original, LoopSpec(1, 3, iters=3, reg="uniform", kv="stacked")).model,
        "concat+gather": concat_gather_adapter(rewrite(original, LoopSpec(1, 3, iters=3, reg="uniform", kv="stacked")).model),
    }
    rng = np.random.default_rng(0)
    runs = {}
    for name, model in models.items():
        s = open_session(model, device="cpu", threads=args.threads)
        runs[name] = (s, feeds_for(s, args.past, spec.iters, rng))
        s.run(runs[name][1])  # warm-up
    looped_bytes = 2 * 2 * spec.iters * (args.past + 1) * toy.HIDDEN * 4  # 2 blocks x (key, value) x N presents
    src = rng.standard_normal(looped_bytes // 4).astype(np.float32)
    dst = np.empty_like(src)
    times: dict[str, list[float]] = {name: [] for name in [*runs, "numpy copy"]}
    for _ in range(args.repeats):
        for name, (s, feeds) in runs.items():
            t0 = time.perf_counter()
            s.run(feeds)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times["numpy copy"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"toy decoder, range 1:3 x3, cache of {args.past:,} positions: the looped presents are {looped_bytes / 1e6:.0f} MB; "
          f"{args.threads} threads, fastest of {args.repeats} interleaved")
    print(f"  one copy of the looped cache (numpy): {1000 * best['numpy copy']:.1f} ms")
    for name in runs:
        extra = (best[name] - best["unrolled"]) / best["numpy copy"]
        print(f"  {name:<14} {1000 * best[name]:8.1f} ms/step   {extra:+5.2f} copies of the looped cache above unrolled")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
