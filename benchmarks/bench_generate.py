#!/usr/bin/env python
"""CPU tokens/s of looped generation: loopgraph (ONNX Runtime, exact KV cache) against the same
looping in PyTorch eager under Hugging Face ``generate`` (the reference model with per-iteration
KV caches, ``loopgraph.reference.looped``), on the same number of threads, side by side.

    python benchmarks/bench_generate.py                       # SmolLM2-135M, --range 10:20 --iters 3 uniform, 2 threads
    python benchmarks/bench_generate.py --export out/smollm2-past --threads 2 --new-tokens 64 --repeats 5

The with-past export (made once into --export when missing) is rewritten with ``kv="exact"``
next to it. Each repeat runs the four generators in turn (ONNX original, ONNX looped, PyTorch
original, PyTorch looped) on one prompt, greedy, exactly --new-tokens tokens (EOS does not
stop), after one warm-up each; the figures are medians over the repeats. Printed: tokens/s,
ms/token, the looped speed-up of ORT over PyTorch (target >= 1.5x), the cost of looping in each
(original / looped time), and whether ORT and PyTorch chose the same tokens. Times are only
compared within one run: nothing here is an absolute claim about a machine.
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

DEFAULT_PROMPT = "The history of the printing press begins in the fifteenth century, when"


def ensure_export(folder: Path) -> Path:
    """A with-past export of the built-in SmolLM2 in ``folder`` (made once)."""
    if not (folder / "model.onnx").is_file():
        from loopgraph.exporters.export import export
        print(f"exporting smollm2-135m with past to {folder} ...", flush=True)
        export("smollm2-135m", folder, with_past=True, force=True, say=lambda m: None)
    return folder


def ensure_looped(folder: Path, spec: LoopSpec) -> Path:
    from loopgraph.rewrite import rewrite
    out = folder / f"model.{spec.slug()}-kv{spec.kv}.onnx"
    if not out.is_file():
        print(f"rewriting to {out.name} ...", flush=True)
        rewrite(folder / "model.onnx", spec, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=ROOT / "out" / "smollm2-past", help="with-past export folder (made when missing)")
    ap.add_argument("--range", default="10:20")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--reg", default="uniform")
    ap.add_argument("--threads", type=int, default=2, help="threads for both ORT (intra-op) and torch")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from loopgraph.exportdir import reference_dir
    from loopgraph.reference.looped import reference_generate
    from loopgraph.runtime.generate import generate, open_lm
    from loopgraph.runtime.session import open_session
    from loopgraph.runtime.tokenizer import TextTokenizer

    torch.set_num_threads(args.threads)
    folder = ensure_export(args.export)
    spec = LoopSpec(*parse_range(args.range), iters=args.iters, reg=args.reg, kv="exact")
    looped_path = ensure_looped(folder, spec)
    hf_dir = reference_dir(folder)
    if hf_dir is None:
        sys.exit(f"{folder} has no loopgraph.json pointing at the Hugging Face checkpoint; export it with loopgraph export")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()  # default attention (sdpa)
    spec = spec.resolve(model.config.num_hidden_layers)
    tok = TextTokenizer.from_folder(folder)
    prompt = tok.encode(args.prompt)
    n = args.new_tokens
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    lms = {name: open_lm(open_session(path, device="cpu", threads=args.threads), folder)
           for name, path in (("ort original", folder / "model.onnx"), ("ort looped", looped_path))}

    def ort_run(name: str, steps: int) -> list[int]:
        return generate(lms[name], [prompt], steps, eos_ids=(), pad_id=tok.pad_id).tokens[0]

    def torch_run(looped: bool, steps: int) -> list[int]:
        tokens, _ = reference_generate(model, spec if looped else None, ids, mask, steps, min_new_tokens=steps,
                                       eos_token_id=None, pad_token_id=tok.pad_id, output_logits=False)
        return tokens[0].tolist()

    runners = {
        "ort original": lambda steps: ort_run("ort original", steps),
        "ort looped": lambda steps: ort_run("ort looped", steps),
        "torch original": lambda steps: torch_run(False, steps),
        "torch looped": lambda steps: torch_run(True, steps),
    }
    print(f"SmolLM2-135M, {spec.slug()} kv=exact, prompt {len(prompt)} tokens, {n} new tokens, batch 1, "
          f"{args.threads} threads, {args.repeats} repeats (medians)", flush=True)
    for run in runners.values():
        run(4)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            tokens[name] = run(n)
            seconds[name].append(time.perf_counter() - t0)
            assert len(tokens[name]) == n, f"{name} produced {len(tokens[name])} tokens, not {n}"
    med = {name: statistics.median(s) for name, s in seconds.items()}
    for name in runners:
        print(f"  {name:<15} {n / med[name]:8.1f} tokens/s  {1000 * med[name] / n:7.1f} ms/token", flush=True)
    print(f"looped, ORT vs PyTorch eager + HF generate: {med['torch looped'] / med['ort looped']:.2f}x faster (target >= 1.5x)")
    print(f"original, ORT vs PyTorch: {med['torch original'] / med['ort original']:.2f}x faster")
    print(f"cost of looping: ORT {med['ort looped'] / med['ort original']:.2f}x, PyTorch {med['torch looped'] / med['torch original']:.2f}x "
          f"the original's time")
    for a, b in (("ort looped", "torch looped"), ("ort original", "torch original")):
        differ = np.flatnonzero(np.array(tokens[a]) != np.array(tokens[b]))
        where = f" (first difference at step {differ[0]})" if len(differ) else ""
        print(f"greedy tokens {a} vs {b}: {n - len(differ)}/{n} equal{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
