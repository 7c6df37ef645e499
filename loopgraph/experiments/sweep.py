"""Range x N x regularizer sweeps on a benchmark task: accuracy and paired delta vs the baseline per cell.

Efficient by construction:

- **One rewrite per (range, regularizer).** The rewrite is ``dynamic``: N and alpha/K are graph
  inputs, so one in-memory rewrite and one ORT session score every N and weight of a
  :class:`~loopgraph.experiments.grid.Unit`. Nothing is written to disk.
- **The baseline is scored once**, and every cell is compared with it item by item.
- **Tokenized once.** The driver tokenizes the items and sends token ids to the workers.
- **Cached per item of each cell** (:class:`loopgraph.eval.cache.ScoreCache`, SQLite): the key is
  the original model's key (its file, tokenizer, config, max_length), the cell (range, regularizer,
  weight, N) and the loopgraph version, plus the item's text. A resumed sweep skips finished cells
  (no rewrite, no session), a wider sweep (more ranges, more N, a larger ``--limit``) scores only
  what is new. Workers return scores to the driver, which writes the cache as each unit finishes
  (so a Ray cluster needs no shared file system for the cache; an interrupted unit is redone).
- **Parallel**: units run inline (``workers=1``), on a local process pool, or on Ray.

Handled: exports without KV cache (``.onnx`` or export folder), multiple-choice and
``lambada_openai`` tasks (binary per-item metrics ``acc``/``acc_norm``), the tuning ``_dev`` split
where the data folder has one (``split="dev"``, default), ``--limit`` as a seeded subset.
Refused: a model that is already looped, a with-past export, perplexity tasks (no per-item
accuracy), a metric the task does not have, an unknown executor, workers/threads below 1.

Outputs (``write_outputs``): ``sweep.csv`` (one row per cell), ``sweep.json`` (config, baseline,
timing and work counts) and one heatmap PNG per (N, regularizer).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loopgraph._version import __version__
from loopgraph.errors import LoopgraphError
from loopgraph.eval.cache import ScoreCache, item_key
from loopgraph.eval.encoding import TokenRequest, encode_pair
from loopgraph.eval.metrics import BINARY, item_metrics
from loopgraph.eval.scoring import DEFAULT_BATCH_TOKENS, Score, score_groups
from loopgraph.eval.stats import compare_paired
from loopgraph.eval.tasks import MULTIPLE_CHOICE, Item, Task, get_task, load_items
from loopgraph.experiments.grid import Cell, Unit, format_duration, group_units, make_cells, parse_halts, parse_iters, parse_ranges, parse_regs
from loopgraph.experiments.plots import HeatCell, HeatmapTitle, heatmaps
from loopgraph.exportdir import model_title
from loopgraph.onnxio import atomic_path

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")
SPLITS = ("dev", "reported")
CACHE_NAMESPACE = "loopgraph-sweep-v1"
CSV_FIELDS = ("task", "split", "metric", "start", "end", "width", "iters", "reg", "weight", "halt", "halt_metric", "n", "value", "baseline", "delta",
              "ci95_lo", "ci95_hi", "p_mcnemar", "p_holm", "gained", "lost", "significant")
Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- the task and its items -------------------------------------------------------------------

def sweep_task(name: str, data_dir: Path, split: str = "dev") -> tuple[Task, str]:
    """The task, reading its tuning ``_dev`` file instead of ``_test`` when ``split="dev"`` and
    the data folder has one (ARC, OpenBookQA). Returns the task and the split's label."""
    if split not in SPLITS:
        raise LoopgraphError(f"--split {split!r}: choose dev (tuning files where they exist) or reported (what lm-eval scores)")
    task = get_task(name)
    if task.output_type != MULTIPLE_CHOICE and "acc" not in task.metrics:
        raise LoopgraphError(f"{name} has no per-item accuracy ({', '.join(task.metrics)}), so there is no paired delta to map; "
                             "sweep a multiple-choice task such as winogrande or arc_easy")
    first = task.files[0]
    dev = first.replace("_test.jsonl", "_dev.jsonl")
    if split == "dev" and dev != first and (Path(data_dir) / dev).is_file():
        return dataclasses.replace(task, files=(dev, *task.files[1:]), split="validation (tuning _dev file)"), "dev"
    return task, task.split


def default_metric(task: Task) -> str:
    """``acc_norm`` where the task has it (ARC, HellaSwag, PIQA, OpenBookQA), else ``acc``."""
    return "acc_norm" if "acc_norm" in task.metrics else "acc"


def tokenize(items: Sequence[Item], folder: Path) -> list[list[TokenRequest]]:
    """Token requests per item with the export folder's tokenizer (as ``loopgraph eval`` does)."""
    from loopgraph.runtime.tokenizer import TextTokenizer
    tok = TextTokenizer.from_folder(folder, "the benchmark text")
    prefix = tok.prefix_token_id()
    return [[encode_pair(c, x, tok.encode, prefix) for c, x in it.requests] for it in items]


# --- cache keys -------------------------------------------------------------------------------

def cell_key(model_key: str, cell: Cell | None) -> str:
    """Cache key of a cell's scores (``None``: the baseline) for the original model ``model_key``."""
    what = "baseline" if cell is None else json.dumps(cell.key())
    return hashlib.sha256(f"{CACHE_NAMESPACE}\0{__version__}\0{model_key}\0{what}".encode()).hexdigest()


# --- jobs (what a worker runs) ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: the baseline (``unit=None``) or one rewrite scoring several cells.
    ``groups`` are the token requests of the items any cell still needs; ``todo[c]`` are the
    positions in ``groups`` cell c must score (for the baseline: one entry)."""
    model: str
    unit: Unit | None
    groups: tuple[tuple[TokenRequest, ...], ...]
    todo: tuple[tuple[int, ...], ...]
    max_length: int
    threads: int | None
    max_batch_tokens: int


@dataclasses.dataclass(frozen=True)
class JobResult:
    scores: tuple[tuple[tuple[Score, ...], ...], ...]  # per cell, per todo item, per request
    setup_seconds: float  # load + rewrite + session
    score_seconds: float
    tokens: int  # ids fed


@functools.lru_cache(maxsize=1)
def _original(path: str, mtime_ns: int):
    """The original model with its weights, loaded once per worker process and kept for its next
    jobs (a worker runs the baseline and many units of the same model; loading SmolLM2 takes
    seconds). ``path`` is the resolved .onnx file the driver put in the job."""
    from loopgraph.onnxio import load_model
    return load_model(path, load_weights=True)


def _feed_dtype(type_name: str):
    return np.float16 if type_name == "tensor(float16)" else np.float64 if type_name == "tensor(double)" else np.float32


def cell_feeds(cell, lm) -> dict[str, np.ndarray]:
    """A looped cell's inputs to its rewrite's session ``lm``: N, and the regularizer's weight if it has one."""
    from loopgraph.passes.loop import ITERS_NAME, param_name
    feeds = {ITERS_NAME: np.array(cell.iters, np.int64)}
    param = param_name(cell.reg.name)
    if param is not None:
        feeds[param] = np.array(cell.reg.weight, _feed_dtype(lm.session.inputs[param].type))
    return feeds


def run_job(job: Job) -> JobResult:
    """Score a job's cells (a worker's entry point: local, process pool or Ray)."""
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.logits import LogitsSession

    t0 = time.perf_counter()
    original = _original(job.model, os.stat(job.model).st_mtime_ns)
    if job.unit is None:
        lm = LogitsSession(original, threads=job.threads)
        cells_feeds: list[dict[str, np.ndarray]] = [{}]
    else:
        lm = LogitsSession(rewrite(original, job.unit.spec()).model, threads=job.threads)
        cells_feeds = [cell_feeds(cell, lm) for cell in job.unit.cells]
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens = 0
    out = []
    for feeds, todo in zip(cells_feeds, job.todo):
        def forward(ids: np.ndarray, mask: np.ndarray, at: np.ndarray, feeds=feeds) -> np.ndarray:
            return lm.logits_at(ids, mask, at, feeds)

        def count(done: int, total: int) -> None:
            nonlocal tokens
            if done == total:
                tokens += total
        scores = score_groups([job.groups[i] for i in todo], forward, max_length=job.max_length,
                              max_batch_tokens=job.max_batch_tokens, on_batch=count) if todo else []
        out.append(tuple(tuple(s) for s in scores))
    return JobResult(tuple(out), setup, time.perf_counter() - t1, tokens)


# --- executors --------------------------------------------------------------------------------

def execute(jobs: Sequence[Job], on_result: Callable[[Job, JobResult], None], *, executor: str = "local", workers: int = 1,
            ray_address: str | None = None, fn: Callable | None = None) -> None:
    """Run ``jobs`` and call ``on_result`` in the driver as each finishes (in completion order).

    ``local``: in this process when ``workers == 1``, else a process pool (spawned processes,
    ``workers`` of them). ``ray``: one Ray task per job asking for ``job.threads`` CPUs, on the
    running Ray instance if this process has one, else on ``ray_address`` (``auto``, ``ray://...``),
    else on a local instance of ``workers`` CPUs that is shut down afterwards. ``fn``: the
    worker's entry point (default :func:`run_job`; ``tune`` passes its own, a module-level function)."""
    fn = fn or run_job
    if executor not in EXECUTORS:
        raise LoopgraphError(f"--executor {executor!r}: choose local or ray")
    if workers < 1:
        raise LoopgraphError(f"--workers {workers} must be at least 1")
    if executor == "ray":
        _execute_ray(jobs, on_result, workers, ray_address, fn)
    elif workers == 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(job, fn(job))
    else:
        _execute_pool(jobs, on_result, workers, fn)


def _execute_pool(jobs: Sequence[Job], on_result: Callable[[Job, JobResult], None], workers: int, fn: Callable) -> None:
    """A process pool that dies with its driver: an interrupt (Ctrl-C, or SIGTERM under the CLI's
    :func:`~loopgraph.cli.sigterm_interrupts`) or a failed job terminate the workers at once instead of
    letting each finish the job in hand (minutes of CPU nobody would store)."""
    import concurrent.futures as cf
    import multiprocessing
    # spawn, not fork: the driver may hold ORT thread pools, which do not survive a fork
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(fn, job): job for job in jobs}
        for future in cf.as_completed(futures):
            on_result(futures[future], future.result())
    except BaseException:
        # no public way to stop running workers before Python 3.14's terminate_workers()
        for process in list((pool._processes or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _execute_ray(jobs: Sequence[Job], on_result: Callable[[Job, JobResult], None], workers: int, address: str | None,
                 fn: Callable = run_job) -> None:
    try:
        import ray
    except ImportError:
        raise LoopgraphError("--executor ray needs Ray; pip install 'loopgraph[experiments]' (or pip install ray)") from None
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        except ConnectionError as e:
            raise LoopgraphError(f"--ray-address {address}: cannot connect ({e}); start the cluster or drop --ray-address "
                                 "for a local instance") from None
        started = True
    try:
        task = ray.remote(fn)
        refs = {task.options(num_cpus=job.threads or 1).remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_result(refs[done[0]], ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


# --- the sweep --------------------------------------------------------------------------------

@dataclasses.dataclass
class SweepRow:
    cell: Cell
    value: float
    baseline: float
    delta: float
    ci95: tuple[float, float]
    p_mcnemar: float
    p_holm: float
    gained: int
    lost: int
    n: int
    significant: bool


@dataclasses.dataclass
class SweepResult:
    model: Path
    task: Task
    split: str
    metric: str
    num_blocks: int
    baseline: float  # metric of the original model
    n: int  # items scored
    rows: list[SweepRow]  # one per cell, in cell order (empty for a dry run)
    cells: int
    units: int
    cells_cached: int  # cells whose scores were all in the cache
    cells_computed: int
    rewrites: int  # units run (each one in-memory rewrite and one session)
    tokens: int  # ids fed by this run
    seconds: float
    setup_seconds: float  # summed over jobs: load, rewrite, session
    score_seconds: float  # summed over jobs
    config: dict
    estimate: dict | None = None  # dry run: the estimated time and what it rests on


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1), in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [1.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def sweep(model: str | os.PathLike, task: str, *, ranges: str = "all", stride: int = 1, iters: str = "2,3",
          regs: str = "uniform", halt: str | None = None, halt_metric: str = "rel", limit: int | None = None, seed: int = 1234,
          data_dir: Path | None = None, split: str = "dev",
          metric: str | None = None, cache_dir: Path | None = None, executor: str = "local", workers: int = 1,
          threads: int | None = None, ray_address: str | None = None, max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
          significance: float = 0.05, dry_run: bool = False, progress: bool = True, say: Say = _stderr) -> SweepResult:
    """Score every (range, N, regularizer, halting) of a sweep and compare each with the baseline.

    ``ranges``/``stride``/``iters``/``regs``/``halt`` follow :mod:`loopgraph.experiments.grid`. ``threads``:
    ORT intra-op threads per job (default: the cores divided by ``workers`` for local runs, 1 per
    Ray task). ``dry_run``: count the cells, measure the baseline's speed on one batch and the
    cost of one rewrite + session, and estimate the time; nothing is scored or written."""
    from loopgraph.eval.runner import data_dir_default, open_model, select
    from loopgraph.onnxio import load_model, resolve_model_path
    from loopgraph.passes.blocks import find_blocks

    t0 = time.perf_counter()
    if threads is not None and threads < 1:
        raise LoopgraphError(f"--threads {threads} must be at least 1")
    if workers < 1:
        raise LoopgraphError(f"--workers {workers} must be at least 1")
    if executor not in EXECUTORS:
        raise LoopgraphError(f"--executor {executor!r}: choose local or ray")
    if not 0 < significance < 1:
        raise LoopgraphError(f"--significance {significance} must be between 0 and 1, e.g. 0.05")
    data_dir = Path(data_dir) if data_dir is not None else data_dir_default()
    the_task, split_label = sweep_task(task, data_dir, split)
    metric = metric or default_metric(the_task)
    if metric not in BINARY or metric not in the_task.metrics:
        raise LoopgraphError(f"--metric {metric} is not a per-item accuracy of {task}; choose from "
                             f"{', '.join(m for m in the_task.metrics if m in BINARY)}")
    iter_values, reg_values, halt_values = parse_iters(iters), parse_regs(regs), parse_halts(halt, halt_metric)
    path = resolve_model_path(model)  # jobs get this path; each worker loads the model once (_original)
    # with one local worker every job runs here: load the weights now, once, for this look at the graph and for the jobs
    header = _original(str(path), path.stat().st_mtime_ns) if executor == "local" and workers == 1 else load_model(path)
    base = open_model(path, header=header)
    if base.spec is not None:
        raise LoopgraphError(f"{base.path} is already looped ({base.spec.slug()}); sweep the original export (model.onnx)")
    blocks = find_blocks(header)
    del header
    cells = make_cells(parse_ranges(ranges, len(blocks), stride), iter_values, reg_values, halt_values, halt_metric)
    units = group_units(cells)
    items = select(load_items(the_task, data_dir), limit, seed)
    groups = tokenize(items, base.path.parent)
    if threads is None:
        threads = 1 if executor == "ray" else max(1, (os.cpu_count() or 1) // workers)

    cache = ScoreCache(cache_dir)
    try:
        keys = {None: cell_key(base.key, None), **{c: cell_key(base.key, c) for c in cells}}
        item_keys = {c: [item_key(k, it.requests) for it in items] for c, k in keys.items()}
        scores: dict[Cell | None, dict[int, list[Score]]] = {}
        for c, ks in item_keys.items():
            found = cache.get(ks)
            scores[c] = {i: found[k] for i, k in enumerate(ks) if k in found}
        missing = {c: [i for i in range(len(items)) if i not in scores[c]] for c in keys}
        jobs = _jobs(str(base.path), units, missing, groups, base.max_length, threads, max_batch_tokens)
        cached = sum(1 for c in cells if not missing[c])
        config = {"model": str(base.path), "task": the_task.name, "split": split_label, "data_file": the_task.files[0],
                  "metric": metric, "ranges": ranges, "stride": stride, "iters": iter_values, "regs": [r.label for r in reg_values],
                  **({} if halt is None else {"halt": halt_values, "halt_metric": halt_metric}),
                  "limit": limit, "seed": seed, "items": len(items), "executor": executor, "workers": workers, "threads": threads,
                  "max_batch_tokens": max_batch_tokens, "significance": significance, "cache": None if cache.path is None else str(cache.path),
                  "loopgraph": __version__}
        if dry_run:
            estimate = _estimate(jobs, len(blocks), workers, say)
            return SweepResult(base.path, the_task, split_label, metric, len(blocks), math.nan, len(items), [], len(cells), len(units),
                               cached, 0, 0, 0, time.perf_counter() - t0, 0.0, 0.0, config, estimate)

        bar = _CellBar(progress, len(cells) + 1, cached + (0 if missing[None] else 1))
        totals = {"tokens": 0, "setup": 0.0, "score": 0.0}

        def on_result(job: Job, result: JobResult) -> None:
            job_cells: list[Cell | None] = [None] if job.unit is None else list(job.unit.cells)
            for cell, cell_scores in zip(job_cells, result.scores):
                # the k-th result of a cell is its k-th missing item (see _jobs)
                new = {i: list(s) for i, s in zip(missing[cell], cell_scores)}
                cache.put({item_keys[cell][i]: s for i, s in new.items()})
                scores[cell].update(new)
            totals["tokens"] += result.tokens
            totals["setup"] += result.setup_seconds
            totals["score"] += result.score_seconds
            bar.update(len(job_cells), "baseline" if job.unit is None else f"{job.unit.start}:{job.unit.end} {job.unit.reg}")

        try:
            execute(jobs, on_result, executor=executor, workers=workers, ray_address=ray_address)
        finally:
            bar.close()
    finally:
        cache.close()

    correct = {c: np.array([item_metrics(the_task, it, scores[c][i])[metric] for i, it in enumerate(items)], np.float64)
               for c in keys}
    rows = _rows(cells, correct, seed, significance)
    computed = sum(1 for j in jobs if j.unit is not None for todo in j.todo if todo)
    result = SweepResult(base.path, the_task, split_label, metric, len(blocks), float(correct[None].mean()), len(items), rows,
                         len(cells), len(units), cached, computed, sum(1 for j in jobs if j.unit is not None), totals["tokens"],
                         time.perf_counter() - t0, totals["setup"], totals["score"], config)
    say(f"sweep: {len(cells)} cells ({cached} from the cache, {computed} computed) with {result.rewrites} rewrites "
        f"in {result.seconds:.1f} s; baseline {metric} {result.baseline:.4f} on {len(items)} items")
    return result


def _jobs(model: str, units: Sequence[Unit], missing: dict, groups: list[list[TokenRequest]], max_length: int, threads: int,
          max_batch_tokens: int) -> list[Job]:
    """The baseline job (if needed) and one job per unit with a cell still to score. Each job
    carries only the items its cells need; ``todo`` indexes into the cell's own missing list."""
    jobs = []
    if missing[None]:
        jobs.append(Job(model, None, tuple(tuple(groups[i]) for i in missing[None]), (tuple(range(len(missing[None]))),),
                        max_length, threads, max_batch_tokens))
    for unit in units:
        todo_cells = [c for c in unit.cells if missing[c]]
        if not todo_cells:
            continue
        needed = sorted(set().union(*(missing[c] for c in todo_cells)))
        where = {i: p for p, i in enumerate(needed)}
        sub = dataclasses.replace(unit, cells=tuple(todo_cells))
        jobs.append(Job(model, sub, tuple(tuple(groups[i]) for i in needed),
                        tuple(tuple(where[i] for i in missing[c]) for c in todo_cells), max_length, threads, max_batch_tokens))
    return jobs


def _rows(cells: Sequence[Cell], correct: dict, seed: int, significance: float) -> list[SweepRow]:
    base = correct[None]
    paired = [compare_paired(base, correct[c], seed=seed) for c in cells]
    adjusted = holm([p.p_mcnemar for p in paired])
    return [SweepRow(c, float(correct[c].mean()), float(base.mean()), p.delta, p.ci95, p.p_mcnemar, q, p.gained, p.lost, p.n,
                     p.p_mcnemar < significance) for c, p, q in zip(cells, paired, adjusted)]


def _fed_tokens(groups: Sequence[Sequence[TokenRequest]], max_length: int, max_batch_tokens: int) -> int:
    from loopgraph.eval.scoring import plan
    return sum(map(len, plan(groups, max_length, max_batch_tokens, 64).rows)) if groups else 0


def _estimate(jobs: Sequence[Job], num_blocks: int, workers: int, say: Say) -> dict:
    """Time estimate for ``jobs``: measured baseline speed (tokens/s on a sample of items) and the
    cost of one rewrite + session, with each cell's time taken as proportional to the blocks it
    runs, ``L + (N - 1) * (E - S)`` against ``L``."""
    if not jobs:
        return {"seconds": 0.0, "note": "everything is in the cache"}
    first = jobs[0]
    sample = first.groups[:8]
    say(f"dry run: measuring the baseline on {len(sample)} items and one rewrite")
    probe = run_job(dataclasses.replace(first, unit=None, groups=sample, todo=(tuple(range(len(sample))),)))
    tok_s = probe.tokens / max(probe.score_seconds, 1e-9)
    unit_jobs = [j for j in jobs if j.unit is not None]
    setup = 0.0
    if unit_jobs:
        u = unit_jobs[0]
        setup = run_job(dataclasses.replace(u, unit=dataclasses.replace(u.unit, cells=u.unit.cells[:1]), todo=((),))).setup_seconds
    work = 0.0
    for job in jobs:
        cells = [None] if job.unit is None else job.unit.cells
        for cell, todo in zip(cells, job.todo):
            tokens = _fed_tokens([job.groups[i] for i in todo], job.max_length, job.max_batch_tokens)
            blocks = num_blocks if cell is None else num_blocks + (cell.iters - 1) * (cell.end - cell.start)
            work += tokens * blocks / num_blocks / tok_s
    seconds = (work + len(unit_jobs) * setup + probe.setup_seconds) / min(workers, len(jobs))
    return {"seconds": seconds, "baseline_tokens_per_s": tok_s, "rewrite_and_session_s": setup, "jobs": len(jobs),
            "note": "time per cell taken as proportional to the blocks it runs; divided by the workers"}


class _CellBar:
    """A tqdm bar over cells on stderr (ETA from the cells done so far); the baseline counts as one cell."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc="sweep", unit="cell", file=sys.stderr, dynamic_ncols=True, smoothing=0.2)

    def update(self, n: int, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- outputs ----------------------------------------------------------------------------------

def csv_rows(result: SweepResult) -> list[dict]:
    out = []
    for r in result.rows:
        c = r.cell
        out.append({"task": result.task.name, "split": result.split, "metric": result.metric, "start": c.start, "end": c.end,
                    "width": c.end - c.start, "iters": c.iters, "reg": c.reg.name, "weight": "" if c.reg.weight is None else c.reg.weight,
                    "halt": "" if c.reg.halt is None else c.reg.halt, "halt_metric": "" if c.reg.halt is None else c.reg.halt_metric,
                    "n": r.n, "value": r.value, "baseline": r.baseline, "delta": r.delta, "ci95_lo": r.ci95[0], "ci95_hi": r.ci95[1],
                    "p_mcnemar": r.p_mcnemar, "p_holm": r.p_holm, "gained": r.gained, "lost": r.lost, "significant": int(r.significant)})
    return out


def heat_cells(result: SweepResult) -> list[HeatCell]:
    """The rows of a sweep as the heatmaps draw them."""
    return [HeatCell(r.cell.start, r.cell.end, r.cell.iters, r.cell.reg.label, r.delta, r.significant) for r in result.rows]


def heatmap_title(result: SweepResult) -> HeatmapTitle:
    """What the heatmaps say about the sweep."""
    return HeatmapTitle(model_title(result.model), result.task.name, result.split, result.n, result.metric, result.baseline,
                        result.num_blocks, result.config["significance"])


def write_outputs(result: SweepResult, out_dir: str | os.PathLike, say: Say = _stderr) -> dict[str, Path]:
    """Write ``sweep.csv``, ``sweep.json`` and the heatmaps into ``out_dir`` (created if needed);
    every file goes through a temporary file. Returns the paths by kind."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoopgraphError(f"cannot create the output folder {out} ({e.strerror}); choose another -o") from None
    paths = {"csv": out / "sweep.csv", "json": out / "sweep.json"}
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(result))
    summary = {"config": result.config, "baseline": result.baseline, "items": result.n, "blocks": result.num_blocks,
               "cells": result.cells, "units": result.units, "cells_cached": result.cells_cached, "cells_computed": result.cells_computed,
               "rewrites": result.rewrites, "tokens": result.tokens, "seconds": round(result.seconds, 2),
               "setup_seconds": round(result.setup_seconds, 2), "score_seconds": round(result.score_seconds, 2)}
    best = max(result.rows, key=lambda r: r.delta, default=None)
    if best is not None:
        summary["best"] = {"range": f"{best.cell.start}:{best.cell.end}", "iters": best.cell.iters, "reg": best.cell.reg.label,
                           "delta": best.delta, "p_mcnemar": best.p_mcnemar, "p_holm": best.p_holm}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for i, p in enumerate(heatmaps(heat_cells(result), heatmap_title(result), out)):
        paths[f"heatmap{i}"] = p
    say(f"wrote {paths['csv']}, {paths['json']} and {len(paths) - 2} heatmap(s) in {out}")
    return paths


def format_summary(result: SweepResult, top: int = 5) -> str:
    """A short text report: baseline, the best cells, how many are significant."""
    lines = [f"{result.model} · {result.task.name} ({result.split}, {result.n} items) · {result.metric}",
             f"baseline {result.baseline:.4f}; {result.cells} cells, {sum(r.significant for r in result.rows)} with McNemar "
             f"p < {result.config['significance']} (uncorrected), {sum(r.p_holm < result.config['significance'] for r in result.rows)} "
             "after Holm's correction"]
    ranked = sorted(result.rows, key=lambda r: -r.delta)[:top]
    if ranked:
        lines.append(f"{'range':>8} {'N':>3} {'reg':<12} {'value':>7} {'delta':>8} {'95% CI':>17} {'p':>7}")
    for r in ranked:
        c = r.cell
        lines.append(f"{c.start:>3}:{c.end:<4} {c.iters:>3} {c.reg.label:<12} {r.value:7.4f} {r.delta:+8.4f} "
                     f"[{r.ci95[0]:+.4f},{r.ci95[1]:+.4f}] {r.p_mcnemar:7.3f}")
    return "\n".join(lines)


def format_dry_run(result: SweepResult) -> str:
    est = result.estimate or {}
    todo = result.cells - result.cells_cached
    lines = [f"{result.cells} cells ({result.units} rewrites, one per range and regularizer) on {result.n} items of "
             f"{result.task.name} ({result.split}); {result.cells_cached} already in the cache, {todo} to score",
             f"estimated time: {format_duration(est.get('seconds', 0.0))}"]
    if "baseline_tokens_per_s" in est:
        lines.append(f"  (baseline {est['baseline_tokens_per_s']:.0f} tokens/s, rewrite + session {est['rewrite_and_session_s']:.1f} s, "
                     f"{est['jobs']} jobs; {est['note']})")
    return "\n".join(lines)


