"""``loopgraph tune``: find where looping helps a model, fast, and check it on held-out items.

Two phases per task:

1. **Search** on a tuning split (:mod:`loopgraph.experiments.search`): every (range, N,
   regularizer) cell races by successive halving on the paired gold-option probability, scored
   by the block chain (:mod:`loopgraph.experiments.chain`: one session per block, the states
   every cell shares computed once per batch, no rewrite per cell).
2. **Confirmation** on a disjoint held-out split: the best ``k`` cells are rewritten for real
   (the Loop graph ``sweep`` and ``eval`` score) and compared with the baseline on the same
   held-out items: delta, paired bootstrap 95 % CI, exact McNemar p, Holm's correction over the
   ``k``; each finalist also gets its noise control (same rewrite, the loop's shift replaced by
   noise of the same per-token norm) and is compared with it.

Splits (:func:`make_splits`): a task with a ``_dev`` file (ARC, OpenBookQA) tunes on it and
confirms on the split lm-eval reports; a task with one file is cut into two seeded disjoint
halves (the line numbers of each half are recorded). Items whose text is in both are dropped
from the confirmation half; the two sets are disjoint by item key (asserted).

Resumable and widenable: every (cell, item) score of the search and every confirmation score
goes to the score cache (:class:`loopgraph.eval.cache.ScoreCache`) as each job finishes; a rerun
with the same or a wider grid asks for the same pairs and scores only those not cached (the
confirmation of a looped cell shares ``sweep``'s cache entries). Items are **packed** by default
(:mod:`loopgraph.eval.packing`: an item's options share their common context in one row, so the
chain feeds HellaSwag about half the ids); packed scores equal the row-per-option ones to float
rounding, not bit for bit, so they live under their own cache keys, and a run reads the other
kind where its own is missing (a search started unpacked resumes packed without rescoring).
Jobs are (a chunk of items of
at most ``JOB_TOKENS`` ids, a group of ``STARTS_PER_JOB`` start blocks): the boundary states are
computed once per job, and jobs run inline, on a process pool or on Ray
(:func:`loopgraph.experiments.sweep.execute`).

Handled: multiple-choice tasks and ``acc``/``acc_norm``; original exports without KV cache.
Refused: what ``sweep`` refuses, ``--confirm`` below 1, ``--eta`` below 2, a split left empty.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loopgraph._version import __version__
from loopgraph.errors import LoopgraphError
from loopgraph.eval.cache import ScoreCache, encode_requests, encoded_item_keys, item_key
from loopgraph.eval.encoding import TokenRequest
from loopgraph.eval.metrics import BINARY, item_metrics
from loopgraph.eval.packing import packed_tokens, score_packed
from loopgraph.eval.scoring import DEFAULT_BATCH_TOKENS, Score, plan, score_groups
from loopgraph.eval.stats import compare_paired
from loopgraph.eval.tasks import MULTIPLE_CHOICE, Item, Task, get_task, load_items
from loopgraph.experiments.chain import BlockChain, Variant, split_model
from loopgraph.experiments.grid import Cell, Unit, make_cells, parse_halts, parse_iters, parse_ranges, parse_regs
from loopgraph.experiments.search import Round, Standing, finalists, gold_probability, pairs, schedule, standing, survivors
from loopgraph.experiments.sweep import EXECUTORS, cell_key, default_metric, execute, holm, tokenize

log = logging.getLogger(__name__)
CACHE_NAMESPACE = "loopgraph-tune-chain-v1"
PACKED_NAMESPACE = "loopgraph-tune-chain-packed-v1"
DEFAULT_REGS = "uniform,anchor:0.5"
DEFAULT_N0 = 48
DEFAULT_ETA = 2
JOB_TOKENS = 256  # ids per job: a job (and the progress bar's step) takes minutes on SmolLM2, not an hour
CONFIRM_JOB_TOKENS = 16384  # ids per confirmation job: about a minute of a real graph on SmolLM2, kept in the cache as it ends
STARTS_PER_JOB = 6  # start blocks per job: each job computes the boundary states once (L blocks per item)
Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- splits -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Splits:
    task: Task  # the task as scored (metrics, renderer)
    tune: list[Item]
    confirm: list[Item]
    how: str  # "dev/reported" or "halves"
    tune_file: str
    confirm_file: str
    dropped_overlap: int  # confirmation items dropped because their text is also a tuning item


def item_identity(item: Item) -> str:
    """What makes two items the same item: their rendered requests (not the line number)."""
    return item_key("loopgraph-tune-item", item.requests)


def make_splits(name: str, data_dir: Path, seed: int, tune_limit: int | None = None, confirm_limit: int | None = None) -> Splits:
    """The tuning and confirmation items of task ``name`` (see the module docstring)."""
    from loopgraph.eval.runner import select
    task = get_task(name)
    if task.output_type != MULTIPLE_CHOICE:
        raise LoopgraphError(f"{name} is not a multiple-choice task; tune needs a gold option per item "
                             "(winogrande, arc_easy, hellaswag, piqa, boolq, openbookqa, sciq, arc_challenge)")
    first = task.files[0]
    dev = first.replace("_test.jsonl", "_dev.jsonl")
    if dev != first and (Path(data_dir) / dev).is_file():
        tune_items = load_items(dataclasses.replace(task, files=(dev, *task.files[1:])), data_dir)
        confirm_items = load_items(task, data_dir)
        how, tune_file, confirm_file = "dev/reported", dev, first
    else:
        items = load_items(task, data_dir)
        order = np.random.default_rng(seed).permutation(len(items))
        half = len(items) // 2
        tune_items = [items[i] for i in sorted(order[:half])]
        confirm_items = [items[i] for i in sorted(order[half:])]
        how, tune_file, confirm_file = "halves", first, first
    seen = {item_identity(it) for it in tune_items}
    kept = [it for it in confirm_items if item_identity(it) not in seen]
    dropped = len(confirm_items) - len(kept)
    tune_items = select(tune_items, tune_limit, seed)
    confirm_items = select(kept, confirm_limit, seed)
    if not tune_items or not confirm_items:
        raise LoopgraphError(f"{name}: the {'tuning' if not tune_items else 'confirmation'} split is empty; "
                             "give the task's full data (--data-dir) or larger limits")
    assert not {item_identity(it) for it in tune_items} & {item_identity(it) for it in confirm_items}
    return Splits(task, tune_items, confirm_items, how, tune_file, confirm_file, dropped)


# --- per-item values --------------------------------------------------------------------------

def option_values(task: Task, item: Item, scores: Sequence[Score], metric: str) -> list[float]:
    """The per-option numbers ``metric`` takes the argmax of."""
    lls = [s.ll for s in scores]
    if metric == "acc_norm":
        return [v / len(c) for v, c in zip(lls, item.choices)]
    return lls


def per_item(task: Task, items: Sequence[Item], scores: Sequence[Sequence[Score]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(gold probability, 0/1 correctness) per item."""
    p = np.array([gold_probability(option_values(task, it, s, metric), it.gold) for it, s in zip(items, scores)])
    acc = np.array([item_metrics(task, it, s)[metric] for it, s in zip(items, scores)], np.float64)
    return p, acc


# --- search jobs ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SearchJob:
    """Variants (None = the baseline) to score on some items with the block chain. ``todo[v]``
    are the positions in ``groups`` variant v must score."""
    model: str
    variants: tuple[Variant | None, ...]
    items: tuple[int, ...]  # the tuning items (indices in the race order) that ``groups`` holds
    groups: tuple[tuple[TokenRequest, ...], ...]
    todo: tuple[tuple[int, ...], ...]
    max_length: int
    threads: int | None
    max_batch_tokens: int
    pack: bool = False  # score the items packed (loopgraph.eval.packing)
    window: int | None = None  # a sliding-window model's span: wider packed rows are not packed


@dataclasses.dataclass(frozen=True)
class SearchJobResult:
    scores: tuple[tuple[tuple[Score, ...], ...], ...]  # per variant, per todo item, per request
    block_runs: int
    block_tokens: int  # sum over block runs of the ids fed (padding excluded)
    forwards: int
    setup_seconds: float
    score_seconds: float
    cpu_seconds: float  # CPU time of the scoring (this process), steady on a busy machine


@functools.lru_cache(maxsize=1)
def _chain(path: str, mtime_ns: int, threads: int | None, pack: bool = False) -> BlockChain:
    """The block chain of a model, kept for the next job of this worker process."""
    from loopgraph.onnxio import load_model
    return BlockChain(split_model(load_model(path, load_weights=True), allow=pack), threads=threads)


def run_search_job(job: SearchJob) -> SearchJobResult:
    """Score a search job (a worker's entry point: inline, process pool or Ray)."""
    t0 = time.perf_counter()
    chain = _chain(job.model, os.stat(job.model).st_mtime_ns, job.threads, job.pack)
    setup = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    runs, tokens, forwards = chain.block_runs, chain.block_tokens, chain.forwards
    chain.clear()
    out: list[tuple] = [()] * len(job.variants)
    # cells of one range one after another: their shared loop states are dropped after the range
    order = sorted(range(len(job.variants)), key=lambda i: _range_key(job.variants[i]))
    current = None
    for i in order:
        v, todo = job.variants[i], job.todo[i]
        if _range_key(v) != current:
            chain.forget_loops()
            current = _range_key(v)
        if not todo:
            continue
        groups = [job.groups[k] for k in todo]
        if job.pack:
            scores = score_packed(groups, chain.packed_forward(v), max_length=job.max_length, max_batch_tokens=job.max_batch_tokens,
                                  window=job.window)
        else:
            scores = score_groups(groups, chain.forward(v), max_length=job.max_length, max_batch_tokens=job.max_batch_tokens)
        out[i] = tuple(tuple(s) for s in scores)
    chain.clear()
    return SearchJobResult(tuple(out), chain.block_runs - runs, chain.block_tokens - tokens, chain.forwards - forwards, setup,
                           time.perf_counter() - t1, time.process_time() - c1)


def _range_key(v: Variant | None) -> tuple:
    return (-1, -1) if v is None else (v.cell.start, v.cell.end)


def variant_key(model_key: str, v: Variant | None, packed: bool = False) -> str:
    """Cache key of a variant's chain scores (separate from sweep's: other sessions, float rounding;
    packed and row-per-option scores apart: float rounding)."""
    what = "baseline" if v is None else json.dumps(v.cell.key(v.noise_seed))
    namespace = PACKED_NAMESPACE if packed else CACHE_NAMESPACE
    return hashlib.sha256(f"{namespace}\0{__version__}\0{model_key}\0{what}".encode()).hexdigest()


def variant_cost(v: Variant | None, num_blocks: int) -> int:
    """Blocks the chain runs for one item of ``v`` beyond the shared boundary states (an upper
    bound: y_2 is shared by every N and regularizer of a range)."""
    if v is None:
        return 0
    c = v.cell
    return (c.iters - 1) * (c.end - c.start) + (num_blocks - c.end) if c.iters > 1 or v.noise_seed is not None else 0


def item_tokens(groups: Sequence[Sequence[TokenRequest]], max_length: int, max_batch_tokens: int, pack: bool = False,
                window: int | None = None) -> list[int]:
    """Ids fed per item (its rows after the shared-prefix merge, or its packed row)."""
    if pack:
        return packed_tokens(groups, max_length, window)
    p = plan(groups, max_length, max_batch_tokens, 64)
    out = [0] * len(groups)
    for row, g in zip(p.rows, p.owner):
        out[g] += len(row)
    return out


# --- confirmation jobs ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConfirmJob:
    """Some confirmation items scored by one real graph: the original (``cell=None``), a looped
    cell, or that cell's noise control (``noise_seed``)."""
    model: str
    cell: Cell | None
    noise_seed: int | None
    groups: tuple[tuple[TokenRequest, ...], ...]
    max_length: int
    threads: int | None
    max_batch_tokens: int


_SESSION: list = []  # [(key, (session, feeds))]: a worker's last graph, reused by its next chunk of the same one


def _confirm_session(job: ConfirmJob):
    """The job's graph as a session and its feeds; a worker keeps only the last one (a run's chunks
    come graph by graph, so each worker builds each graph once)."""
    from loopgraph.experiments.sweep import _original, cell_feeds
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.logits import LogitsSession
    key = (job.model, os.stat(job.model).st_mtime_ns, job.cell, job.noise_seed, job.threads)
    if _SESSION and _SESSION[0][0] == key:
        return _SESSION[0][1]
    _SESSION.clear()  # free the last graph before building the next
    original = _original(job.model, key[1])
    if job.cell is None:
        value = (LogitsSession(original, threads=job.threads), {})
    else:
        unit = Unit(job.cell.start, job.cell.end, job.cell.reg.name, (job.cell,))
        spec = dataclasses.replace(unit.spec(), noise_seed=job.noise_seed) if job.noise_seed is not None else unit.spec()
        lm = LogitsSession(rewrite(original, spec).model, threads=job.threads)
        value = (lm, cell_feeds(job.cell, lm))
    _SESSION.append((key, value))
    return value


def run_confirm_job(job: ConfirmJob):
    """Score a confirmation job (a worker's entry point: local, process pool or Ray)."""
    from loopgraph.experiments.sweep import JobResult
    t0 = time.perf_counter()
    lm, feeds = _confirm_session(job)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens = 0

    def count(done: int, total: int) -> None:
        nonlocal tokens
        tokens = total

    scores = score_groups(list(job.groups), lambda i, m, a: lm.logits_at(i, m, a, feeds), max_length=job.max_length,
                          max_batch_tokens=job.max_batch_tokens, on_batch=count)
    return JobResult((tuple(tuple(s) for s in scores),), setup, time.perf_counter() - t1, tokens)


def noise_key(model_key: str, cell: Cell, seed: int) -> str:
    what = json.dumps(cell.key("noise", seed))
    return hashlib.sha256(f"loopgraph-tune-noise-v1\0{__version__}\0{model_key}\0{what}".encode()).hexdigest()


# --- results ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Confirmation:
    """One finalist on the held-out items (the real looped graph) and its noise control."""
    cell: Cell
    tune: Standing
    value: float
    baseline: float
    delta: float
    ci95: tuple[float, float]
    p_mcnemar: float
    p_holm: float
    gained: int
    lost: int
    n: int
    noise_value: float
    noise_delta: float  # noise control vs baseline
    noise_p: float
    vs_noise_delta: float  # finalist vs its noise control
    vs_noise_ci95: tuple[float, float]
    vs_noise_p: float
    confirmed: bool


@dataclasses.dataclass
class TaskTune:
    task: Task
    splits: Splits
    metric: str
    num_blocks: int
    cells: list[Cell]
    rounds: list[Round]
    table: dict[Cell, Standing]  # every cell's standing on the items it got
    baseline_tune: float  # baseline metric on the tuning items
    finalists: list[Standing]
    confirmations: list[Confirmation]
    detectable: float  # smallest |delta| the confirmation detects with 80 % power (normal approximation)
    oracle: dict | None
    work: dict  # counts: pairs scored, cached, block runs, tokens, seconds
    estimate: dict | None = None  # dry run
    model_written: Path | None = None

    @property
    def winner(self) -> Confirmation | None:
        confirmed = [c for c in self.confirmations if c.confirmed]
        return max(confirmed, key=lambda c: c.delta) if confirmed else None


@dataclasses.dataclass
class TuneResult:
    model: Path
    tasks: list[TaskTune]
    config: dict
    seconds: float


# --- the driver -------------------------------------------------------------------------------

def tune(model: str | os.PathLike, tasks: Sequence[str], *, ranges: str = "all", stride: int = 1, iters: str = "2,3",
         regs: str = DEFAULT_REGS, halt: str | None = None, halt_metric: str = "rel", confirm: int = 3,
         n0: int = DEFAULT_N0, eta: int = DEFAULT_ETA, keep: int | None = None,
         seed: int = 1234, noise_seed: int = 1234, data_dir: Path | None = None, metric: str | None = None,
         tune_limit: int | None = None, confirm_limit: int | None = None, cache_dir: Path | None = None, executor: str = "local",
         workers: int = 1, threads: int | None = None, ray_address: str | None = None,
         max_batch_tokens: int = DEFAULT_BATCH_TOKENS, significance: float = 0.05, oracle: bool = False, dry_run: bool = False,
         pack: bool = True, progress: bool = True, say: Say = _stderr) -> TuneResult:
    """Search and confirm on each task (see the module docstring). ``keep``: fewest cells a round
    keeps (default ``max(2 * confirm, 4)``); ``n0``: items of the first round; ``eta``: the factor
    by which cells shrink and items grow per round; ``halt``: halting tolerances to search
    (:func:`loopgraph.experiments.grid.parse_halts`), None for plain loops only; ``pack``: score
    each item's options in one packed row where the export allows it (:func:`packing_of`)."""
    from loopgraph.eval.runner import data_dir_default, open_model
    from loopgraph.onnxio import load_model
    from loopgraph.passes.blocks import find_blocks

    t0 = time.perf_counter()
    _check_args(confirm, n0, eta, keep, threads, workers, executor, significance)
    keep = max(2 * confirm, 4) if keep is None else keep
    data_dir = Path(data_dir) if data_dir is not None else data_dir_default()
    if not tasks:
        raise LoopgraphError("give at least one --task, e.g. --task winogrande")
    base = open_model(model)
    if base.spec is not None:
        raise LoopgraphError(f"{base.path} is already looped ({base.spec.slug()}); tune the original export (model.onnx)")
    graph = load_model(base.path)
    num_blocks = len(find_blocks(graph))
    window = sliding_window(base.path.parent)
    if pack and (why := packing_of(graph)) is not None:
        say(f"items are scored a row per option: {why}")
        pack = False
    del graph
    halts = parse_halts(halt, halt_metric)
    cells = make_cells(parse_ranges(ranges, num_blocks, stride), parse_iters(iters), parse_regs(regs), halts, halt_metric)
    if threads is None:
        threads = 1 if executor == "ray" else max(1, (os.cpu_count() or 1) // workers)
    all_splits = [make_splits(t, data_dir, seed, tune_limit, confirm_limit) for t in dict.fromkeys(tasks)]  # data errors first
    config = {"model": str(base.path), "tasks": [s.task.name for s in all_splits], "ranges": ranges, "stride": stride,
              "iters": parse_iters(iters), "regs": [r.label for r in parse_regs(regs)],
              **({} if halt is None else {"halt": halts, "halt_metric": halt_metric}), "confirm": confirm, "n0": n0, "eta": eta,
              "keep": keep, "seed": seed, "noise_seed": noise_seed, "tune_limit": tune_limit, "confirm_limit": confirm_limit,
              "executor": executor, "workers": workers, "threads": threads, "max_batch_tokens": max_batch_tokens,
              "significance": significance, "oracle": oracle, "pack": pack, "cache": None if cache_dir is None else str(Path(cache_dir) / "scores.sqlite"),
              "loopgraph": __version__}
    ctx = _Context(base, num_blocks, threads, max_batch_tokens, executor, workers, ray_address, progress, say, pack, window)
    cache = ScoreCache(cache_dir)
    try:
        out = []
        for splits in all_splits:
            m = metric or default_metric(splits.task)
            if m not in BINARY or m not in splits.task.metrics:
                raise LoopgraphError(f"--metric {m} is not a per-item accuracy of {splits.task.name}; choose from "
                                     f"{', '.join(x for x in splits.task.metrics if x in BINARY)}")
            out.append(_tune_task(ctx, cache, splits, m, cells, n0, eta, keep, confirm, seed, noise_seed, significance, oracle, dry_run))
    finally:
        cache.close()
    return TuneResult(base.path, out, config, time.perf_counter() - t0)


def packing_of(graph) -> str | None:
    """Why the items of this export cannot be packed (None: they can): every attention must add
    ``Where(cond, 0, -inf)`` to its scores, where the chain ANDs in the packed rows' mask."""
    from loopgraph.experiments.chain import mask_wheres
    found = mask_wheres(graph.graph)
    return found if isinstance(found, str) else None


def sliding_window(folder: Path) -> int | None:
    """The attention window of the export's config.json (None: the model sees its whole context).
    Packed rows wider than it are not packed: the window counts row positions, not position ids."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    window = config.get("sliding_window")
    if not isinstance(window, int) or config.get("use_sliding_window") is False:
        return None
    return window


def _check_args(confirm: int, n0: int, eta: int, keep: int | None, threads: int | None, workers: int, executor: str,
                significance: float) -> None:
    if confirm < 1:
        raise LoopgraphError(f"--confirm {confirm} must be at least 1 (the number of finalists checked on held-out items)")
    if n0 < 1:
        raise LoopgraphError(f"--first-items {n0} must be at least 1")
    if eta < 2:
        raise LoopgraphError(f"--eta {eta} must be at least 2 (cells are divided and items multiplied by it each round)")
    if keep is not None and keep < confirm:
        raise LoopgraphError(f"--keep {keep} is below --confirm {confirm}; the last round must leave at least the finalists")
    if threads is not None and threads < 1:
        raise LoopgraphError(f"--threads {threads} must be at least 1")
    if workers < 1:
        raise LoopgraphError(f"--workers {workers} must be at least 1")
    if executor not in EXECUTORS:
        raise LoopgraphError(f"--executor {executor!r}: choose local or ray")
    if not 0 < significance < 1:
        raise LoopgraphError(f"--significance {significance} must be between 0 and 1, e.g. 0.05")


@dataclasses.dataclass
class _Context:
    base: object  # loopgraph.eval.runner.Model
    num_blocks: int
    threads: int
    max_batch_tokens: int
    executor: str
    workers: int
    ray_address: str | None
    progress: bool
    say: Say
    pack: bool = False
    window: int | None = None


class _Scores:
    """Scores per variant per item index (of one item list), backed by the cache. Scores are
    written under ``key_of``; ``also_of`` names other keys of the same scores (to float rounding)
    read where ``key_of``'s are missing (``borrowed`` counts them per variant)."""

    def __init__(self, cache: ScoreCache, items: Sequence[Item], key_of: Callable[[object], str],
                 also_of: Callable[[object], str] | None = None) -> None:
        self.cache, self.items, self.key_of, self.also_of = cache, items, key_of, also_of
        self.encoded = [encode_requests(it.requests) for it in items]
        self.got: dict[object, dict[int, list[Score]]] = {}
        self.keys: dict[object, list[str]] = {}
        self.borrowed: dict[object, int] = {}

    def load(self, variant) -> dict[int, list[Score]]:
        if variant not in self.got:
            k = self.key_of(variant)
            self.keys[variant] = encoded_item_keys(k, self.encoded)
            found = self.cache.get(self.keys[variant])
            self.got[variant] = {i: found[key] for i, key in enumerate(self.keys[variant]) if key in found}
            if self.also_of is not None:
                want = [i for i in range(len(self.items)) if i not in self.got[variant]]
                lacking = dict(zip(encoded_item_keys(self.also_of(variant), [self.encoded[i] for i in want]), want))
                more = self.cache.get(list(lacking))
                self.got[variant].update({lacking[key]: v for key, v in more.items()})
                self.borrowed[variant] = len(more)
        return self.got[variant]

    def put(self, variant, new: dict[int, list[Score]]) -> None:
        self.put_many({variant: new})

    def put_many(self, new: dict[object, dict[int, list[Score]]]) -> None:
        """Store scores of several variants in one cache transaction."""
        entries = {}
        for variant, got in new.items():
            self.load(variant)
            entries.update({self.keys[variant][i]: s for i, s in got.items()})
            self.got[variant].update(got)
        self.cache.put(entries)


def _tune_task(ctx: _Context, cache: ScoreCache, splits: Splits, metric: str, cells: list[Cell], n0: int, eta: int, keep: int,
               confirm: int, seed: int, noise_seed: int, significance: float, oracle: bool, dry_run: bool) -> TaskTune:
    base, say = ctx.base, ctx.say
    task = splits.task
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(splits.tune))]
    items = [splits.tune[i] for i in order]  # the race's item order: every prefix is a random subset
    groups = tokenize(items, base.path.parent)
    tokens = item_tokens(groups, base.max_length, ctx.max_batch_tokens, ctx.pack, ctx.window)
    rounds = schedule(len(cells), len(items), n0, eta, keep)
    scores = _Scores(cache, items, lambda v: variant_key(base.key, v, ctx.pack), lambda v: variant_key(base.key, v, not ctx.pack))
    work = {"pairs": 0, "pairs_cached": 0, "block_runs": 0, "block_tokens": 0, "forwards": 0, "search_seconds": 0.0,
            "confirm_seconds": 0.0, "confirm_tokens": 0, "rewrites": 0}
    say(f"{task.name}: {len(cells)} cells, {len(items)} tuning items ({splits.tune_file}), {len(splits.confirm)} confirmation "
        f"items ({splits.confirm_file}, {splits.how}); rounds " + ", ".join(f"{r.cells} cells x {r.items} items" for r in rounds))
    if dry_run:
        confirm_groups = tokenize(splits.confirm, base.path.parent)
        estimate = _estimate(ctx, cells, rounds, groups, tokens, item_tokens(confirm_groups, base.max_length, ctx.max_batch_tokens),
                             confirm, oracle, n0)
        return TaskTune(task, splits, metric, ctx.num_blocks, cells, rounds, {}, math.nan, [], [], math.nan, None, work, estimate)

    bar = _WorkBar(ctx.progress, task.name)
    t0 = time.perf_counter()
    active = list(cells)
    table: dict[Cell, Standing] = {}
    oracle_variants = [Variant(c, noise_seed) for c in cells] if oracle else []
    try:
        for r, rnd in enumerate(rounds):
            variants: list[Variant | None] = [None, *(Variant(c) for c in active)]
            if r == 0:
                variants += oracle_variants
            bar.plan(_remaining_work(rounds, r, active, oracle_variants, tokens, ctx.num_blocks))
            _run_round(ctx, scores, variants, groups, tokens, rounds[r - 1].items if r else 0, rnd.items, work, bar)
            p_base, acc_base = _values(task, items, scores, None, rnd.items, metric)
            for c in active:
                p, acc = _values(task, items, scores, Variant(c), rnd.items, metric)
                table[c] = standing(c, p, p_base, acc, acc_base)
            if r + 1 < len(rounds):
                kept = {s.key for s in survivors([table[c] for c in active], rounds[r + 1].cells)}
                for c in active:
                    if c not in kept:
                        table[c].dropped_after = rnd.items
                active = [c for c in active if c in kept]
    finally:
        bar.close()
    work["search_seconds"] = time.perf_counter() - t0
    work["packed"] = ctx.pack
    work["scores_of_other_scoring"] = sum(n for v, n in scores.borrowed.items() if v is not None)
    _chain.cache_clear()  # the confirmation opens other sessions: free the chain's (in this process)
    full = [table[c] for c in active]
    final = finalists(full, confirm)
    p_base, acc_base = _values(task, items, scores, None, len(items), metric)
    oracle_out = _oracle(task, items, scores, cells, noise_seed, min(n0, len(items)), metric) if oracle else None
    say(f"{task.name}: search done in {work['search_seconds']:.1f} s ({work['pairs']} (cell, item) pairs scored, "
        f"{work['pairs_cached']} from the cache); finalists " + ", ".join(_cell_label(s.key) for s in final))
    t1 = time.perf_counter()
    confirmations, detectable = _confirm(ctx, cache, splits, metric, final, noise_seed, significance, work)
    work["confirm_seconds"] = time.perf_counter() - t1
    return TaskTune(task, splits, metric, ctx.num_blocks, cells, rounds, table, float(acc_base.mean()), final, confirmations,
                    detectable, oracle_out, work)


def _cell_label(c: Cell) -> str:
    return f"{c.start}:{c.end} x{c.iters} {c.reg.label}"


def _values(task: Task, items: Sequence[Item], scores: _Scores, v: Variant | None, n: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    got = scores.load(v)
    return per_item(task, items[:n], [got[i] for i in range(n)], metric)


def _run_round(ctx: _Context, scores: _Scores, variants: Sequence[Variant | None], groups: list, tokens: list[int], prev: int,
               n: int, work: dict, bar: _WorkBar) -> None:
    """Score every variant on the items it lacks among [0, n) (the cells racing since the last
    round have [0, prev) already, new ones and the baseline may not)."""
    missing = {v: [i for i in range(n) if i not in scores.load(v)] for v in variants}
    cached = {v: [i for i in range(prev, n) if i in scores.got[v]] for v in variants}
    work["pairs_cached"] += sum(len(c) for v, c in cached.items() if v is not None)
    bar.skip(sum(variant_cost(v, ctx.num_blocks) * sum(tokens[i] for i in c) for v, c in cached.items()))
    needed = sorted(set().union(*missing.values()))
    jobs = []
    for chunk in _chunks(needed, tokens, ctx.workers) if needed else []:
        inside = set(chunk)
        where = {i: k for k, i in enumerate(chunk)}
        per_start: dict[int, list[Variant | None]] = {}
        for v in variants:
            if any(i in inside for i in missing[v]):
                per_start.setdefault(-1 if v is None else v.cell.start // STARTS_PER_JOB, []).append(v)
        starts = sorted(per_start)
        if len(starts) > 1 and starts[0] == -1:  # the baseline rides along with the first group of starts
            per_start[starts[1]] = per_start.pop(-1) + per_start[starts[1]]
        for vs in per_start.values():
            todo = tuple(tuple(where[i] for i in missing[v] if i in inside) for v in vs)
            jobs.append(SearchJob(str(ctx.base.path), tuple(vs), tuple(chunk), tuple(tuple(groups[i]) for i in chunk), todo,
                                  ctx.base.max_length, ctx.threads, ctx.max_batch_tokens, ctx.pack, ctx.window))

    def on_result(job: SearchJob, result: SearchJobResult) -> None:
        scores.put_many({v: {job.items[k]: list(s) for k, s in zip(todo, got)} for v, todo, got in zip(job.variants, job.todo, result.scores)})
        work["pairs"] += sum(len(todo) for v, todo in zip(job.variants, job.todo) if v is not None)
        for key in ("block_runs", "block_tokens", "forwards"):
            work[key] += getattr(result, key)
        bar.update(sum(job_work(job, tokens, ctx.num_blocks)))

    execute(jobs, on_result, executor=ctx.executor, workers=ctx.workers, ray_address=ctx.ray_address, fn=run_search_job)


def job_work(job: SearchJob, tokens: Sequence[int], num_blocks: int) -> list[int]:
    """Block-tokens per variant of a job (the progress bar's unit): its cost times the ids of its items."""
    return [variant_cost(v, num_blocks) * sum(tokens[job.items[k]] for k in todo) for v, todo in zip(job.variants, job.todo)]


def _chunks(needed: Sequence[int], tokens: Sequence[int], workers: int, budget: int = JOB_TOKENS) -> list[list[int]]:
    """Consecutive runs of ``needed`` with at most ``budget`` ids each (or one item), and at least ``workers`` runs."""
    cap = min(budget, max(1, math.ceil(sum(tokens[i] for i in needed) / workers)))
    out: list[list[int]] = [[]]
    size = 0
    for i in needed:
        if out[-1] and size + tokens[i] > cap:
            out.append([])
            size = 0
        out[-1].append(i)
        size += tokens[i]
    return out


def _remaining_work(rounds: Sequence[Round], r: int, active: Sequence[Cell], oracle_variants: Sequence[Variant],
                    tokens: Sequence[int], num_blocks: int) -> float:
    """Block-tokens of rounds r.. (a later round's cells are not known yet: each costs the mean of
    the active cells). Cached pairs are taken off as they are found (:meth:`_WorkBar.skip`)."""
    costs = [variant_cost(Variant(c), num_blocks) for c in active]
    mean = sum(costs) / max(1, len(costs))
    prev = rounds[r - 1].items if r else 0
    total = float(sum(costs) * sum(tokens[prev:rounds[r].items]))
    total += sum(variant_cost(v, num_blocks) for v in oracle_variants) * sum(tokens[:rounds[r].items]) if r == 0 else 0
    prev = rounds[r].items
    for later in rounds[r + 1:]:
        total += mean * later.cells * sum(tokens[prev:later.items])
        prev = later.items
    return total


class _WorkBar:
    """A tqdm bar over the whole search in block-tokens (blocks run x ids fed), so its ETA covers
    every round; the total is re-planned at each round, when the survivors are known."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=0, desc=f"tune {desc}", unit="blk·tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.1)

    def plan(self, remaining: float) -> None:
        if self.bar is not None:
            self.bar.total = self.bar.n + remaining
            self.bar.refresh()

    def skip(self, cached: float) -> None:
        if self.bar is not None and cached:
            self.bar.total = max(self.bar.n, self.bar.total - cached)

    def update(self, done: float) -> None:
        if self.bar is not None:
            self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- oracle -----------------------------------------------------------------------------------

def _oracle(task: Task, items: Sequence[Item], scores: _Scores, cells: Sequence[Cell], noise_seed: int, n: int, metric: str) -> dict:
    """Per-item headroom on the first ``n`` tuning items (the ones every cell got): of the items the
    baseline gets wrong, the share that at least one cell gets right, and the same for the noise
    controls of the same cells; and, of the items it gets right, the share some cell breaks."""
    _, base = _values(task, items, scores, None, n, metric)
    loop = np.stack([_values(task, items, scores, Variant(c), n, metric)[1] for c in cells])
    rand = np.stack([_values(task, items, scores, Variant(c, noise_seed), n, metric)[1] for c in cells])
    wrong, right = base == 0, base == 1

    def share(mask: np.ndarray, hit: np.ndarray) -> float:
        return float(hit[mask].mean()) if mask.any() else math.nan
    return {"items": n, "cells": len(cells), "baseline_wrong": int(wrong.sum()), "baseline_right": int(right.sum()),
            "fixed_by_some_cell": share(wrong, (loop == 1).any(0)), "fixed_by_some_noise": share(wrong, (rand == 1).any(0)),
            "broken_by_some_cell": share(right, (loop == 0).any(0)), "broken_by_some_noise": share(right, (rand == 0).any(0)),
            "mean_cells_fixing": float((loop[:, wrong] == 1).sum(0).mean()) if wrong.any() else math.nan,
            "mean_noise_fixing": float((rand[:, wrong] == 1).sum(0).mean()) if wrong.any() else math.nan}


# --- confirmation -----------------------------------------------------------------------------

def _confirm(ctx: _Context, cache: ScoreCache, splits: Splits, metric: str, final: Sequence[Standing], noise_seed: int,
             significance: float, work: dict) -> tuple[list[Confirmation], float]:
    """Score the baseline, each finalist and its noise control on the confirmation items with the
    real graphs (cached), and compare them paired."""
    base, task, items = ctx.base, splits.task, splits.confirm
    groups = tokenize(items, base.path.parent)
    path = str(base.path)
    wanted: list[tuple[object, str]] = [(None, cell_key(base.key, None))]
    for s in final:
        wanted += [(s.key, cell_key(base.key, s.key)), (("noise", s.key), noise_key(base.key, s.key, noise_seed))]
    store = _Scores(cache, items, dict(wanted).__getitem__)
    tokens = item_tokens(groups, base.max_length, ctx.max_batch_tokens)
    jobs, owners = [], []  # owners: (what, item indices, block-tokens) per job
    for what, _ in wanted:  # graph by graph, so a worker's next chunk mostly reuses its session
        missing = [i for i in range(len(items)) if i not in store.load(what)]
        cell, seed = (None, None) if what is None else (what, None) if isinstance(what, Cell) else (what[1], noise_seed)
        for chunk in _chunks(missing, tokens, ctx.workers, CONFIRM_JOB_TOKENS) if missing else []:
            jobs.append(ConfirmJob(path, cell, seed, tuple(tuple(groups[i]) for i in chunk), base.max_length, ctx.threads,
                                   ctx.max_batch_tokens))
            blocks = ctx.num_blocks + (0 if cell is None else (cell.iters - 1) * (cell.end - cell.start))
            owners.append((what, chunk, blocks * sum(tokens[i] for i in chunk)))
    owner = {id(j): o for j, o in zip(jobs, owners)}
    bar = _WorkBar(ctx.progress and bool(jobs), f"{task.name} confirm")  # in block-tokens, as the search's
    bar.plan(sum(w for _, _, w in owner.values()))

    def on_result(job, result) -> None:  # each chunk is in the cache as it ends: an interrupted run keeps it
        what, chunk, done = owner[id(job)]
        store.put(what, {i: list(s) for i, s in zip(chunk, result.scores[0])})
        work["confirm_tokens"] += result.tokens
        bar.update(done)
    if jobs:
        graphs = {what for what, _, _ in owners}
        work["rewrites"] += len(graphs - {None})
        ctx.say(f"{task.name}: confirming {len(final)} finalists on {len(items)} held-out items ({len(graphs)} graphs, "
                f"{len(jobs)} jobs)")
    try:
        execute(jobs, on_result, executor=ctx.executor, workers=ctx.workers, ray_address=ctx.ray_address, fn=run_confirm_job)
    finally:
        bar.close()
        _SESSION.clear()  # inline runs (one worker) kept the last graph in this process

    def correct(what) -> np.ndarray:
        got = store.load(what)
        return np.array([item_metrics(task, it, got[i])[metric] for i, it in enumerate(items)], np.float64)
    b = correct(None)
    rows = []
    for s in final:
        c, z = correct(s.key), correct(("noise", s.key))
        vs_base, vs_noise, noise_base = compare_paired(b, c), compare_paired(z, c), compare_paired(b, z)
        rows.append((s, c, z, vs_base, vs_noise, noise_base))
    adjusted = holm([r[3].p_mcnemar for r in rows])
    out = [Confirmation(s.key, s, float(c.mean()), float(b.mean()), p.delta, p.ci95, p.p_mcnemar, q, p.gained, p.lost, p.n,
                        float(z.mean()), nb.delta, nb.p_mcnemar, vn.delta, vn.ci95, vn.p_mcnemar, p.delta > 0 and q < significance)
           for (s, c, z, p, vn, nb), q in zip(rows, adjusted)]
    return out, detectable_effect(len(items), [r[3].gained + r[3].lost for r in rows], significance, len(final))


def detectable_effect(n: int, discordant: Sequence[int], significance: float, k: int, power: float = 0.8) -> float:
    """The accuracy delta the confirmation detects on ``n`` items at level ``significance / k``
    (Holm's first step): the larger of (a) the normal approximation with ``power``,
    ``(z_{1 - a/2} + z_power) * sqrt(q / n)``, ``q`` the finalists' mean share of discordant items,
    and (b) the exact floor ``g / n``, ``g`` the fewest gains without a loss that exact McNemar
    finds significant (no smaller delta can be significant whatever the discordance)."""
    from loopgraph.eval.stats import mcnemar_exact
    if n < 1:
        return math.nan
    level = significance / k
    q = max(1.0 / n, (sum(discordant) / len(discordant) / n) if discordant else 1.0 / n)
    z = statistics.NormalDist()
    normal = (z.inv_cdf(1 - level / 2) + z.inv_cdf(power)) * math.sqrt(q / n)
    g = next((g for g in range(1, n + 1) if mcnemar_exact(g, 0) < level), n + 1)
    return max(normal, g / n)


# --- dry run ----------------------------------------------------------------------------------

def _estimate(ctx: _Context, cells: Sequence[Cell], rounds: Sequence[Round], groups: list, tokens: list[int],
              confirm_tokens: list[int], confirm: int, oracle: bool, n0: int) -> dict:
    """Time of the search and the confirmation from measured costs: one block session per
    block-token (the chain's baseline on a sample of items), the head, and one rewrite + session."""
    L = ctx.num_blocks
    sample = list(range(min(8, len(groups))))
    t0 = time.perf_counter()
    _chain(str(ctx.base.path), os.stat(ctx.base.path).st_mtime_ns, ctx.threads, ctx.pack)
    setup = time.perf_counter() - t0
    job = SearchJob(str(ctx.base.path), (None,), tuple(sample), tuple(tuple(groups[i]) for i in sample), (tuple(sample),),
                    ctx.base.max_length, ctx.threads, ctx.max_batch_tokens, ctx.pack, ctx.window)
    probe = run_search_job(job)
    per_block_token = probe.score_seconds / max(1, probe.block_tokens)
    cpu_per_block_token = probe.cpu_seconds / max(1, probe.block_tokens)
    bound = sum(variant_cost(Variant(c), L) for c in cells)
    shared = shared_cost(cells, L)  # what the chain really runs for all cells on one item (y_2, x_t shared)
    mean_cost = bound / len(cells)
    mean_tokens = sum(tokens) / len(tokens)
    search_pairs = pairs(rounds)
    oracle_pairs = len(cells) * min(n0, len(tokens)) if oracle else 0
    search_bt = (search_pairs + oracle_pairs) * mean_cost * mean_tokens * shared / bound
    starts = len({c.start for c in cells})
    groups_of_starts = len({c.start // STARTS_PER_JOB for c in cells})
    boundary = L * sum(tokens) * groups_of_starts  # every job (item chunk x group of starts) computes h_0..h_L of its items
    finalist_blocks = L + sum((c.iters - 1) * (c.end - c.start) for c in cells) / len(cells)
    confirm_bt = (1 + 2 * confirm) * finalist_blocks * sum(confirm_tokens)  # baseline counted as a finalist: an upper bound
    t1 = time.perf_counter()
    c = cells[0]
    run_confirm_job(ConfirmJob(str(ctx.base.path), c, None, (), ctx.base.max_length, ctx.threads, ctx.max_batch_tokens))
    _SESSION.clear()
    rewrite_s = time.perf_counter() - t1
    search_s = (search_bt + boundary) * per_block_token / ctx.workers
    confirm_s = (confirm_bt * per_block_token + 2 * confirm * rewrite_s) / ctx.workers
    cpu_s = (search_bt + boundary + confirm_bt) * cpu_per_block_token + 2 * confirm * rewrite_s
    return {"seconds_per_block_token": per_block_token, "chain_setup_s": setup, "cells": len(cells),
            "rounds": [dataclasses.asdict(r) for r in rounds], "search_pairs": search_pairs, "oracle_pairs": oracle_pairs,
            "exhaustive_pairs": len(cells) * len(tokens), "mean_cell_blocks": mean_cost, "sharing": shared / bound,
            "mean_item_tokens": mean_tokens, "starts": starts, "groups_of_starts": groups_of_starts,
            "boundary_block_tokens": boundary, "search_block_tokens": search_bt, "cpu_seconds_per_block_token": cpu_per_block_token,
            "cpu_seconds": cpu_s,
            "search_seconds": search_s, "finalist_blocks": finalist_blocks, "confirm": confirm, "confirm_items": len(confirm_tokens),
            "confirm_block_tokens": confirm_bt, "rewrite_and_session_s": rewrite_s, "confirm_seconds": confirm_s,
            "seconds": search_s + confirm_s + setup, "num_blocks": L, "workers": ctx.workers}


def shared_cost(cells: Sequence[Cell], num_blocks: int) -> int:
    """Blocks the chain runs for one item to score all ``cells`` (beyond the boundary states):
    per range ``y_2`` once, then per regularizer ``y_3 .. y_maxN``, then a tail per cell."""
    total = 0
    ranges: dict[tuple[int, int], list[Cell]] = {}
    for c in cells:
        ranges.setdefault((c.start, c.end), []).append(c)
    for (s, e), cs in ranges.items():
        looped = [c for c in cs if c.iters > 1]
        if looped:
            total += e - s  # y_2
        for reg in {c.reg for c in looped}:
            total += (max(c.iters for c in looped if c.reg == reg) - 2) * (e - s)
        total += len(looped) * (num_blocks - e)
    return total
