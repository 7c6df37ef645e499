"""Per-token halting (``--halt``) on the real SmolLM2-135M: iterations per token and latency against
the fixed-N files, measured side by side in one run.

    .venv/bin/loopgraph export smollm2-135m -o /tmp/lg-real       # once (no --with-past)
    .venv/bin/python benchmarks/bench_halting.py --export /tmp/lg-real [--range 12:18] [--nmax 4] [--reg uniform]
        [--quantiles 0.25,0.5,0.75] [--rounds 3] [--threads 1]
    .venv/bin/python benchmarks/bench_halting.py --export /tmp/lg-real --items arc_easy:200:0.2 --data-dir DATA   # counts only

Workloads (logits for every position, no KV cache, so the Loop may stop early):
- ``prefill``: one row of 128 tokens (the arc_easy sample questions, concatenated);
- ``scoring``: a left-padded batch of 8 arc_easy sample items (question + correct answer);
- ``scoring-right``: the same rows right-padded, as ``loopgraph eval``'s scorer batches them.

The tolerances are chosen from the data: the ``--quantiles`` of the real tokens' change at t = 2
(``rel``) of the prefill row, read from the fixed-N trace, so the printout shows which share of
tokens could freeze at once. For each workload and file: the mean iterations per real token, the
iterations the Loop ran (a batched Loop computes every token until its last real token froze, so
compute follows this count, not the per-token mean), and the CPU seconds of one forward (median
over interleaved rounds; CPU time of the process, steadier than wall time on a shared machine; wall
time printed beside it). ``at run`` interpolates the fixed files' CPU time at the iterations the
halting Loop ran (what a Loop that computes every token costs), ``at mean`` at the mean iterations per
real token (what computing only moving tokens would cost). ``live`` files (``--halt-kv live``, with the
work skipping of ``loopgraph/passes/skip.py``) should fall between them, near ``at mean`` only when the
tokens that stop early are the frozen tail or whole rows; ``held`` files (``--halt-kv held``,
``loopgraph/passes/compact.py``: an iteration computes the moving tokens only) should track ``at mean``.
The two rules freeze differently (held K/V change the later states), so each has its own mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loopgraph.eval.runner import SAMPLES_DIR  # noqa: E402
from loopgraph.eval.tasks import TASKS, load_items  # noqa: E402
from loopgraph.passes.halt import ITERATIONS_OUTPUT  # noqa: E402
from loopgraph.rewrite import rewrite  # noqa: E402
from loopgraph.runtime.inputs import left_pad, right_pad  # noqa: E402
from loopgraph.runtime.inputs import position_ids as positions  # noqa: E402
from loopgraph.runtime.session import open_session  # noqa: E402
from loopgraph.runtime.tokenizer import TextTokenizer  # noqa: E402
from loopgraph.spec import LoopSpec, parse_range  # noqa: E402


def workloads(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tok = TextTokenizer.from_folder(folder)
    items = load_items(TASKS["arc_easy"], Path(SAMPLES_DIR))
    stream: list[int] = []
    for item in items:
        stream += tok.encode(item.requests[0][0] + item.requests[item.gold or 0][1], add_special_tokens=False)
        if len(stream) >= 128:
            break
    prefill = np.array([stream[:128]], np.int64)
    rows = [tok.encode(it.requests[it.gold or 0][0] + it.requests[it.gold or 0][1]) for it in items[:8]]
    ids, mask = left_pad(rows, 0)
    return {"prefill": (prefill, np.ones_like(prefill)), "scoring": (ids, mask), "scoring-right": right_pad(rows, 0)}


def feeds(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}


def choose_tols(original: onnx.ModelProto, spec: LoopSpec, ids, mask, quantiles: list[float], threads: int) -> list[float]:
    traced = rewrite(original, dataclasses.replace(spec, trace=True)).model
    xs = open_session(traced, threads=threads).run(feeds(ids, mask), ["loopgraph/trace/x"])["loopgraph/trace/x"].astype(np.float64)
    change = np.linalg.norm(xs[1] - xs[0], axis=-1) / np.linalg.norm(xs[0], axis=-1)
    values = change[mask.astype(bool)]
    print(f"change at t = 2 (rel) of the prefill's tokens: min {values.min():.4f}, median {np.median(values):.4f}, max {values.max():.4f}")
    return [float(np.quantile(values, q)) for q in quantiles]


def iterations_on_items(original: onnx.ModelProto, spec: LoopSpec, folder: Path, task: str, data: Path, limit: int,
                        threads: int) -> None:
    """Per-token iterations of the halting file on eval items (context + each option, one row at
    a time, as eval's ``--limit`` draw with seed 1234): the mean per token and the Loop's count per row."""
    from loopgraph.eval.runner import select
    session = open_session(rewrite(original, spec).model, threads=threads)
    tok = TextTokenizer.from_folder(folder)
    per_token, per_row = [], []
    for item in select(load_items(TASKS[task], data), limit, 1234):
        for context, option in item.requests:
            ids = np.array([tok.encode(context + option)], np.int64)
            used = session.run(feeds(ids, np.ones_like(ids)), [ITERATIONS_OUTPUT])[ITERATIONS_OUTPUT][0]
            per_token += used.tolist()
            per_row.append(int(used.max()))
    counts = np.bincount(per_row, minlength=spec.iters + 1)[1:].tolist()
    print(f"{task}, {limit} items, {len(per_row)} rows, {len(per_token)} tokens, {spec.slug()}: mean iterations per token "
          f"{np.mean(per_token):.3f}; iterations the Loop ran per row: mean {np.mean(per_row):.3f}, rows per count 1..{spec.iters}: {counts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True, help="an export folder without KV cache (model.onnx, tokenizer)")
    ap.add_argument("--range", default="12:18")
    ap.add_argument("--nmax", type=int, default=4)
    ap.add_argument("--reg", default="uniform")
    ap.add_argument("--quantiles", default="0.25,0.5,0.75")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--halt-kv", default="live,held", help="the --halt-kv rules to time (comma-separated; --items counts the first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--items", metavar="TASK:LIMIT:TOL", help="only count iterations of TOL's file on eval items of TASK (no timing)")
    ap.add_argument("--data-dir", type=Path, default=Path(SAMPLES_DIR))
    args = ap.parse_args()
    if args.items:
        task, limit, tol = args.items.split(":")
        spec = LoopSpec(*parse_range(args.range), iters=args.nmax, reg=args.reg, halt=float(tol), halt_kv=args.halt_kv.split(",")[0])
        iterations_on_items(onnx.load(str(args.export / "model.onnx")), spec, args.export, task, args.data_dir, int(limit), args.threads)
        return
    print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; ORT CPU EP, {args.threads} thread(s)")
    original = onnx.load(str(args.export / "model.onnx"))
    base = LoopSpec(*parse_range(args.range), iters=args.nmax, reg=args.reg)
    work = workloads(args.export)
    tols = choose_tols(original, base, *work["prefill"], [float(q) for q in args.quantiles.split(",")], args.threads)
    specs = {f"N={n}": dataclasses.replace(base, iters=n) for n in range(1, args.nmax + 1)}
    for rule in args.halt_kv.split(","):
        specs.update({f"{rule} {q}-quantile ({t:.4f})": dataclasses.replace(base, halt=t, halt_kv=rule) for q, t in zip(args.quantiles.split(","), tols)})
    sessions = {name: open_session(rewrite(original, s).model, threads=args.threads) for name, s in specs.items()}
    del original
    for wname, (ids, mask) in work.items():
        f, real = feeds(ids, mask), mask.astype(bool)
        print(f"\n== {wname}: batch {ids.shape[0]} x {ids.shape[1]} tokens ({int(real.sum())} real)")
        its, times = {}, {name: [] for name in sessions}
        for name, s in sessions.items():  # warm-up, and the iteration counts
            out = s.run(f, None)
            its[name] = out.get(ITERATIONS_OUTPUT)
        for _ in range(args.rounds):
            for name, s in sessions.items():
                wall, cpu = time.perf_counter(), time.process_time()
                s.run(f, ["logits"])
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
        cpu = {n: statistics.median(c for c, _ in t) for n, t in times.items()}
        wall = {n: statistics.median(w for _, w in t) for n, t in times.items()}
        fixed = [cpu[f"N={n}"] for n in range(1, args.nmax + 1)]
        top = cpu[f"N={args.nmax}"]
        print(f"{'file':<28} {'mean it/token':>13} {'it run':>6} {'cpu s':>7} {'wall s':>7} {'vs N=max':>8} {'at run':>7} {'at mean':>7}")
        for name in sessions:
            if its[name] is None:
                mean, run = float(name[2:]), int(name[2:])
            else:
                mean, run = float(its[name][real].mean()), int(its[name].max())
            at_run, at_mean = (np.interp(v, range(1, args.nmax + 1), fixed) / top for v in (run, mean))
            print(f"{name:<28} {mean:13.2f} {run:6d} {cpu[name]:7.3f} {wall[name]:7.3f} {cpu[name] / top:8.2f} {at_run:7.2f} {at_mean:7.2f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
