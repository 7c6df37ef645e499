#!/usr/bin/env python
"""Memory of the exact KV cache of a looped with-past model against the original's.

    python benchmarks/bench_kv_memory.py                       # SmolLM2-135M, --range 10:20 --iters 3, lengths 64 512 2048
    python benchmarks/bench_kv_memory.py --export out/smollm2-past --batch 4 --lengths 128 1024

With ``kv="exact"`` every looped block keeps one cache per iteration, so the cache should grow
from L blocks' worth to L + (E - S) * (N - 1) blocks' worth (SmolLM2, 10:20, N = 3: 50/30 =
1.67x). For each length the script runs a prefill of that many tokens through the original and
the looped model (ONNX Runtime, CPU) and sums the bytes of the ``present.*`` outputs — the cache
a generation loop holds and feeds back — and prints them with the expected ratio. It also
prints the process's peak resident memory after each model's runs (ORT's arena included; a
coarse figure: the weights dominate it at short lengths).
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.bench_generate import ensure_export, ensure_looped  # noqa: E402
from loopgraph.spec import LoopSpec, parse_range  # noqa: E402


def cache_bytes(path: Path, folder: Path, batch: int, length: int, threads: int) -> tuple[int, dict[int, int]]:
    """Total bytes of the present outputs after a prefill of ``length`` tokens, and the rank of
    each present's shape -> how many presents have it."""
    from loopgraph.runtime.generate import open_lm
    from loopgraph.runtime.inputs import position_ids
    from loopgraph.runtime.session import open_session
    lm = open_lm(open_session(path, device="cpu", threads=threads), folder)
    ids = np.random.default_rng(0).integers(100, 10000, (batch, length))
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), **lm.initial_past(batch)}
    out = lm.session.run(feeds, [s.present for s in lm.slots])
    ranks: dict[int, int] = {}
    for a in out.values():
        ranks[a.ndim] = ranks.get(a.ndim, 0) + 1
    return sum(a.nbytes for a in out.values()), ranks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=ROOT / "out" / "smollm2-past", help="with-past export folder (made when missing)")
    ap.add_argument("--range", default="10:20")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--reg", default="uniform")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import json
    folder = ensure_export(args.export)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    spec = LoopSpec(*parse_range(args.range), iters=args.iters, reg=args.reg, kv="exact").resolve(layers)
    looped = ensure_looped(folder, spec)
    expected = (layers + (spec.end - spec.start) * (spec.iters - 1)) / layers
    print(f"KV cache (present.* after a prefill), batch {args.batch}, {spec.slug()} kv=exact on {layers} blocks; "
          f"expected ratio ({layers} + {spec.end - spec.start} x {spec.iters - 1}) / {layers} = {expected:.3f}")
    print(f"{'tokens':>7} {'original MiB':>13} {'looped MiB':>11} {'ratio':>7}")
    rows = []
    for length in args.lengths:
        orig, _ = cache_bytes(folder / "model.onnx", folder, args.batch, length, args.threads)
        loop, ranks = cache_bytes(looped, folder, args.batch, length, args.threads)
        rows.append(loop / orig)
        print(f"{length:>7} {orig / 2**20:>13.2f} {loop / 2**20:>11.2f} {loop / orig:>7.3f}   (looped presents by rank: {ranks})", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"measured ratio {min(rows):.3f}..{max(rows):.3f} vs expected {expected:.3f}; process peak RSS {peak:.0f} MiB")
    return 0 if all(abs(r - expected) < 1e-9 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
