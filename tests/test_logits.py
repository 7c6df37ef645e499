"""Logits gathered before the LM head equal the full logits at those positions, bit for bit."""

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import load_model
from loopgraph.passes.logits import POSITIONS_NAME, find_lm_head, gather_logits
from loopgraph.rewrite import rewrite
from loopgraph.runtime.logits import LogitsSession
from loopgraph.spec import LoopSpec
from tests.conftest import batch_feeds


def positions(ids: np.ndarray, mask: np.ndarray, count: int = 9, seed: int = 1) -> np.ndarray:
    """Random flat positions of real (unpadded) tokens, unsorted, one repeated."""
    real = np.flatnonzero(mask.reshape(-1))
    at = np.random.default_rng(seed).choice(real, size=count, replace=False)
    return np.concatenate([at, at[:1]]).astype(np.int64)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi3"])
def test_gathered_logits_are_the_full_logits_at_those_positions(tiny, arch):
    folder = tiny(arch)
    full, gathered = LogitsSession(folder / "model.onnx", gather=False), LogitsSession(folder / "model.onnx")
    assert gathered.gathered and not full.gathered
    ids, mask = batch_feeds()
    at = positions(ids, mask)
    want = full.logits_at(ids, mask, at)
    got = gathered.logits_at(ids, mask, at)
    assert got.shape == (len(at), want.shape[-1])
    np.testing.assert_array_equal(got, want)


def test_gemma2_softcapping_moves_past_the_gather(tiny):
    _, path = find_lm_head(load_model(tiny("gemma2") / "model.onnx"))
    assert "Tanh" in [n.op_type for n in path]  # the soft-capping ops really lie between head and logits


def test_a_looped_model_and_external_weights(tiny, tmp_path):
    folder = tiny("llama")
    model = onnx.load(folder / "model.onnx")
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    looped = rewrite(tmp_path / "model.onnx", LoopSpec(start=1, end=3, iters=3, reg="uniform"), tmp_path / "looped.onnx").path
    ids, mask = batch_feeds()
    at = positions(ids, mask, seed=2)
    for path in (tmp_path / "model.onnx", looped):
        want = LogitsSession(path, gather=False).logits_at(ids, mask, at)
        lm = LogitsSession(path)
        assert lm.gathered
        np.testing.assert_array_equal(lm.logits_at(ids, mask, at), want)
    assert not any(i.name == POSITIONS_NAME for i in onnx.load(looped, load_external_data=False).graph.input)  # file untouched


def test_the_pass_keeps_its_input_and_refuses_a_second_run(tiny):
    model = load_model(tiny("llama") / "model.onnx")
    before = model.SerializeToString()
    new = gather_logits(model).model
    assert model.SerializeToString() == before
    assert [d.dim_param or d.dim_value for d in next(o for o in new.graph.output if o.name == "logits").type.tensor_type.shape.dim] \
        == ["num_positions", 384]
    with pytest.raises(LoopgraphError, match="already has the 'loopgraph/logits_at' input"):
        gather_logits(new)


def _head(after: list[onnx.NodeProto], outputs=("logits",)) -> onnx.ModelProto:
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 6], np.arange(24, dtype=np.float32))
    nodes = [helper.make_node("MatMul", ["h", "W"], ["z" if after else "logits"]), *after]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "t", 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["b", "t", 6]) for o in outputs], [w])
    return helper.make_model(graph)


def test_refusals_name_the_problem():
    with pytest.raises(LoopgraphError, match="no 'logits' output"):
        gather_logits(_head([helper.make_node("Identity", ["z"], ["y"])], outputs=("y",)))
    softmax = _head([helper.make_node("Softmax", ["z"], ["logits"], axis=1)])  # mixes positions: cannot move past a gather
    with pytest.raises(LoopgraphError, match="Softmax node .* lies between the LM head and 'logits'"):
        gather_logits(softmax)
    scaled = _head([helper.make_node("Mul", ["z", "h2"], ["logits"])])  # a second non-constant input
    with pytest.raises(LoopgraphError, match="Mul node"):
        gather_logits(scaled)


def test_a_refused_graph_is_scored_from_its_full_logits(tmp_path, caplog):
    model = _head([helper.make_node("Softmax", ["z"], ["logits"], axis=1)])
    onnx.save(model, tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING):
        lm = LogitsSession(tmp_path / "m.onnx")
    assert not lm.gathered and "scoring with full logits: Softmax node" in caplog.text
    assert lm.session.input_names == ["h"]  # opened as it is


def test_an_int4_head_is_gathered_bit_exactly(tiny):
    """quantize --to int4 (and the genai builder) make the head a MatMulNBits: the gather moves
    before it and the gathered rows equal the full logits' (CPU, 1 thread)."""
    from loopgraph.deploy.quantize import quantize_model
    model, _ = quantize_model(load_model(tiny("llama") / "model.onnx", load_weights=True), "int4")
    full, gathered = LogitsSession(model, gather=False, threads=1), LogitsSession(model, threads=1)
    assert gathered.gathered and find_lm_head(model)[0].op_type == "MatMulNBits"
    ids, mask = batch_feeds()
    at = positions(ids, mask, seed=3)
    np.testing.assert_array_equal(gathered.logits_at(ids, mask, at), full.logits_at(ids, mask, at))
