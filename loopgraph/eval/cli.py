"""``loopgraph eval``: zero-shot benchmarks with lm-eval conventions, baseline vs looped with paired statistics.

Imports nothing heavy at import time (argparse only), so ``loopgraph --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loopgraph.cliargs import add_force_arg, int_arg, seed_arg

DEFAULT_CACHE = Path("~/.cache/loopgraph/eval")
DEFAULT_BATCH_TOKENS = 128  # = loopgraph.eval.scoring.DEFAULT_BATCH_TOKENS (not imported: numpy is not needed for --help)
_TASK_NAMES = ("arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa, sciq (validation), "
               "lambada_openai, wikitext")


def cmd_eval(args: argparse.Namespace) -> int:
    from loopgraph.eval.report import comparisons, format_text, to_json, write_items, write_json
    from loopgraph.eval.runner import evaluate
    from loopgraph.eval.tasks import parse_tasks
    from loopgraph.onnxio import check_output
    for flag, out in (("--json", args.json), ("--items", args.items)):
        if out is not None:
            check_output(out, force=args.force, what=flag)  # before the scoring, not after it
    tasks = parse_tasks(args.tasks)
    cache_dir = None if args.no_cache else Path(args.cache_dir or DEFAULT_CACHE).expanduser()
    report = evaluate(args.models, tasks, data_dir=args.data_dir, limit=args.limit, seed=args.seed, cache_dir=cache_dir,
                      device=args.device, threads=args.threads, max_batch_tokens=args.max_batch_tokens,
                      max_length=args.max_length, noise_control=args.noise_control, original=args.original,
                      progress=not args.no_progress)
    comps = comparisons(report, seed=args.seed)
    print(format_text(report, comps))
    if args.json:
        write_json(to_json(report, comps), args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.items:
        n = write_items(report, args.items)
        print(f"wrote {n} per-item lines to {args.items}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from loopgraph.runtime.session import add_runtime_args  # its DEVICES check --device (numpy/onnx, no torch)
    p = sub.add_parser(
        "eval", help="zero-shot benchmarks (lm-eval conventions), baseline vs looped with paired statistics",
        description="Score ONNX models on zero-shot benchmarks exactly as lm-evaluation-harness does and compare them on "
                    "the same items: per task each model's acc/acc_norm (± stderr), and for every model against the first "
                    "the delta with a paired bootstrap 95%% interval and an exact McNemar p-value. "
                    f"Tasks: {_TASK_NAMES}.")
    p.add_argument("models", nargs="+", help=".onnx files or export folders; the first is the baseline")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. arc_easy,winogrande")
    p.add_argument("--data-dir", type=Path, help="benchmarks folder in the documented JSONL layout "
                                                 "(default: $LOOPGRAPH_DATA, else the samples shipped with loopgraph)")
    p.add_argument("--limit", type=int_arg, help="evaluate N items per task, drawn at random with --seed (default: all)")
    p.add_argument("--seed", type=seed_arg, default=1234, help="seed of --limit's draw, the bootstrap and --noise-control (default 1234)")
    p.add_argument("--noise-control", action="store_true",
                   help="also evaluate a noise variant of each looped model: same-norm random perturbation instead of looping's shift")
    p.add_argument("--json", metavar="PATH", help="write config, versions, timing, per-task metrics and comparisons as JSON")
    p.add_argument("--items", metavar="PATH", help="write per-item results (log-likelihoods, correctness) as JSONL")
    add_force_arg(p, "--json or --items file")
    p.add_argument("--original", metavar="ONNX", help="with --noise-control: the export the looped models were rewritten from "
                                                      "(default: the one each records, if confined and its digest matches)")
    p.add_argument("--cache-dir", help=f"where per-item scores are kept so interrupted runs resume (default {DEFAULT_CACHE})")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")
    p.add_argument("--max-batch-tokens", type=int_arg, default=DEFAULT_BATCH_TOKENS,
                   help=f"cap on rows x widest row per forward pass; bounds the logits held in memory (default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--max-length", type=int_arg, help="context window in tokens (default: the model config's, as lm-eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_args(p, session_options=False)
    p.set_defaults(func=cmd_eval)
