"""loopgraph tune on the tiny fixtures: the block chain equals the Loop graphs, the search agrees
with an exhaustive sweep, a planted effect is found and confirmed, a null task confirms nothing,
splits are disjoint, and a resumed run scores nothing twice.

Numeric checks: CPUExecutionProvider, 1 intra-op thread (``threads=1`` everywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.eval.scoring import score_groups
from loopgraph.eval.tasks import get_task, load_items
from loopgraph.experiments import tune as tune_mod
from loopgraph.experiments.chain import BlockChain, Variant, split_model
from loopgraph.experiments.grid import Cell, Reg
from loopgraph.experiments.search import pairs, schedule
from loopgraph.experiments.sweep import sweep, tokenize
from loopgraph.experiments.tune import detectable_effect, item_identity, make_splits, tune
from loopgraph.experiments.tune_report import write_outputs
from loopgraph.metadata import read_spec
from loopgraph.onnxio import load_model
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession
from loopgraph.spec import LoopSpec
from tests import fixtures
from tests.conftest import DATA_DIR, run_cli

QUIET = {"threads": 1, "progress": False, "say": lambda m: None}


@pytest.fixture(scope="module")
def model(tiny) -> Path:
    return tiny("llama") / "model.onnx"


# --- the block chain --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chain_equals_the_loop_graphs(tiny, arch):
    """Baseline and every regularizer (with and without noise control) through the chain vs the
    rewritten Loop graph in ORT: max |Δ logits| <= 1e-4 (CPU EP, 1 thread)."""
    m = load_model(tiny(arch) / "model.onnx", load_weights=True)
    chain = BlockChain(split_model(m), threads=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, fixtures.VOCAB, (2, 11))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as the scorer pads
    at = np.array([3, 5, 10, 11 + 2, 11 + 7], np.int64)
    base = LogitsSession(m, threads=1).logits_at(ids, mask, at)
    got = chain.logits(None, ids, mask, at)
    assert np.abs(base - got).max() <= 1e-5, f"{arch}: chain baseline vs model.onnx {np.abs(base - got).max():.2e} (CPU, 1 thread)"
    regs = [Reg("uniform"), Reg("naive"), Reg("anchor", 0.5), Reg("ema", 0.3), Reg("damped", 3.0), Reg("auto-align")]
    for reg in regs if arch == "llama" else regs[:1]:
        for s, e, n, seed in ((0, 2, 3, None), (1, 2, 2, 7), (3, 4, 3, None) if reg.name == "uniform" else (1, 4, 2, 7)):
            spec = LoopSpec(s, e, iters=n, reg=reg.name, alpha=reg.weight if reg.name in ("anchor", "ema") else None,
                            k=reg.weight if reg.name == "damped" else None, noise_seed=seed)
            ref = LogitsSession(rewrite(m, spec).model, threads=1).logits_at(ids, mask, at)
            out = chain.logits(Variant(Cell(s, e, n, reg), seed), ids, mask, at)
            assert not np.array_equal(ref, base), f"{spec.slug()} did not change the logits"
            assert np.abs(ref - out).max() <= 1e-4, f"{arch} {spec.slug()}: chain vs Loop graph {np.abs(ref - out).max():.2e}"


def test_chain_block_runs(model):
    chain = BlockChain(split_model(load_model(model, load_weights=True)), threads=1)
    ids, mask, at = np.full((1, 6), 5, np.int64), np.ones((1, 6), np.int64), np.array([5], np.int64)
    chain.logits(None, ids, mask, at)
    assert chain.block_runs == 4  # the boundaries: each block once
    for cell in (Cell(1, 3, 2, Reg("uniform")), Cell(1, 3, 3, Reg("uniform")), Cell(1, 3, 2, Reg("anchor", 0.5)), Cell(1, 3, 3, Reg("anchor", 0.5))):
        chain.logits(Variant(cell), ids, mask, at)
    # y_2 once (2 blocks), y_3 per regularizer (2 x 2), a tail of block 3 per cell (4): 10 runs
    assert chain.block_runs == 4 + 2 + 4 + 4


# --- the schedule and the splits --------------------------------------------------------------

def test_schedule():
    rounds = schedule(930, 633, 48, 2, 6)
    assert [(r.items, r.cells) for r in rounds] == [(48, 930), (96, 465), (192, 233), (384, 117), (633, 59)]
    assert pairs(rounds) == 930 * 48 + 465 * 48 + 233 * 96 + 117 * 192 + 59 * 249
    assert schedule(10, 20, 50, 2, 4) == [schedule(10, 20, 50, 2, 4)[0]] and schedule(10, 20, 50, 2, 4)[0].items == 20
    assert [r.cells for r in schedule(8, 64, 8, 2, 6)] == [8, 6, 6, 6]  # never below keep


def test_detectable_effect_has_an_exact_floor():
    # 30 items at 0.05 / 3: exact McNemar needs 7 gains without a loss (2 * 0.5**7 < 0.0167)
    assert detectable_effect(30, [0], 0.05, 3) == pytest.approx(7 / 30)
    assert detectable_effect(1000, [100], 0.05, 1) == pytest.approx((1.959964 + 0.841621) * (0.1 / 1000) ** 0.5, rel=1e-4)


def test_splits_are_disjoint():
    halves = make_splits("winogrande", DATA_DIR, 1234)
    assert halves.how == "halves" and abs(len(halves.tune) - len(halves.confirm)) <= 1
    assert not {item_identity(i) for i in halves.tune} & {item_identity(i) for i in halves.confirm}
    assert not {i.index for i in halves.tune} & {i.index for i in halves.confirm}
    assert make_splits("winogrande", DATA_DIR, 1234).tune == halves.tune  # seeded
    assert make_splits("winogrande", DATA_DIR, 99).tune != halves.tune
    arc = make_splits("arc_easy", DATA_DIR, 1234, tune_limit=50, confirm_limit=50)
    assert (arc.how, arc.tune_file, arc.confirm_file) == ("dev/reported", "arc_easy/arc_easy_dev.jsonl", "arc_easy/arc_easy_test.jsonl")
    assert not {item_identity(i) for i in arc.tune} & {item_identity(i) for i in arc.confirm}
    with pytest.raises(LoopgraphError, match="not a multiple-choice"):
        make_splits("wikitext", DATA_DIR, 1)


# --- the search against an exhaustive sweep ---------------------------------------------------

def _as_data_dir(items, task: str, src: Path, dest: Path) -> Path:
    """A data folder holding only ``items`` (their original lines) as the task's file."""
    rel = get_task(task).files[0]
    lines = (src / rel).read_text(encoding="utf-8").splitlines()
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    (dest / rel).write_text("".join(lines[i.index] + "\n" for i in items), encoding="utf-8")
    return dest


def test_search_agrees_with_exhaustive_sweep(model, tmp_path):
    """The pick's exhaustive delta is inside the exhaustive best's 95 % CI, and every cell the
    search scored on all tuning items has sweep's delta and per-item correctness."""
    kw = {"ranges": "all", "iters": "2,3", "regs": "uniform", "data_dir": DATA_DIR, "tune_limit": 24, "confirm_limit": 12, "n0": 6}
    result = tune(model, ["winogrande"], **kw, confirm=1, cache_dir=tmp_path / "c", **QUIET)
    t = result.tasks[0]
    data = _as_data_dir(t.splits.tune, "winogrande", DATA_DIR, tmp_path / "data")
    exhaustive = sweep(model, "winogrande", ranges="all", iters="2,3", regs="uniform", data_dir=data, cache_dir=None, **QUIET)
    assert exhaustive.n == len(t.splits.tune) == 24
    rows = {r.cell: r for r in exhaustive.rows}
    best = max(exhaustive.rows, key=lambda r: r.delta)
    pick = t.finalists[0].key
    assert best.ci95[0] <= rows[pick].delta <= best.ci95[1], (pick, rows[pick].delta, best.cell, best.ci95)
    full = [st for st in t.table.values() if st.dropped_after is None]
    assert len(full) >= 4
    for st in full:
        assert st.items == 24 and st.delta == pytest.approx(rows[st.key].delta, abs=1e-12), (st.key, st.delta, rows[st.key].delta)
    assert t.work["pairs"] < len(t.cells) * 24, "the search scored every pair: no halving happened"


# --- planted effect and null ------------------------------------------------------------------

PLANTED = Cell(1, 3, 3, Reg("naive"))


def _planted_data(model: Path, dest: Path, n_dev: int = 30, n_test: int = 30) -> Path:
    """ARC-format items whose gold is the option the model looped as PLANTED prefers (by summed
    log-likelihood, ``acc``), 70 % of them items where the baseline prefers another option: the
    planted cell is right on every item, the baseline on 30 %. Looping changes about 10 % of the
    random model's answers, so the items are picked from 800 random candidates."""
    words = sorted(set(fixtures.CORPUS.split()))
    rng = np.random.default_rng(5)
    docs = []
    for i in range(800):
        q = " ".join(rng.choice(words, 6))
        opts = [" ".join(rng.choice(words, 2)) for _ in range(4)]
        if len(set(opts)) == 4:
            docs.append({"id": f"p{i}", "question": q, "choices": {"text": opts, "label": list("ABCD")}, "answerKey": "A"})
    items = [get_task("arc_easy").render(d) for d in docs]
    groups = tokenize(items, model.parent)
    m = load_model(model, load_weights=True)
    spec = PLANTED.reg.spec(PLANTED.start, PLANTED.end, PLANTED.iters, dynamic=False)

    def preds(lm) -> list[int]:
        scores = score_groups(groups, lm.logits_at, max_length=256)
        return [int(np.argmax([s.ll for s in sc])) for sc in scores]
    base, loop = preds(LogitsSession(m, threads=1)), preds(LogitsSession(rewrite(m, spec).model, threads=1))
    differ = [i for i in range(len(items)) if base[i] != loop[i]]
    same = [i for i in range(len(items)) if base[i] == loop[i]]
    need = n_dev + n_test
    k = min(len(differ), int(0.7 * need))
    assert k >= 0.5 * need, f"looping {PLANTED} changed only {len(differ)} of {len(items)} answers; the fixture needs more"
    chosen = list(rng.permutation(differ)[:k]) + list(rng.permutation(same)[:need - k])
    rng.shuffle(chosen)
    out = []
    for i in chosen:
        d = dict(docs[i])
        d["answerKey"] = "ABCD"[loop[i]]
        out.append(json.dumps(d))
    (dest / "arc_easy").mkdir(parents=True)
    (dest / "arc_easy" / "arc_easy_dev.jsonl").write_text("\n".join(out[:n_dev]) + "\n", encoding="utf-8")
    (dest / "arc_easy" / "arc_easy_test.jsonl").write_text("\n".join(out[n_dev:]) + "\n", encoding="utf-8")
    return dest


def test_planted_effect_is_found_confirmed_and_written(model, tmp_path):
    data = _planted_data(model, tmp_path / "data")
    result = tune(model, ["arc_easy"], ranges="all", iters="2,3", regs="uniform,naive", data_dir=data, n0=8, metric="acc",
                  cache_dir=tmp_path / "c", **QUIET)
    t = result.tasks[0]
    assert t.splits.how == "dev/reported" and t.metric == "acc"
    assert PLANTED in {f.key for f in t.finalists}, [f.key for f in t.finalists]
    planted = next(c for c in t.confirmations if c.cell == PLANTED)
    assert planted.confirmed and planted.p_holm < 0.05 and planted.delta > 0.3, planted
    assert planted.value == 1.0, "the planted cell's real graph is right on every held-out item by construction"
    assert t.winner is not None and t.winner.delta == pytest.approx(planted.delta)
    paths = write_outputs(result, tmp_path / "out", write_models=True, say=lambda m: None)
    written = load_model(paths["model_arc_easy"])
    spec = read_spec(written)
    w = t.winner.cell
    assert (spec.start, spec.end, spec.iters, spec.reg, spec.dynamic) == (w.start, w.end, w.iters, w.reg.name, False)
    md = paths["md"].read_text()
    assert "**Confirmed:**" in md and "| yes |" in md
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_no_effect_confirms_nothing(model, tmp_path):
    """A random tiny model on WinoGrande (chance level, looping only shuffles answers): no claim, no model."""
    result = tune(model, ["winogrande"], ranges="all", iters="2,3", regs="uniform", data_dir=DATA_DIR, tune_limit=32,
                  confirm_limit=60, n0=8, cache_dir=tmp_path / "c", **QUIET)
    t = result.tasks[0]
    assert len(t.confirmations) == 3 and not any(c.confirmed for c in t.confirmations), t.confirmations
    assert all(c.p_holm >= 0.05 for c in t.confirmations)
    paths = write_outputs(result, tmp_path / "out", write_models=True, say=lambda m: None)
    assert not any(k.startswith("model") for k in paths)
    assert "**No confirmed gain:**" in paths["md"].read_text()
    data = json.loads(paths["json"].read_text())["tasks"][0]
    assert not set(data["splits"]["tune_items"]) & set(data["splits"]["confirm_items"])
    assert len(data["splits"]["tune_items"]) == 32 and len(data["splits"]["confirm_items"]) == 60


# --- resume -----------------------------------------------------------------------------------

def test_resume_scores_nothing_twice(model, tmp_path, monkeypatch):
    """Stopped after 2 search jobs, then resumed: no (variant, item) pair is scored twice and
    together the two runs score exactly the schedule's pairs; a third run runs no job at all."""
    kw = {"ranges": "all", "iters": "2,3", "regs": "uniform", "data_dir": DATA_DIR, "tune_limit": 20, "confirm_limit": 10, "n0": 5,
          "cache_dir": tmp_path / "c", "oracle": True, **QUIET}
    real = tune_mod.run_search_job
    scored: list[tuple] = []
    calls = {"n": 0, "stop_at": 2}

    def counting(job):
        calls["n"] += 1
        if calls["n"] > calls["stop_at"]:
            raise KeyboardInterrupt  # as if stopped here: the 2 jobs before are committed
        out = real(job)
        scored.extend((v, job.items[k]) for v, todo in zip(job.variants, job.todo) for k in todo)
        return out
    monkeypatch.setattr(tune_mod, "run_search_job", counting)
    with pytest.raises(KeyboardInterrupt):
        tune(model, ["winogrande"], **kw)
    first = list(scored)
    assert first
    scored.clear()
    calls["stop_at"] = 10**9
    done = tune(model, ["winogrande"], **kw).tasks[0]
    assert not set(first) & set(scored), "the resumed run scored a pair the interrupted run had committed"
    assert len(scored) == len(set(scored)) and len(first) == len(set(first)), "a pair was scored twice within one run"
    expected = pairs(done.rounds) + len(done.cells) * 5 + 20  # the race + the oracle's noise controls + the baseline
    assert len(first) + len(scored) == expected
    assert done.work["pairs_cached"] > 0

    def no_job(job):
        raise AssertionError(f"a finished tune ran a search job for {len(job.variants)} variants")

    def no_confirm(job):
        raise AssertionError("a finished tune ran a confirmation graph")
    monkeypatch.setattr(tune_mod, "run_search_job", no_job)
    monkeypatch.setattr(tune_mod, "run_confirm_job", no_confirm)
    again = tune(model, ["winogrande"], **kw).tasks[0]
    assert again.work["pairs"] == 0 and again.work["block_runs"] == 0
    assert [(c.cell, c.delta, c.p_mcnemar) for c in again.confirmations] == [(c.cell, c.delta, c.p_mcnemar) for c in done.confirmations]

    # widened (a second regularizer): the uniform cells' first-round pairs all come from the cache
    monkeypatch.setattr(tune_mod, "run_search_job", real)
    monkeypatch.undo()
    wider = tune(model, ["winogrande"], **{**kw, "regs": "uniform,naive", "oracle": False}).tasks[0]
    assert wider.work["pairs_cached"] >= len(done.cells) * 5, wider.work
    assert len(wider.cells) == 2 * len(done.cells)


def test_interrupted_confirmation_keeps_its_chunks(model, tmp_path, monkeypatch):
    """The confirmation runs in chunks of items, each in the cache as it ends: stopped after 3
    chunks and resumed, no (graph, item) pair is scored twice, together the runs score each of
    the 3 graphs on every held-out item once, and the result equals an uninterrupted run's."""
    kw = {"ranges": "0:2,1:3", "iters": "2", "regs": "uniform", "data_dir": DATA_DIR, "tune_limit": 8, "confirm_limit": 16,
          "n0": 4, "confirm": 1, "keep": 2, **QUIET}
    monkeypatch.setattr(tune_mod, "CONFIRM_JOB_TOKENS", 600)  # a few items per chunk on the fixture
    real = tune_mod.run_confirm_job
    scored: list[tuple] = []
    calls = {"n": 0, "stop_at": 3}

    def counting(job):
        calls["n"] += 1
        if calls["n"] > calls["stop_at"]:
            raise KeyboardInterrupt
        scored.extend(((job.cell, job.noise_seed), repr(g)) for g in job.groups)
        return real(job)
    monkeypatch.setattr(tune_mod, "run_confirm_job", counting)
    with pytest.raises(KeyboardInterrupt):
        tune(model, ["winogrande"], **kw, cache_dir=tmp_path / "c")
    first = list(scored)
    assert len(first) > 3, "a chunk should hold several items at this budget"
    scored.clear()
    calls["stop_at"] = 10**9
    resumed = tune(model, ["winogrande"], **kw, cache_dir=tmp_path / "c").tasks[0]
    assert not set(first) & set(scored), "the resumed confirmation re-scored an item a finished chunk had stored"
    assert len(first) + len(scored) == len(set(first + scored)) == 3 * 16, (len(first), len(scored))
    whole = tune(model, ["winogrande"], **kw, cache_dir=tmp_path / "fresh").tasks[0]
    assert [(c.cell, c.value, c.baseline, c.noise_value) for c in resumed.confirmations] == \
        [(c.cell, c.value, c.baseline, c.noise_value) for c in whole.confirmations]


def test_pool_and_ray_give_the_same_standings(model, tmp_path):
    """--workers 2 (spawned processes) and --executor ray: the same per-cell standings and confirmation as inline."""
    kw = {"ranges": "0:2,1:3", "iters": "2,3", "regs": "uniform", "data_dir": DATA_DIR, "tune_limit": 8, "confirm_limit": 4,
          "n0": 4, "confirm": 1, "keep": 2, "cache_dir": None, **QUIET}

    def summary(r):
        t = r.tasks[0]
        return sorted((c, st.items, st.signal, st.delta) for c, st in t.table.items()), [(c.cell, c.delta) for c in t.confirmations]
    inline = summary(tune(model, ["winogrande"], **kw))
    assert summary(tune(model, ["winogrande"], **kw, workers=2)) == inline
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert summary(tune(model, ["winogrande"], **kw, executor="ray")) == inline
    finally:
        ray.shutdown()


# --- the command line -------------------------------------------------------------------------

def test_cli_dry_run_and_errors(model, tmp_path):
    common = [model, "--task", "winogrande", "--data-dir", DATA_DIR, "--tune-limit", "12", "--confirm-limit", "8", "--first-items", "4",
              "--ranges", "0:2,1:3", "--reg", "uniform", "--confirm", "1", "--keep", "2", "--threads", "1", "--cache-dir", tmp_path / "c", "--no-progress",
              "-o", tmp_path / "out"]
    dry = run_cli("tune", *common, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "estimated total:" in dry.stdout and "ms per block-token" in dry.stdout, dry.stdout
    assert not (tmp_path / "out").exists()
    bad = run_cli("tune", *common, "--eta", "1")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--eta 1" in bad.stderr, bad.stderr
    for kw, match in (({"confirm": 0}, "--confirm 0"), ({"confirm": 3, "keep": 2}, "below --confirm"), ({"executor": "dask"}, "local or ray"),
                      ({"significance": 2.0}, "between 0 and 1")):
        with pytest.raises(LoopgraphError, match=match):
            tune(model, ["winogrande"], data_dir=DATA_DIR, **kw, **QUIET)
    with pytest.raises(LoopgraphError, match="at least one --task"):
        tune(model, [], data_dir=DATA_DIR, **QUIET)
    done = run_cli("tune", *common)
    assert done.returncode == 0, done.stderr
    assert {"tune.md", "tune.json", "tune_winogrande_N2_uniform.png", "tune_winogrande_N3_uniform.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert "winogrande:" in done.stdout


def test_items_of_a_limit_stay_in_their_split():
    all_items = load_items(get_task("winogrande"), DATA_DIR)
    s = make_splits("winogrande", DATA_DIR, 1234, tune_limit=10, confirm_limit=10)
    tune_half = {i.index for i in make_splits("winogrande", DATA_DIR, 1234).tune}
    assert {i.index for i in s.tune} <= tune_half and not {i.index for i in s.confirm} & tune_half
    assert len(all_items) == 1267
