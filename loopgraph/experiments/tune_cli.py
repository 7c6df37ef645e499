"""``loopgraph tune``. Imports nothing heavy at import time (argparse only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loopgraph.cliargs import add_halt_search_args, int_arg

DEFAULT_CACHE = Path("~/.cache/loopgraph/sweep")  # shared with sweep: confirmation scores are the same entries
DEFAULT_BATCH_TOKENS = 128  # = loopgraph.eval.scoring.DEFAULT_BATCH_TOKENS (not imported: --help needs no numpy)


def cmd_tune(args: argparse.Namespace) -> int:
    from loopgraph.experiments.tune import tune
    from loopgraph.experiments.tune_report import format_dry_run, format_summary, write_outputs
    cache_dir = None if args.no_cache else Path(args.cache_dir or DEFAULT_CACHE).expanduser()
    tasks = [t.strip() for group in args.task for t in group.split(",") if t.strip()]
    result = tune(args.model, tasks, ranges=args.ranges, stride=args.stride, iters=args.iters, regs=args.reg, halt=args.halt,
                  halt_metric=args.halt_metric, confirm=args.confirm,
                  n0=args.first_items, eta=args.eta, keep=args.keep, seed=args.seed, noise_seed=args.noise_seed, data_dir=args.data_dir,
                  metric=args.metric, tune_limit=args.tune_limit, confirm_limit=args.confirm_limit, cache_dir=cache_dir,
                  executor=args.executor, workers=args.workers, threads=args.threads, ray_address=args.ray_address,
                  max_batch_tokens=args.max_batch_tokens, significance=args.significance, oracle=args.oracle, dry_run=args.dry_run,
                  pack=not args.no_pack, progress=not args.no_progress)
    if args.dry_run:
        print(format_dry_run(result))
        return 0
    write_outputs(result, args.output, write_models=args.write_model)
    print(format_summary(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="find a loop configuration that helps on a task (fast search) and check it on held-out items",
        description="Search ranges x N x regularizers on a tuning split (successive halving on the paired gold-option "
                    "probability, scored by a per-block session chain that reuses every state cells share), then confirm the "
                    "best --confirm cells on a disjoint held-out split with the real looped graphs: delta, paired bootstrap 95%% CI, "
                    "exact McNemar p, Holm over the finalists, and a noise control of each. Writes OUT_DIR/tune.md, tune.json and "
                    "start x end heatmaps with the finalists marked; --write-model also writes a confirmed winner. "
                    "Resumable and widenable through the score cache (docs/tune.md).")
    p.add_argument("model", help="the original export (.onnx or export folder, without KV cache)")
    p.add_argument("--task", action="append", required=True, help="task to tune on (repeat or comma-separate: winogrande, arc_easy, ...)")
    p.add_argument("--ranges", default="all", help="all (every S:E, single blocks included), width=K, or S:E,S:E (default all)")
    p.add_argument("--stride", type=int_arg, default=1, help="with all/width=K: starts (and, for all, ends) on multiples of D (default 1)")
    p.add_argument("--iters", default="2,3", help="comma-separated N values (default 2,3)")
    p.add_argument("--reg", default="uniform,anchor:0.5", help="comma-separated regularizers with optional weights (default uniform,anchor:0.5)")
    add_halt_search_args(p, "search")
    p.add_argument("--confirm", type=int_arg, default=3, help="finalists checked on the held-out split (default 3)")
    p.add_argument("--first-items", type=int_arg, default=48, help="items every cell gets in the first round (default 48)")
    p.add_argument("--eta", type=int_arg, default=2, help="per round: keep 1/ETA of the cells, give them ETA times the items (default 2)")
    p.add_argument("--keep", type=int_arg, help="fewest cells a round keeps (default max(2 x --confirm, 4))")
    p.add_argument("--tune-limit", type=int_arg, help="use N tuning items drawn with --seed (default: the whole tuning split)")
    p.add_argument("--confirm-limit", type=int_arg, help="use N confirmation items drawn with --seed (default: the whole held-out split)")
    p.add_argument("--seed", type=int_arg, default=1234, help="seed of the halves, the race order, the limits and the bootstrap (default 1234)")
    p.add_argument("--noise-seed", type=int_arg, default=1234, help="seed of the noise controls (default 1234)")
    p.add_argument("--data-dir", type=Path, help="benchmarks folder (default: $LOOPGRAPH_DATA, else the samples shipped with loopgraph)")
    p.add_argument("--metric", help="acc or acc_norm (default: acc_norm where the task has it, else acc)")
    p.add_argument("--significance", type=float, default=0.05, help="level of the confirmation after Holm's correction (default 0.05)")
    p.add_argument("--oracle", action="store_true", help="also score every cell's noise control on the first round's items and "
                                                         "report the per-item headroom of cells vs noise")
    p.add_argument("--write-model", action="store_true", help="write the looped model of a confirmed winner into OUT_DIR")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--cache-dir", help=f"per-item score cache (default {DEFAULT_CACHE}, shared with sweep)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache (a rerun starts over)")
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="local process pool (default) or Ray")
    p.add_argument("--workers", type=int_arg, default=1, help="parallel jobs: local processes (1 = in this process) or local Ray CPUs")
    p.add_argument("--threads", type=int_arg, help="ONNX Runtime threads per job (default: cores / workers; 1 per Ray task)")
    p.add_argument("--ray-address", help="with --executor ray: connect to this cluster (auto, ray://host:10001)")
    p.add_argument("--max-batch-tokens", type=int_arg, default=DEFAULT_BATCH_TOKENS, help=f"rows x longest row per forward (default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--no-pack", action="store_true", help="score each option in a row of its own (default: an item's options share "
                                                          "their common context in one packed row, about half the work on HellaSwag)")
    p.add_argument("--dry-run", action="store_true", help="print the schedule and an estimated time from measured costs, score nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)
