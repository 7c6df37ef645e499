"""Evaluate ONNX models on benchmark tasks: load, render, tokenize, score (cached), compute metrics.

:func:`evaluate` runs every task for every model (task by task, so each task's comparison is
complete before the next starts) and returns an :class:`EvalReport`; :mod:`loopgraph.eval.report`
turns it into tables, JSON and per-item JSONL.

Handled: exports and loopgraph rewrites of them (``.onnx`` file or export folder, the tokenizer
files beside it, weights inline or external), ``--limit`` as a seeded random subset,
``--noise-control`` (a noise variant of each looped model, see :func:`noise_variant`).
Models with KV-cache inputs (``--with-past`` exports and their rewrites, model-builder graphs) are
scored from the first generation step, with empty caches (:mod:`loopgraph.runtime.logits`).
Refused: ``--limit`` below 1, tasks whose data is missing or malformed (see :mod:`loopgraph.eval.tasks`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.eval.cache import ScoreCache, file_sha256, item_key, model_key
from loopgraph.eval.encoding import TokenRequest, config_max_length, encode_pair, rolling_windows
from loopgraph.eval.metrics import aggregate, item_metrics
from loopgraph.eval.scoring import DEFAULT_BATCH_TOKENS, Score, score_groups
from loopgraph.eval.tasks import ROLLING, Item, Task, load_items
from loopgraph.exportdir import read_config, read_json
from loopgraph.metadata import SOURCE_KEY, SPEC_KEY, props, read_spec
from loopgraph.naming import PAST_PREFIX
from loopgraph.onnxio import external_locations, load_model, resolve_model_path
from loopgraph.provenance import original_of
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession
from loopgraph.runtime.tokenizer import TextTokenizer
from loopgraph.spec import LoopSpec

SAMPLES_DIR = Path(__file__).parent / "samples"
DATA_ENV = "LOOPGRAPH_DATA"


@dataclasses.dataclass
class Model:
    """A model file and what the evaluation needs to know about it."""
    path: Path
    label: str
    spec: LoopSpec | None  # the loopgraph rewrite recorded in its metadata
    source: Path | None  # for a looped model: the original it was rewritten from
    sha256: str  # of the .onnx file
    key: str  # cache key: file, external data, tokenizer, config, max_length
    max_length: int
    max_length_from: str
    noise_of: str | None = None  # label of the looped model this is the noise control of
    original: Path | None = None  # the original, confined and digest-checked (with noise_control only)


FEEDS = ("input_ids", "attention_mask", "position_ids")  # what the scorer feeds a causal LM


def _check_causal_lm(model: onnx.ModelProto, path: Path) -> None:
    """The graph must be what the scorer drives: inputs among input_ids/attention_mask/position_ids
    (input_ids required) and KV-cache inputs (fed empty), and a ``logits`` output."""
    inputs = [i.name for i in model.graph.input]
    other = [n for n in inputs if n not in FEEDS and not n.startswith(PAST_PREFIX)]
    if "input_ids" not in inputs or other or "logits" not in {o.name for o in model.graph.output}:
        raise LoopgraphError(f"{path} is not a causal LM export: inputs {inputs[:6]}, outputs {[o.name for o in model.graph.output][:4]} "
                             f"(evaluation feeds {', '.join(FEEDS)} and reads logits); export the model with loopgraph export")


def open_model(path: str | Path, max_length: int | None = None, *, header: onnx.ModelProto | None = None,
               noise_control: bool = False, original: str | os.PathLike | None = None) -> Model:
    """Read a model's metadata and hashes (weights are not loaded). Its label is the recorded
    spec's slug (``loop12-18x3-uniform``) or, for a model that is no rewrite, the file's stem.
    ``header``: the model the caller already loaded from ``path``, so it is not read again.
    With ``noise_control`` the original of a rewrite is located and checked
    (:func:`loopgraph.provenance.original_of`; ``original`` overrides the recorded path)."""
    p = resolve_model_path(path)
    if header is None:
        header = load_model(p)  # checks external data; never reads it
    external = external_locations(header)
    _check_causal_lm(header, p)
    spec = read_spec(header)
    source = props(header).get(SOURCE_KEY)
    source_path = (p.parent / source).resolve() if source is not None else None  # for the report; never opened unchecked
    checked = original_of(p, header, original, missing_ok=True) if noise_control and spec is not None else None
    if max_length is None:
        max_length, origin = config_max_length(read_config(p.parent), read_json(p.parent / "tokenizer_config.json"))
    else:
        origin = "--max-length"
    if max_length < 1:
        raise LoopgraphError(f"--max-length {max_length} must be at least 1")
    return Model(p, spec.slug() if spec else p.stem, spec, source_path, file_sha256(p).hexdigest(),
                 model_key(p, external, max_length), max_length, origin, original=checked)


def noise_variant(model: Model, seed: int, say: Callable[[str], None] = print) -> Path:
    """The noise control of a looped model: the same rewrite of the same original with
    ``noise_seed`` set, so the range output becomes ``r`` plus a pseudo-random perturbation of the
    same per-token norm as looping's shift ``x_N - r``. Written beside the looped model
    (``<stem>.noise<seed>.onnx``) and reused when it is already there with the same spec."""
    if model.spec is None:
        raise LoopgraphError(f"--noise-control: {model.path} is not a loopgraph rewrite (no {SPEC_KEY}); "
                             "give looped models, or drop --noise-control")
    if model.original is None:
        raise LoopgraphError(f"--noise-control: the original of {model.path} is not recorded or missing; "
                             "it is needed to build the noise variant: keep the export folder together or pass --original PATH")
    spec = dataclasses.replace(model.spec, noise_seed=seed)
    out = model.path.with_name(f"{model.path.stem}.noise{seed}.onnx")
    if out.is_file() and read_spec(load_model(out)) == spec:
        return out
    say(f"building the noise control of {model.label}: {out}")
    rewrite(model.original, spec, out, force=True)  # our own derived file: replaced when its spec differs
    return out


def data_dir_default() -> Path:
    """``$LOOPGRAPH_DATA`` if set, else the samples shipped in the package."""
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else SAMPLES_DIR


def select(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """All items, or ``limit`` of them drawn at random (seeded, without replacement), in file order."""
    if limit is None:
        return items
    if limit < 1:
        raise LoopgraphError(f"--limit {limit} evaluates nothing; give a positive number of items per task or drop --limit")
    if limit >= len(items):
        return items
    picked = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(picked)]


class OnnxScorer:
    """Scores items with ONNX Runtime and the export folder's tokenizer.json."""

    def __init__(self, model: Model, *, device: str = "cpu", threads: int | None = None, max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 max_batch_rows: int = 64, gather: bool = True) -> None:
        self.model = model
        self.tokenizer = TextTokenizer.from_folder(model.path.parent, "the benchmark text")
        self.prefix_id = self.tokenizer.prefix_token_id()  # before the session: a tokenizer without one fails fast
        self.lm = LogitsSession(model.path, device=device, threads=threads, gather=gather)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows

    def token_requests(self, task: Task, item: Item) -> list[TokenRequest]:
        tok, prefix, length = self.tokenizer.encode, self.prefix_id, self.model.max_length
        if task.output_type == ROLLING:
            return rolling_windows(tok(item.requests[0][1]), prefix, length)
        return [encode_pair(c, x, tok, prefix) for c, x in item.requests]

    def score(self, task: Task, items: Sequence[Item], on_item: Callable[[int, list[Score]], None] | None = None,
              on_batch: Callable[[int, int], None] | None = None) -> list[list[Score]]:
        """Per item, the scores of its token requests (for a rolling task: of its windows)."""
        groups = [self.token_requests(task, it) for it in items]
        return score_groups(groups, self.lm.logits_at, max_length=self.model.max_length, max_batch_tokens=self.max_batch_tokens,
                            max_batch_rows=self.max_batch_rows, on_group=on_item, on_batch=on_batch)


@dataclasses.dataclass
class TaskResult:
    """One model on one task."""
    scores: list[list[Score]]  # per item, per request
    per_item: list[dict[str, float]]
    metrics: dict[str, float]
    seconds: float
    from_cache: int  # items found in the cache
    tokens: int  # ids fed for the items scored now (0 when all came from the cache)


@dataclasses.dataclass
class EvalReport:
    models: list[Model]
    tasks: list[Task]
    items: dict[str, list[Item]]  # per task, the items evaluated
    totals: dict[str, int]  # per task, items in the data file
    results: dict[str, dict[str, TaskResult]]  # task -> model label -> result
    config: dict
    seconds: float


def evaluate(paths: Sequence[str | Path], tasks: Sequence[Task], *, data_dir: Path | None = None, limit: int | None = None,
             seed: int = 1234, cache_dir: Path | None = None, device: str = "cpu", threads: int | None = None,
             max_batch_tokens: int = DEFAULT_BATCH_TOKENS, max_length: int | None = None, noise_control: bool = False,
             progress: bool = True, original: str | os.PathLike | None = None,
             say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> EvalReport:
    """Evaluate ``paths`` (the first is the baseline of the comparison) on ``tasks``. ``original``:
    the export the looped models were rewritten from, for ``noise_control`` (default: recorded)."""
    t0 = time.time()
    if limit is not None and limit < 1:
        raise LoopgraphError(f"--limit {limit} evaluates nothing; give a positive number of items per task or drop --limit")
    if max_batch_tokens < 1:
        raise LoopgraphError(f"--max-batch-tokens {max_batch_tokens} must be at least 1")
    data_dir = Path(data_dir) if data_dir is not None else data_dir_default()
    loaded = {t.name: load_items(t, data_dir) for t in tasks}  # all data errors before any model work
    models = [open_model(p, max_length, noise_control=noise_control, original=original) for p in paths]
    if noise_control:
        looped = [m for m in models if m.spec is not None and m.spec.noise_seed is None]
        if not looped:
            raise LoopgraphError("--noise-control needs at least one looped model (a loopgraph rewrite) among the models")
        for m in looped:
            models.append(dataclasses.replace(open_model(noise_variant(m, seed, say), max_length), noise_of=m.label))
    _unique_labels(models)
    cache = ScoreCache(cache_dir)
    items = {name: select(all_items, limit, seed) for name, all_items in loaded.items()}
    results: dict[str, dict[str, TaskResult]] = {t.name: {} for t in tasks}
    try:
        for task in tasks:
            for model in models:
                results[task.name][model.label] = _run(model, task, items[task.name], cache, device, threads, max_batch_tokens,
                                                       progress, say)
    finally:
        cache.close()
    config = {"data_dir": str(data_dir), "samples": data_dir.resolve() == SAMPLES_DIR.resolve(), "limit": limit, "seed": seed,
              "device": device, "threads": threads, "max_batch_tokens": max_batch_tokens,
              "cache": None if cache.path is None else str(cache.path), "noise_control": noise_control}
    return EvalReport(models, list(tasks), items, {k: len(v) for k, v in loaded.items()}, results, config, time.time() - t0)


def _unique_labels(models: list[Model]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        seen[m.label] = seen.get(m.label, 0) + 1
    for m in models:
        if seen[m.label] > 1:
            m.label = str(m.path)
    if len({m.label for m in models}) < len(models):
        raise LoopgraphError("the same model file is given twice; give each model once")


def _run(model: Model, task: Task, items: list[Item], cache: ScoreCache, device: str, threads: int | None,
         max_batch_tokens: int, progress: bool, say: Callable[[str], None]) -> TaskResult:
    t0 = time.time()
    keys = [item_key(model.key, it.requests) for it in items]
    scores = cache.get(keys)
    todo = [i for i, k in enumerate(keys) if k not in scores]
    tokens = 0
    if todo:
        scorer = OnnxScorer(model, device=device, threads=threads, max_batch_tokens=max_batch_tokens)
        bar = _Progress(progress, f"{task.name} · {model.label}", len(items) - len(todo), len(items))
        pending: dict[str, list[Score]] = {}

        def on_item(j: int, s: list[Score]) -> None:
            pending[keys[todo[j]]] = s
            bar.item_done()

        def on_batch(done: int, total: int) -> None:
            nonlocal tokens
            tokens = done
            bar.tokens(done, total)
            cache.put(pending)  # committed batch by batch: an interrupted run resumes from here
            pending.clear()

        try:
            new = scorer.score(task, [items[i] for i in todo], on_item=on_item, on_batch=on_batch)
        finally:
            bar.close()
        cache.put(pending)
        scores.update({keys[i]: s for i, s in zip(todo, new)})
    per_item = [item_metrics(task, it, scores[k]) for it, k in zip(items, keys)]
    result = TaskResult([scores[k] for k in keys], per_item, aggregate(task, per_item), time.time() - t0, len(items) - len(todo), tokens)
    if todo:
        say(f"{task.name} · {model.label}: {len(todo)} items scored in {result.seconds:.1f} s "
            f"({len(todo) / result.seconds:.2f} items/s, {tokens / result.seconds:.0f} tok/s)"
            + (f"; {result.from_cache} from the cache" if result.from_cache else ""))
    else:
        say(f"{task.name} · {model.label}: all {len(items)} items from the cache")
    return result


class _Progress:
    """A tqdm bar on stderr whose ETA follows the tokens fed (items differ in length); items done in the postfix."""

    def __init__(self, enabled: bool, desc: str, items_done: int, items_total: int) -> None:
        self.items_done, self.items_total = items_done, items_total
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(desc=desc, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def item_done(self) -> None:
        self.items_done += 1

    def tokens(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"{self.items_done}/{self.items_total} items", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
