"""Packed items in tune's block chain (loopgraph.eval.packing): an item's options share their
common context in one row, each option seeing the context and itself at its own positions.

Numeric checks: CPUExecutionProvider, 1 intra-op thread. Packed scores equal the row-per-option
scores to float rounding (|Δ log-likelihood| <= 1e-5 on the tiny fixtures); an all-True allow mask
and an option's neighbours are bit-exact checks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from loopgraph.errors import LoopgraphError
from loopgraph.eval.packing import allow_mask, pack_group, packed_tokens, score_packed
from loopgraph.eval.scoring import score_groups
from loopgraph.experiments import tune as tune_mod
from loopgraph.experiments.chain import BlockChain, Variant, split_model
from loopgraph.experiments.grid import Cell, Reg
from loopgraph.experiments.tune import packing_of, sliding_window, tune
from loopgraph.onnxio import load_model
from tests import fixtures
from tests.conftest import DATA_DIR, run_cli

QUIET = {"threads": 1, "progress": False, "say": lambda m: None}
TOL = 1e-5
CELLS = [None, Variant(Cell(1, 3, 3, Reg("uniform"))), Variant(Cell(0, 2, 2, Reg("anchor", 0.5)), 1234),
         Variant(Cell(2, 4, 3, Reg("auto-align"))), Variant(Cell(1, 4, 3, Reg("uniform", halt=0.5)))]


def _groups(seed: int = 0) -> list:
    """Random items, and the shapes a packer must get right: one option, an option that is the
    others' prefix, one-token options read from the context's row (BoolQ), identical options."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(6):
        ctx = [int(t) for t in rng.integers(3, fixtures.VOCAB, rng.integers(1, 20))]
        out.append([(ctx, [int(t) for t in rng.integers(3, fixtures.VOCAB, rng.integers(1, 8))]) for _ in range(rng.integers(1, 5))])
    out += [[([5, 6, 7], [8]), ([5, 6, 7], [9])], [([5, 6, 7], [8]), ([5, 6, 7], [8, 9])], [([5, 6], [7, 8]), ([5, 6], [7, 8])],
            [([4, 9, 9, 9], [11, 12, 13])]]
    return out


@pytest.fixture(scope="module")
def chains(tiny):
    def get(arch: str):
        if arch not in cache:
            path = tiny(arch) / "model.onnx"
            cache[arch] = (BlockChain(split_model(load_model(path, load_weights=True)), threads=1),
                           BlockChain(split_model(load_model(path, load_weights=True), allow=True), threads=1))
        return cache[arch]
    cache: dict = {}
    return get


# --- the layout -------------------------------------------------------------------------------

def test_pack_layout():
    """Prefix once, each option's rest after it at the positions it has alone, reads mapped there."""
    rows = pack_group(3, [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2], [9, 9, 9])], max_length=64)
    assert len(rows) == 1
    r = rows[0]
    # fed ids: [1,2,3,4], [1,2,3], [1,2,9,9]; common prefix [1,2]
    assert r.group == 3 and r.ids == [1, 2, 3, 4, 3, 9, 9]
    assert r.positions == [0, 1, 2, 3, 2, 2, 3]
    assert r.segment == [0, 0, 1, 1, 2, 3, 3]
    assert r.reads == [(0, [2, 3], (4, 5)), (1, [4], (6,)), (2, [1, 5, 6], (9, 9, 9))]
    allow = allow_mask([r.segment], 9)[0, 0]
    assert allow[4].tolist() == [True, True, False, False, True, False, False, False, False]  # option 2 sees the prefix and itself
    assert allow[6].tolist() == [True, True, False, False, False, True, True, False, False]
    assert allow[:7, 7:].sum() == 0 and allow[7:].all()  # no real query sees padding; padding queries see every key
    assert packed_tokens([[([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2], [9, 9, 9])]], 64) == [7]


def test_rows_wider_than_the_window_are_not_packed():
    requests = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 4], [7])]
    assert len(pack_group(0, requests, 64, window=5)) == 1  # fed [1, 2, 3, 4, 5] and [1, 2, 3, 4]: 5 ids packed
    rows = pack_group(0, requests, 64, window=4)
    assert [r.ids for r in rows] == [[1, 2, 3, 4, 5], [1, 2, 3, 4]]
    assert all(r.segment == [0] * len(r.ids) and r.positions == list(range(len(r.ids))) for r in rows)
    assert [r.reads for r in rows] == [[(0, [3, 4], (5, 6))], [(1, [3], (7,))]]


def test_sliding_window_of_the_config(tiny, tmp_path):
    assert sliding_window(tiny("llama")) is None
    assert sliding_window(tiny("gemma2")) == json.loads((tiny("gemma2") / "config.json").read_text())["sliding_window"]
    (tmp_path / "config.json").write_text(json.dumps({"sliding_window": 32, "use_sliding_window": False}))
    assert sliding_window(tmp_path) is None
    assert sliding_window(tmp_path / "missing") is None


# --- the numbers ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_all_true_allow_is_bit_exact(chains, arch):
    """The allow input all True, positions from the mask: the plain chain's logits bit for bit."""
    plain, packed = chains(arch)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, fixtures.VOCAB, (2, 11))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    at = np.array([3, 5, 10, 11 + 2, 11 + 7], np.int64)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    for v in CELLS:
        plain.clear()
        packed.clear()
        a = plain.logits(v, ids, mask, at)
        b = packed.logits(v, ids, mask, at, positions, np.ones((2, 1, 11, 11), bool))
        assert np.array_equal(a, b), f"{arch} {v}: all-True allow differs by {np.abs(a - b).max():.2e} (CPU, 1 thread)"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_packed_scores_equal_a_row_per_option(chains, arch):
    """Baseline, uniform, anchor with noise control, auto-align and a halting cell: packed vs
    score_groups' rows, |Δ ll| <= 1e-5 and the same greedy flags (CPU, 1 thread)."""
    plain, packed = chains(arch)
    groups = _groups()
    for v in CELLS:
        plain.clear()
        packed.clear()
        a = score_groups(groups, plain.forward(v), max_length=64, max_batch_tokens=128)
        b = score_packed(groups, packed.packed_forward(v), max_length=64, max_batch_tokens=128)
        worst = max(abs(x.ll - y.ll) for ga, gb in zip(a, b) for x, y in zip(ga, gb))
        assert worst <= TOL, f"{arch} {v}: packed vs row per option max |Δ ll| {worst:.2e} > {TOL} (CPU, 1 thread)"
        assert [[x.greedy for x in g] for g in a] == [[y.greedy for y in g] for g in b]
        assert [len(g) for g in b] == [len(g) for g in groups]


def test_an_option_does_not_see_the_others(chains):
    """Change another option's tokens (same length): this option's score is bit-identical; change
    the shared context: it moves."""
    _, packed = chains("llama")
    ctx = [7, 8, 9, 10, 11]
    item = [(ctx, [20, 21, 22]), (ctx, [30, 31]), (ctx, [40, 41, 42, 43])]
    other = [(ctx, [20, 21, 22]), (ctx, [50, 51]), (ctx, [60, 61, 62, 63])]
    moved = [([7, 8, 9, 10, 12], [20, 21, 22]), ([7, 8, 9, 10, 12], [30, 31]), ([7, 8, 9, 10, 12], [40, 41, 42, 43])]
    for v in CELLS[:3]:
        a, b, c = (score_packed([g], packed.packed_forward(v), max_length=64, max_batch_tokens=128)[0] for g in (item, other, moved))
        assert a[0] == b[0], f"{v}: option 0 changed with the other options' tokens"
        assert a[1] != b[1] and a[0].ll != c[0].ll


def test_window_rows_equal_score_groups(chains):
    """With a window narrower than every packed row, the packer feeds a row per option: the same
    numbers as score_groups (to float rounding: it does not merge a prefix option's row)."""
    plain, packed = chains("llama")
    groups = _groups(2)
    a = score_groups(groups, plain.forward(None), max_length=64, max_batch_tokens=128)
    b = score_packed(groups, packed.packed_forward(None), max_length=64, max_batch_tokens=128, window=1)
    assert max(abs(x.ll - y.ll) for ga, gb in zip(a, b) for x, y in zip(ga, gb)) <= TOL


def test_an_export_without_the_mask_pattern_is_not_packed(tiny, tmp_path):
    """Where(cond, 0, -inf) before each Softmax is what the chain ANDs into; without it split_model
    refuses allow with one line, and tune scores a row per option and says why."""
    model = load_model(tiny("llama") / "model.onnx", load_weights=True)
    assert packing_of(model) is None
    for node in model.graph.node:
        if node.op_type == "Constant" and numpy_helper.to_array(node.attribute[0].t).tolist() == [-np.inf]:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([-1e9], np.float32)))
    assert "is not Add(scores, Where(cond, 0, -inf))" in packing_of(model)
    with pytest.raises(LoopgraphError, match=r"block 0: .*tune --no-pack"):
        split_model(model, allow=True)
    folder = tmp_path / "export"
    folder.mkdir()
    for f in tiny("llama").iterdir():
        if f.is_file() and f.name != "model.onnx":
            (folder / f.name).write_bytes(f.read_bytes())
    onnx.save(model, folder / "model.onnx")
    said: list[str] = []
    res = tune(folder / "model.onnx", ["winogrande"], ranges="1:3", iters="2", regs="uniform", data_dir=DATA_DIR, tune_limit=6,
               confirm_limit=4, n0=6, confirm=1, keep=1, threads=1, progress=False, say=said.append)
    assert res.config["pack"] is False and res.tasks[0].work["packed"] is False
    assert any(m.startswith("items are scored a row per option: ") for m in said)


# --- tune: keys, resume ---------------------------------------------------------------------

def test_resume_across_packing_scores_nothing_twice(tiny, tmp_path, monkeypatch):
    """A search run a row per option, then the same search packed on the same cache: nothing is
    scored again and the standings are the same; a wider packed run writes packed keys only for
    the pairs it scores, and a row-per-option rerun of that reads them back."""
    model = tiny("llama") / "model.onnx"
    kw = {"iters": "2", "regs": "uniform", "data_dir": DATA_DIR, "tune_limit": 12, "confirm_limit": 6, "n0": 6, "confirm": 1,
          "keep": 2, "cache_dir": tmp_path / "cache", **QUIET}
    first = tune(model, ["winogrande"], ranges="0:2,1:3,2:4", pack=False, **kw).tasks[0]
    assert first.work["pairs"] > 0 and first.work["packed"] is False
    scored: list[int] = []
    real = tune_mod.run_search_job
    monkeypatch.setattr(tune_mod, "run_search_job", lambda job: scored.append(sum(map(len, job.todo))) or real(job))
    again = tune(model, ["winogrande"], ranges="0:2,1:3,2:4", pack=True, **kw).tasks[0]
    assert again.work["pairs"] == 0 and scored == [] and again.work["packed"] is True
    assert again.work["scores_of_other_scoring"] > 0
    assert {c: (s.signal, s.delta) for c, s in again.table.items()} == {c: (s.signal, s.delta) for c, s in first.table.items()}
    wider = tune(model, ["winogrande"], ranges="0:2,1:3,2:4,0:4", pack=True, **kw).tasks[0]
    assert wider.work["pairs"] > 0
    before = len(scored)
    back = tune(model, ["winogrande"], ranges="0:2,1:3,2:4,0:4", pack=False, **kw).tasks[0]
    assert back.work["pairs"] == 0 and len(scored) == before
    assert {c: (s.signal, s.delta) for c, s in back.table.items()} == {c: (s.signal, s.delta) for c, s in wider.table.items()}


def test_packed_and_plain_searches_agree(tiny):
    """The same search packed and a row per option: every standing's signal within 1e-6 and the
    same finalists (no cache)."""
    model = tiny("llama") / "model.onnx"
    kw = {"ranges": "all", "iters": "2,3", "regs": "uniform", "data_dir": DATA_DIR, "tune_limit": 16, "confirm_limit": 8, "n0": 8,
          "confirm": 2, **QUIET}
    a = tune(model, ["arc_easy"], pack=False, **kw).tasks[0]
    b = tune(model, ["arc_easy"], pack=True, **kw).tasks[0]
    assert a.table.keys() == b.table.keys()
    worst = max(abs(a.table[c].signal - b.table[c].signal) for c in a.table)
    assert worst <= 1e-6, f"packed vs row per option: signal differs by {worst:.2e} (CPU, 1 thread)"
    assert [s.key for s in a.finalists] == [s.key for s in b.finalists]
    assert b.work["block_tokens"] < a.work["block_tokens"]


def test_cli_no_pack(tiny, tmp_path):
    model = tiny("llama") / "model.onnx"
    common = ["tune", str(model), "--task", "winogrande", "--ranges", "1:3", "--iters", "2", "--reg", "uniform", "--data-dir",
              str(DATA_DIR), "--tune-limit", "6", "--confirm-limit", "4", "--first-items", "6", "--confirm", "1", "--keep", "1",
              "--threads", "1", "--no-progress", "--no-cache"]
    packed = run_cli(*common, "-o", str(tmp_path / "a"))
    plain = run_cli(*common, "--no-pack", "-o", str(tmp_path / "b"))
    assert packed.returncode == 0 and plain.returncode == 0, packed.stderr + plain.stderr
    assert json.loads((tmp_path / "a" / "tune.json").read_text())["config"]["pack"] is True
    assert json.loads((tmp_path / "b" / "tune.json").read_text())["config"]["pack"] is False
    assert "packed (an item's options share their context in one row)" in (tmp_path / "a" / "tune.md").read_text()
    assert "a row per option" in (tmp_path / "b" / "tune.md").read_text()


def test_item_keys_are_the_old_formula():
    """The keys tune builds from once-encoded items are byte for byte the cache's old formula
    (the committed score cache must keep being found)."""
    import hashlib

    from loopgraph.eval.cache import SCORING_VERSION, encode_requests, encoded_item_key, encoded_item_keys, item_key
    requests = [("Ein \"Zitat\" — naïve\n\t", " ünïcode ✓"), ("", "x\\y")]
    old = hashlib.sha256(json.dumps([SCORING_VERSION, "m\u00e9", [list(r) for r in requests]], ensure_ascii=False).encode()).hexdigest()
    assert item_key("m\u00e9", requests) == old == encoded_item_key("m\u00e9", encode_requests(requests))
    assert encoded_item_keys("m\u00e9", [encode_requests(requests)] * 2) == [old, old]
