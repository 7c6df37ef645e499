"""loopgraph tune with per-token halting (``--halt``): the block chain applies docs/halting.md's
live rule as the halting Loop graph does, plain cells keep their cache keys, and a halting
finalist is confirmed on the real halting graph.

Numeric checks: CPUExecutionProvider, 1 intra-op thread (``threads=1`` everywhere)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from loopgraph import __version__
from loopgraph.errors import LoopgraphError
from loopgraph.eval.metrics import item_metrics
from loopgraph.eval.scoring import score_groups
from loopgraph.experiments import tune as tune_mod
from loopgraph.experiments.chain import BlockChain, Variant, change, first_state, split_model, update
from loopgraph.experiments.grid import Cell, Reg, make_cells, parse_halts
from loopgraph.experiments.sweep import cell_key, tokenize
from loopgraph.experiments.tune import tune, variant_key
from loopgraph.onnxio import load_model
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession
from tests import fixtures
from tests.conftest import DATA_DIR

QUIET = {"threads": 1, "progress": False, "say": lambda m: None}


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, fixtures.VOCAB, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as the scorer pads
    mask[2, 5:] = 0
    return ids, mask, np.array([3, 5, 11, 12 + 2, 12 + 7, 24 + 4], np.int64)


def _tol_between(chain: BlockChain, reg: Reg, s: int, e: int, ids, mask, metric: str) -> float:
    """A TOL in the widest gap of the real tokens' change at t = 2 near their median, so about
    half of them freeze and float rounding cannot move a token across it."""
    h, feeds = chain.boundaries(ids, mask)
    x1 = first_state(h[e])
    x2 = update(reg, x1, chain.run_blocks(s, e, h[e], feeds))
    c = np.sort(change(x2.x, x1.x, metric)[..., 0][mask.astype(bool)])
    mid = len(c) // 2
    lo = max(range(mid - 3, mid + 3), key=lambda i: c[i + 1] - c[i])
    assert c[lo + 1] - c[lo] > 1e-4 * c[lo], f"no gap in the t = 2 changes {c}"
    return float((c[lo] + c[lo + 1]) / 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chain_halting_equals_the_halting_loop_graph(tiny, arch):
    """Halting cells through the chain vs the rewritten halting Loop graph: max |Δ logits| <= 1e-4
    for every regularizer on llama (rel and cos, with and without noise control), about half the
    real tokens frozen at t = 2; TOL 0 is the plain cell and a huge TOL is N = 2, bit for bit."""
    m = load_model(tiny(arch) / "model.onnx", load_weights=True)
    chain = BlockChain(split_model(m), threads=1)
    ids, mask, at = _batch()
    regs = [Reg("uniform"), Reg("anchor", 0.5), Reg("auto-align"), Reg("naive"), Reg("ema", 0.3), Reg("damped", 3.0)]
    for reg in regs if arch == "llama" else regs[:1]:
        for s, e, n, metric, seed in ((0, 2, 3, "rel", None), (1, 3, 4, "cos", None), (1, 3, 3, "rel", 7)):
            tol = _tol_between(chain, reg, s, e, ids, mask, metric)
            halting = dataclasses.replace(reg, halt=tol, halt_metric=metric)
            spec = dataclasses.replace(halting.spec(s, e, n, dynamic=False), noise_seed=seed)
            ref = LogitsSession(rewrite(m, spec).model, threads=1).logits_at(ids, mask, at)
            out = chain.logits(Variant(Cell(s, e, n, halting), seed), ids, mask, at)
            plain = chain.logits(Variant(Cell(s, e, n, reg), seed), ids, mask, at)
            assert not np.array_equal(out, plain), f"{arch} {spec.slug()}: halting changed nothing (TOL {tol:.4g})"
            assert np.abs(ref - out).max() <= 1e-4, f"{arch} {spec.slug()}: chain vs halting Loop graph {np.abs(ref - out).max():.2e} (CPU, 1 thread)"
        zero = chain.logits(Variant(Cell(0, 2, 3, dataclasses.replace(reg, halt=0.0))), ids, mask, at)
        assert np.array_equal(zero, chain.logits(Variant(Cell(0, 2, 3, reg)), ids, mask, at)), f"{reg.label}: TOL 0 is not the plain cell"
        huge = chain.logits(Variant(Cell(0, 2, 3, dataclasses.replace(reg, halt=1e9))), ids, mask, at)
        assert np.array_equal(huge, chain.logits(Variant(Cell(0, 2, 2, reg)), ids, mask, at)), f"{reg.label}: a huge TOL is not N = 2"


def test_grid_keys_and_errors():
    """Halting with N <= 2 is the plain cell; labels and keys say the rule; a plain cell's keys are
    what they were before halting existed (the committed score cache stays valid)."""
    cells = make_cells([(0, 2)], [2, 3], [Reg("uniform")], [None, 0.2])
    assert cells == [Cell(0, 2, 2, Reg("uniform")), Cell(0, 2, 3, Reg("uniform")), Cell(0, 2, 3, Reg("uniform", halt=0.2))]
    assert Reg("anchor", 0.5, 0.1, "cos").label == "anchor:0.5+halt-cos:0.1" and Reg("uniform", halt=0.2).label == "uniform+halt:0.2"
    plain = Cell(3, 7, 3, Reg("anchor", 0.5))
    old = json.dumps([3, 7, "anchor", 0.5, 3, None])
    assert variant_key("m", Variant(plain)) == hashlib.sha256(f"{tune_mod.CACHE_NAMESPACE}\0{__version__}\0m\0{old}".encode()).hexdigest()
    halting = Cell(3, 7, 3, Reg("anchor", 0.5, 0.2))
    assert variant_key("m", Variant(halting)) != variant_key("m", Variant(plain)) and cell_key("m", halting) != cell_key("m", plain)
    assert parse_halts(None) == [None] and parse_halts("none, 0.2") == [None, 0.2]
    for text, metric, match in (("0.2,x", "rel", "'x' is not a number"), ("-1", "rel", "finite number >= 0"), ("0.2,0.2", "rel", "twice"),
                                (",", "rel", "is empty"), (None, "cos", "--halt-metric needs --halt")):
        with pytest.raises(LoopgraphError, match=match):
            parse_halts(text, metric)


def test_tune_confirms_a_halting_finalist_on_the_real_graph(tiny, tmp_path):
    """Every searched cell halts (``--iters 3 --halt 0.3``); the finalist's held-out value is what
    the halting Loop graph scores on those items, and the report names the rule."""
    model = tiny("llama") / "model.onnx"
    result = tune(model, ["winogrande"], ranges="0:2,1:3,2:4", iters="3", regs="uniform", halt="0.3", data_dir=DATA_DIR,
                  tune_limit=12, confirm_limit=10, n0=4, confirm=1, keep=2, cache_dir=tmp_path / "c", **QUIET)
    t = result.tasks[0]
    assert {c.reg for c in t.cells} == {Reg("uniform", halt=0.3)} and result.config["halt"] == [0.3]
    conf = t.confirmations[0]
    spec = conf.cell.reg.spec(conf.cell.start, conf.cell.end, conf.cell.iters, dynamic=False)
    assert spec.halt == 0.3
    lm = LogitsSession(rewrite(load_model(model, load_weights=True), spec).model, threads=1)
    items = t.splits.confirm
    scores = score_groups(tokenize(items, model.parent), lm.logits_at, max_length=256)
    direct = np.mean([item_metrics(t.splits.task, it, sc)[t.metric] for it, sc in zip(items, scores)])
    assert conf.value == pytest.approx(direct, abs=1e-12), (conf.value, direct)
    from loopgraph.experiments.tune_report import write_outputs
    paths = write_outputs(result, tmp_path / "out", say=lambda m: None)
    assert "uniform+halt:0.3" in paths["md"].read_text()
    assert (tmp_path / "out" / "tune_winogrande_N3_uniform-halt-0.3.png").is_file()


def test_sweep_with_halting_cli(tiny, tmp_path):
    """``sweep --halt none,0.3``: a plain and a halting row per N >= 3 cell, the rule in the CSV; a bad TOL is one line, exit 2."""
    import csv

    from tests.conftest import run_cli
    model = tiny("llama") / "model.onnx"
    common = [model, "--task", "winogrande", "--data-dir", DATA_DIR, "--limit", "6", "--ranges", "1:3", "--iters", "2,3", "--threads", "1",
              "--no-progress", "--cache-dir", tmp_path / "c"]
    done = run_cli("sweep", *common, "--halt", "none,0.3", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert sorted((r["iters"], r["halt"], r["halt_metric"]) for r in rows) == [("2", "", ""), ("3", "", ""), ("3", "0.3", "rel")], rows
    bad = run_cli("sweep", *common, "--halt", "0.3,abc", "-o", tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--halt 'abc' is not a number" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_tune_cli_halting_dry_run(tiny, tmp_path):
    from tests.conftest import run_cli
    model = tiny("llama") / "model.onnx"
    common = [model, "--task", "winogrande", "--data-dir", DATA_DIR, "--tune-limit", "12", "--confirm-limit", "8", "--first-items", "4",
              "--ranges", "0:2,1:3", "--reg", "uniform", "--confirm", "1", "--keep", "2", "--threads", "1", "--no-cache", "--no-progress",
              "-o", tmp_path / "out"]
    dry = run_cli("tune", *common, "--halt", "none,0.2", "--halt-metric", "cos", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "6 cells" in dry.stdout + dry.stderr, dry.stdout + dry.stderr  # 2 ranges x (N=2, N=3, N=3 halting)
    bad = run_cli("tune", *common, "--halt-metric", "cos")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--halt-metric needs --halt" in bad.stderr, bad.stderr


def test_halting_twin_shares_y3(tiny):
    """A halting N = 3 cell after its plain twin runs only the tail: y_2 and y_3 are the plain cell's."""
    chain = BlockChain(split_model(load_model(tiny("llama") / "model.onnx", load_weights=True)), threads=1)
    ids, mask, at = np.full((1, 6), 5, np.int64), np.ones((1, 6), np.int64), np.array([5], np.int64)
    chain.logits(None, ids, mask, at)
    chain.logits(Variant(Cell(1, 3, 3, Reg("uniform"))), ids, mask, at)
    runs = chain.block_runs
    chain.logits(Variant(Cell(1, 3, 3, Reg("uniform", halt=0.1))), ids, mask, at)
    assert chain.block_runs - runs == 1  # block 3, the tail
    chain.logits(Variant(Cell(1, 3, 4, Reg("uniform", halt=0.1))), ids, mask, at)
    assert chain.block_runs - runs == 1 + 2 + 1  # y_4 (2 blocks) and the tail
