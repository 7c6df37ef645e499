"""The passes on small graphs built in code (tests/toy.py): the Loop, unroll and KV passes and the
pass contract, checked for structure and for numbers against an independent numpy recompute.

Numbers: ONNX Runtime on CPUExecutionProvider with 1 intra-op thread and graph optimizations
disabled (``_run``); numpy computes the toy blocks (in float64) and the regularizers from DESIGN §1's
formulas.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.passes.base import Pipeline, Reports
from loopgraph.passes.blocks import BlocksReport, FindBlocks, is_looped
from loopgraph.passes.loop import LoopReport, WrapInLoop
from loopgraph.passes.plan import KvSlot, build_plan
from loopgraph.passes.skipnorm import SplitSkipNorms
from loopgraph.passes.unroll import Unroll, UnrollReport
from loopgraph.regularizers import BY_NAME, COS_EPS
from loopgraph.rewrite import pipeline, rewrite
from loopgraph.runtime.session import open_session
from loopgraph.spec import LoopSpec
from tests import toy

ATOL = 1e-6  # ORT (CPU EP, 1 thread, no graph optimizations) vs the numpy recompute, float32 toy
REGS = list(BY_NAME)
RNG = np.random.default_rng(1)
X = (0.5 * RNG.standard_normal((2, 5, toy.HIDDEN))).astype(np.float32)  # [batch, seq, hidden]
PAST_LEN = 3


def _run(model: onnx.ModelProto, feeds: dict, opt: str = "disable") -> dict[str, np.ndarray]:
    s = open_session(model, device="cpu", threads=1, opt_level=opt)
    assert s.ort_session.get_providers()[0] == "CPUExecutionProvider"
    return dict(zip([o.name for o in s.ort_session.get_outputs()], s.ort_session.run(None, feeds)))


def _reg_np(spec: LoopSpec, t: int, ys: list[np.ndarray], x_prev: np.ndarray) -> np.ndarray:
    """x_t from DESIGN §1's table, written from the formulas (not from the graph's updates)."""
    y, r = ys[-1], ys[0]
    if t == 1 or spec.reg == "naive":
        return y
    if spec.reg == "uniform":
        return np.mean(ys, axis=0)
    if spec.reg in ("ema", "anchor"):
        return spec.alpha * y + (1 - spec.alpha) * (x_prev if spec.reg == "ema" else r)
    if spec.reg == "damped":
        return (1 - 1 / spec.k) * x_prev + (1 / spec.k) * y
    norm = lambda v: np.sqrt((v * v).sum(-1, keepdims=True))  # noqa: E731
    ws = [np.ones_like(r[..., :1])] + [np.maximum(0, (y_i * r).sum(-1, keepdims=True) / np.maximum(norm(y_i) * norm(r), COS_EPS))
                                       for y_i in ys[1:]]
    return sum(w * y_i for w, y_i in zip(ws, ys)) / sum(ws)


def _looped_np(spec: LoopSpec, x: np.ndarray, pasts: dict | None = None) -> dict[str, np.ndarray]:
    """The looped toy in numpy: logits, and the presents (stacked per iteration for ``exact`` and
    ``stacked``; :func:`_standard` renames them into the standard layout)."""
    w, out, h = {k: v.astype(np.float64) for k, v in toy.weights().items()}, {}, x.astype(np.float64)
    def cache(L: int, t: int):
        if pasts is None:
            return None
        return (pasts[L][0][t], pasts[L][1][t]) if spec.kv in ("exact", "stacked") and spec.start <= L < spec.end else pasts[L]

    for L in range(spec.start):
        h, out[L] = toy.block_np(L, h, w, cache(L, 0))
    ys, per_iter = [], []
    for t in range(1, spec.iters + 1):
        y, pres = h, {}
        for L in range(spec.start, spec.end):
            y, pres[L] = toy.block_np(L, y, w, cache(L, t - 1))
        ys.append(y)
        per_iter.append(pres)
        h = _reg_np(spec, t, ys, h)
    for L in range(spec.start, spec.end):
        pick = {"first": 0, "last": -1}.get(spec.kv)
        out[L] = tuple(np.stack([p[L][i] for p in per_iter]) if pick is None else per_iter[pick][L][i] for i in (0, 1)) if pasts else None
    for L in range(spec.end, toy.BLOCKS):
        h, out[L] = toy.block_np(L, h, w, cache(L, 0))
    named = {"logits": h @ w["W_head"]}
    for L, pres in out.items():
        if pres is not None:
            named[f"present.{L}.key"], named[f"present.{L}.value"] = pres
    return named


def _past_feeds(spec: LoopSpec) -> tuple[dict, dict]:
    """Random pasts: [N, batch, past, hidden] for the looped blocks with ``exact``/``stacked``, else
    [batch, past, hidden] (the feeds of ``exact``: :func:`_standard`)."""
    pasts, feeds = {}, {}
    for L in range(toy.BLOCKS):
        lead = (spec.iters,) if spec.kv in ("exact", "stacked") and spec.start <= L < spec.end else ()
        pasts[L] = tuple((0.5 * RNG.standard_normal((*lead, 2, PAST_LEN, toy.HIDDEN))).astype(np.float32) for _ in (0, 1))
        feeds[f"past_key_values.{L}.key"], feeds[f"past_key_values.{L}.value"] = pasts[L]
    return pasts, feeds


def _standard(spec: LoopSpec, named: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Stacked caches ``{prefix}{L}.*`` ([N, ...] for looped L) renamed into the standard layout:
    one pair per virtual layer, ``{prefix}{v}.*`` with v = L + t (E - S) in the range, L + (N - 1)(E - S) after it."""
    out, width = {}, spec.end - spec.start
    for name, value in named.items():
        if not name.startswith(prefix):
            out[name] = value
            continue
        L, kind = name[len(prefix):].split(".")
        L = int(L)
        if spec.start <= L < spec.end:
            out.update({f"{prefix}{L + t * width}.{kind}": value[t] for t in range(spec.iters)})
        else:
            out[f"{prefix}{L + (spec.iters - 1) * width if L >= spec.end else L}.{kind}"] = value
    return out


def _all_names(graph: onnx.GraphProto) -> list[str]:
    return [v.name for v in graph.input] + [o for n in graph.node for o in n.output if o]


@pytest.mark.parametrize("kv", [False, True])
def test_loop_structure(kv):
    original = toy.model(kv=kv)
    res = rewrite(original, LoopSpec(1, 3, iters=3, reg="auto-align"))
    model = res.model
    onnx.checker.check_model(model, full_check=True)
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1, f"{len(loops)} Loop nodes"
    body = loops[0].attribute[0].g
    assert not body.initializer, "the body must read the weights from the outer scope"
    assert {t.name for t in model.graph.initializer} == {t.name for t in original.graph.initializer} | {"loopgraph/iters"}
    declared = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.output}
    assert all(o in declared for o in loops[0].output), "every Loop output needs a declared shape"
    names = _all_names(model.graph) + _all_names(body)
    assert len(names) == len(set(names)), "names repeat or the body shadows an outer name"
    assert loops[0].output[0] == "/model/layers.2/Add_1_output_0" == res.report.range_output
    report = res.report
    assert isinstance(report, LoopReport) and report.range == "1:3" and report.blocks == 4
    assert report.kv == ("exact" if kv else None)
    assert report.body_nodes == (2 * 10 if kv else 2 * 3)  # the two looped blocks' nodes, nothing else
    assert res.reports.names == ["find-blocks", "split-skip-norms", "wrap-in-loop"] and res.reports.get(BlocksReport).count == 4


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("rng", [(0, 4), (1, 3), (3, 4)])
def test_n1_is_bit_exact(reg, rng):
    original = toy.model()
    want = _run(original, {"x": X}, "all")["logits"]
    for unroll in (False, True):
        got = _run(rewrite(original, LoopSpec(*rng, iters=1, reg=reg, unroll=unroll)).model, {"x": X}, "all")["logits"]
        np.testing.assert_array_equal(got, want, err_msg=f"{reg} {rng} unroll={unroll}: N = 1 must be bit-exact (CPU EP, 1 thread)")


@pytest.mark.parametrize("reg", REGS)
def test_n3_matches_numpy_and_unroll_equals_loop(reg):
    original = toy.model()
    for rng in ((0, 4), (1, 3)):
        spec = rewrite(original, LoopSpec(*rng, iters=3, reg=reg)).spec
        loop = _run(rewrite(original, spec).model, {"x": X})["logits"]
        want = _looped_np(spec, X)["logits"]
        np.testing.assert_allclose(loop, want, rtol=0, atol=ATOL, err_msg=f"{reg} {rng} N=3 vs numpy (CPU EP, 1 thread)")
        assert np.abs(loop - _run(original, {"x": X})["logits"]).max() > 1e-3, "looping must change the logits"
        flat = _run(rewrite(original, dataclasses.replace(spec, unroll=True)).model, {"x": X})["logits"]
        np.testing.assert_array_equal(flat, loop, err_msg=f"{reg} {rng}: unrolled vs Loop (CPU EP, 1 thread, no fusions)")


@pytest.mark.parametrize("kv", ["exact", "stacked", "first", "last"])
@pytest.mark.parametrize("unroll", [False, True])
def test_kv_matches_numpy(kv, unroll):
    original = toy.model(kv=True)
    spec = LoopSpec(1, 3, iters=3, reg="ema", kv=kv, unroll=unroll)
    pasts, feeds = _past_feeds(spec)
    want = _looped_np(spec, X, pasts)
    if kv == "exact":  # the standard layout: V = 4 + 2 * 2 = 8 ordinary pairs
        feeds, want = _standard(spec, feeds, "past_key_values."), _standard(spec, want, "present.")
    got = _run(rewrite(original, spec).model, {"x": X, **feeds})
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=f"{kv} unroll={unroll} {name} (CPU EP, 1 thread)")
    shape = got["present.1.key"].shape
    assert shape == ((3, 2, PAST_LEN + 5, toy.HIDDEN) if kv == "stacked" else (2, PAST_LEN + 5, toy.HIDDEN)), shape


@pytest.mark.parametrize("kv", ["exact", "stacked", "first", "last"])
def test_kv_n1_is_bit_exact(kv):
    original = toy.model(kv=True)
    spec = LoopSpec(0, 4, iters=1, kv=kv)
    _, feeds = _past_feeds(dataclasses.replace(spec, kv="first"))  # [batch, past, hidden]: the original's layout
    want = _run(original, {"x": X, **feeds}, "all")
    if kv == "stacked":
        feeds = {k: v[None] for k, v in feeds.items()}  # N = 1 leading axis
    got = _run(rewrite(original, spec).model, {"x": X, **feeds}, "all")
    for name in want:
        np.testing.assert_array_equal(got[name][0] if kv == "stacked" and name.startswith("present") else got[name], want[name],
                                      err_msg=f"{kv} {name}: N = 1 must be bit-exact (CPU EP, 1 thread)")


def test_plan_kv_slots():
    model = toy.model(kv=True)
    blocks = FindBlocks()(model).report
    plan = build_plan(model, LoopSpec(1, 3), blocks)
    assert plan.kv_slots == tuple(KvSlot(str(L), (f"past_key_values.{L}.key", f"past_key_values.{L}.value"),
                                         (f"present.{L}.key", f"present.{L}.value")) for L in (1, 2))
    assert plan.x0 == "/model/layers.0/Add_1_output_0" and plan.out == "/model/layers.2/Add_1_output_0"
    assert plan.shape == ("batch", "seq", toy.HIDDEN) and plan.dtype == np.float32
    assert build_plan(toy.model(), LoopSpec(1, 3), FindBlocks()(toy.model()).report).kv_slots == ()


def _refused(model: onnx.ModelProto, spec: LoopSpec, match: str) -> None:
    before = model.SerializeToString()
    with pytest.raises(LoopgraphError, match=match):
        rewrite(model, spec)
    assert model.SerializeToString() == before, "a refused rewrite must leave the model untouched"


def test_refusals_leave_the_model_untouched():
    old = toy.model(opset=12)
    _refused(old, LoopSpec(1, 3), r"^pass wrap-in-loop \(after find-blocks, split-skip-norms\): opset 12 is too old for the rewrite; re-export with --opset 13")
    _refused(toy.model(), LoopSpec(1, 3, unroll=True, dynamic=True), r"^pass unroll \(after find-blocks, split-skip-norms\): .*drop --dynamic or --unroll")
    _refused(toy.model(), LoopSpec(2, 9), r"--range 2:9 but the model has blocks 0\.\.3 \(found by module-path names\); try --range 0:4")
    looped = rewrite(toy.model(), LoopSpec(1, 3)).model
    assert is_looped(looped) and not is_looped(toy.model())
    _refused(looped, LoopSpec(0, 1), r"^pass find-blocks: the model is already looped by loopgraph; rewrite the original export")


def test_a_range_that_cannot_be_closed_is_refused():
    """An intermediate tensor of the range read after it: the body could not be closed."""
    model = toy.model()
    leak = "/model/layers.1/Tanh_output_0"
    model.graph.node.append(onnx.helper.make_node("Identity", [leak], ["peek"], name="/probe/Identity"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("peek", onnx.TensorProto.FLOAT, None))
    _refused(model, LoopSpec(1, 3), rf"tensor {leak} computed inside range 1:3 is also read by /probe/Identity outside the range, "
                                    "so the range cannot be closed into a Loop body")
    # the same tensor outside the looped range is fine
    assert rewrite(model, LoopSpec(2, 4)).report.range == "2:4"


def test_pipeline_is_data():
    with pytest.raises(ValueError, match="pass wrap-in-loop needs BlocksReport, which no pass before it gives"):
        Pipeline([WrapInLoop(LoopSpec(1, 3))])
    p = pipeline(LoopSpec(1, 3, unroll=True))
    assert [type(x) for x in p.passes] == [FindBlocks, SplitSkipNorms, Unroll]
    model = toy.model()
    new, reports = p(model)
    assert isinstance(reports.get(UnrollReport), UnrollReport) and reports.get(UnrollReport).copied_nodes == 2 * 3 * 3
    # a pass run on its own takes the earlier reports explicitly
    earlier = Reports()
    earlier.add("find-blocks", FindBlocks()(model).report)
    alone = WrapInLoop(LoopSpec(1, 3))(model, earlier)
    assert alone.changed and alone.model.SerializeToString() == rewrite(model, LoopSpec(1, 3)).model.SerializeToString()


def test_is_looped_reads_non_utf8_names():
    """A damaged file whose node name is not UTF-8 is read, not a crash."""
    model = toy.model()
    model.graph.node[0].name = "/model/layers.0/NAME"
    raw = model.SerializeToString().replace(b"/model/layers.0/NAME", b"/model/layers.0/\xff\xfeME")
    damaged = onnx.load_model_from_string(raw)
    assert not is_looped(damaged)
    damaged.graph.node[1].name = "loopgraph/loop"
    assert is_looped(damaged)


@pytest.mark.parametrize("kv", [False, True])
def test_find_blocks_pass_on_the_toy(kv):
    model = toy.model(kv=kv)
    before = model.SerializeToString()
    result = FindBlocks()(model)
    assert not result.changed and result.model.SerializeToString() == before
    bm = result.report.blocks
    assert (bm.strategy, bm.container, len(bm)) == ("module-path names", "model.layers", toy.BLOCKS)
    assert [b.input for b in bm.blocks] == ["x"] + [f"/model/layers.{L}/Add_1_output_0" for L in range(toy.BLOCKS - 1)]
    assert {b.num_nodes for b in bm.blocks} == {10 if kv else 3}  # every node of a block lies on its dataflow path
