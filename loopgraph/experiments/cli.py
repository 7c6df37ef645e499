"""``loopgraph sweep`` and ``loopgraph trace``. Imports nothing heavy at import time (argparse only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loopgraph.cliargs import add_force_arg, add_halt_search_args, add_spec_args, finite_float, int_arg, seed_arg, spec_from_args
from loopgraph.spec import REGULARIZERS

DEFAULT_CACHE = Path("~/.cache/loopgraph/sweep")
SWEEP_FILES = ("sweep.csv", "sweep.json", "heatmap_N*.png")  # what write_outputs writes
TRACE_FILES = ("trajectory.png", "trace.csv", "trace.json")  # what write_trace writes
DEFAULT_BATCH_TOKENS = 128  # = loopgraph.eval.scoring.DEFAULT_BATCH_TOKENS (not imported: --help needs no numpy)


def cmd_sweep(args: argparse.Namespace) -> int:
    from loopgraph.experiments.sweep import format_dry_run, format_summary, sweep, write_outputs
    from loopgraph.onnxio import check_output_folder
    if not args.dry_run:  # before the sweep: a refused folder costs nothing
        check_output_folder(args.output, SWEEP_FILES, force=args.force)
    cache_dir = None if args.no_cache else Path(args.cache_dir or DEFAULT_CACHE).expanduser()
    result = sweep(args.model, args.task, ranges=args.ranges, stride=args.stride, iters=args.iters, regs=args.reg, halt=args.halt,
                   halt_metric=args.halt_metric, limit=args.limit,
                   seed=args.seed, data_dir=args.data_dir, split=args.split, metric=args.metric, cache_dir=cache_dir,
                   executor=args.executor, workers=args.workers, threads=args.threads, ray_address=args.ray_address,
                   max_batch_tokens=args.max_batch_tokens, significance=args.significance, dry_run=args.dry_run,
                   progress=not args.no_progress)
    if args.dry_run:
        print(format_dry_run(result))
        return 0
    write_outputs(result, args.output)
    print(format_summary(result))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from loopgraph.experiments.trace import capture, format_table, write_trace
    from loopgraph.onnxio import check_output_folder
    spec = spec_from_args(args)
    if args.output:
        check_output_folder(args.output, TRACE_FILES, force=args.force)
    trace = capture(args.model, spec, args.prompt, token=args.token, threads=args.threads)
    out = Path(args.output) if args.output else Path(f"trace.{trace.spec.slug()}")
    check_output_folder(out, TRACE_FILES, force=args.force)  # the default name is known once the range is resolved
    write_trace(trace, out)
    print(format_table(trace))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="range x N x regularizer sweep on a task: CSV of deltas vs the baseline and heatmaps",
        description="Score every requested (block range, N, regularizer) on a benchmark task and compare each with the "
                    "original model on the same items (delta, paired bootstrap 95%% CI, exact McNemar p, Holm-adjusted p). "
                    "One --dynamic rewrite per range and regularizer serves every N and weight; the baseline is scored once; "
                    "per-item scores are cached so an interrupted sweep resumes and a wider one reuses what is done. "
                    "Writes OUT_DIR/sweep.csv, sweep.json and a heatmap PNG per (N, regularizer).")
    p.add_argument("model", help="the original export (.onnx or export folder, without KV cache)")
    p.add_argument("--task", required=True, help="benchmark task, e.g. winogrande, arc_easy (see loopgraph eval --help)")
    p.add_argument("--ranges", default="all", help="all (every S:E), width=K (every S:S+K), or a list S:E,S:E (default all)")
    p.add_argument("--stride", type=int_arg, default=1, help="with all/width=K: starts (and, for all, ends) on multiples of D (default 1)")
    p.add_argument("--iters", default="2,3", help="comma-separated N values (default 2,3)")
    p.add_argument("--reg", default="uniform", help=f"comma-separated regularizers, optionally with a weight: "
                                                    f"uniform,naive,anchor:0.3,damped:4 (from {', '.join(REGULARIZERS)}; default uniform)")
    add_halt_search_args(p, "sweep")
    p.add_argument("--limit", type=int_arg, help="score N items drawn at random with --seed (default: all)")
    p.add_argument("--seed", type=seed_arg, default=1234, help="seed of --limit's draw and of the bootstrap (default 1234)")
    p.add_argument("--data-dir", type=Path, help="benchmarks folder (default: $LOOPGRAPH_DATA, else the samples shipped with loopgraph)")
    p.add_argument("--split", default="dev", choices=["dev", "reported"],
                   help="dev: the tuning _dev file where the data has one (ARC, OpenBookQA), else the task's file; "
                        "reported: the split lm-eval reports (default dev)")
    p.add_argument("--metric", help="acc or acc_norm (default: acc_norm where the task has it, else acc)")
    p.add_argument("--significance", type=finite_float, default=0.05, help="McNemar level for the marked cells (default 0.05)")
    p.add_argument("-o", "--output", default="sweep-out", help="output folder (default ./sweep-out)")
    add_force_arg(p, "sweep.csv, sweep.json and heatmaps in the output folder")
    p.add_argument("--cache-dir", help=f"per-item score cache (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="local process pool (default) or Ray")
    p.add_argument("--workers", type=int_arg, default=1,
                   help="parallel jobs: processes of the local pool (1 = in this process), or the CPUs of a local Ray instance (default 1)")
    p.add_argument("--threads", type=int_arg, help="ONNX Runtime threads per job (default: cores / workers; 1 per Ray task)")
    p.add_argument("--ray-address", help="with --executor ray: connect to this cluster (auto, ray://host:10001) instead of starting one")
    p.add_argument("--max-batch-tokens", type=int_arg, default=DEFAULT_BATCH_TOKENS,
                   help=f"cap on rows x longest row per forward pass (default {DEFAULT_BATCH_TOKENS}, as loopgraph eval)")
    p.add_argument("--dry-run", action="store_true", help="print the cell count and an estimated time (measures one batch), score nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "trace", help="hidden state at every block boundary and loop iteration: PCA trajectory PNG, similarity and logit-lens table",
        description="Rewrite MODEL in memory with per-iteration trace outputs, run it and the original on one prompt, and write "
                    "DIR/trajectory.png (the residual stream across depth on the baseline's first two principal components, "
                    "baseline and looped paths), DIR/trace.csv (per iteration: cosine and norm ratio to the non-looped state r, "
                    "logit-lens top-5 tokens) and DIR/trace.json.")
    p.add_argument("model", help="the original export (.onnx or export folder, without KV cache)")
    add_spec_args(p)
    p.add_argument("--prompt", "-p", required=True, help="prompt text")
    p.add_argument("--token", type=int, default=-1, help="which token position to follow (default -1, the last)")
    p.add_argument("--threads", type=int_arg, help="ONNX Runtime threads")
    p.add_argument("-o", "--output", help="output folder (default ./trace.<slug>)")
    add_force_arg(p, "trajectory.png, trace.csv and trace.json in the output folder")
    p.set_defaults(func=cmd_trace)
