"""Block discovery on every supported export style, and its refusals."""

import onnx
import pytest
from onnx import TensorProto, helper

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import load_model
from loopgraph.passes.blocks import find_blocks, has_kv_cache
from tests.fixtures import ARCHS


def _check_chain(bm, n):
    assert len(bm) == n
    for prev, cur in zip(bm.blocks, bm.blocks[1:]):
        assert cur.input == prev.output  # the residual stream is one chain
    assert len({b.num_nodes for b in bm.blocks}) == 1  # every block of a model has the same dataflow size
    assert bm.blocks[0].num_nodes > 20


@pytest.mark.parametrize("arch", ARCHS)
def test_optimum_exports(tiny, arch):
    bm = find_blocks(load_model(tiny(arch) / "model.onnx"))
    _check_chain(bm, 4)
    assert bm.strategy == "module-path names"
    if arch == "gpt2":
        assert bm.container == "transformer.h" and bm.blocks[1].output == "/transformer/h.1/Add_1_output_0"
    else:
        assert bm.container == "model.layers" and bm.blocks[2].output == "/model/layers.2/Add_1_output_0"


def _wrapper_exports(ckpt, out, dynamo):
    import optimum.exporters.onnx.model_configs  # noqa: F401
    import torch
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False)["logits"]

    ids = torch.randint(3, 300, (1, 8))
    if dynamo:
        torch.onnx.export(Wrapper(model), (ids,), str(out), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},), opset_version=18, dynamo=True)
        return
    config = TasksManager.get_exporter_config_constructor("onnx", model, task="text-generation", library_name="transformers")(model.config)
    with config.patch_model_for_export(model):  # Optimum's patcher makes the masks traceable
        torch.onnx.export(Wrapper(model), (ids,), str(out), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}}, opset_version=18, dynamo=False)


@pytest.fixture(scope="module")
def wrapper_exports(tiny, fixture_root):
    from tests.fixtures import ensure
    tiny("llama")
    ckpt = fixture_root / "llama-hf"
    ts = ensure(fixture_root, "llama-torchscript-wrapper", lambda d: _wrapper_exports(ckpt, d / "model.onnx", dynamo=False))
    dyn = ensure(fixture_root, "llama-dynamo", lambda d: _wrapper_exports(ckpt, d / "model.onnx", dynamo=True))
    return ts / "model.onnx", dyn / "model.onnx"


def test_torchscript_wrapper_names(wrapper_exports):
    bm = find_blocks(load_model(wrapper_exports[0]))
    _check_chain(bm, 4)
    assert bm.container == "m.model.layers"
    assert bm.blocks[0].output == "/m/model/layers.0/Add_1_output_0"


def test_dynamo_name_scopes(wrapper_exports):
    model = load_model(wrapper_exports[1])
    assert not any(n.name.startswith("/") for n in model.graph.node)  # generic names: metadata is the only way
    bm = find_blocks(model)
    _check_chain(bm, 4)
    assert bm.strategy == "dynamo name scopes" and bm.container == "m.model.layers"


def test_no_blocks_error_lists_every_strategy():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/net/Relu")], "g", [x], [y]))
    with pytest.raises(LoopgraphError) as e:
        find_blocks(model)
    msg = str(e.value)
    assert "module-path names:" in msg and "dynamo name scopes:" in msg and "\n" not in msg


def test_broken_chain_is_refused(tiny):
    """A block whose output no longer feeds the next block is reported by name."""
    model = load_model(tiny("llama") / "model.onnx")
    for node in model.graph.node:  # cut block 1 -> block 2 by renaming block 1's residual output
        if node.name == "/model/layers.1/Add_1":
            node.output[0] = "dangling"
    with pytest.raises(LoopgraphError, match=r"block model\.layers\.1: no residual Add"):
        find_blocks(model)


def test_kv_detection(tiny):
    assert not has_kv_cache(load_model(tiny("llama") / "model.onnx"))
    assert has_kv_cache(load_model(tiny("llama", with_past=True) / "model.onnx"))


@pytest.mark.real
def test_real_smollm2_has_30_blocks(real_export):
    model = onnx.load(str(real_export / "model.onnx"), load_external_data=False)
    bm = find_blocks(model)
    _check_chain(bm, 30)
    assert bm.blocks[0].input == "/model/embed_tokens/Gather_output_0"
    assert bm.blocks[-1].output == "/model/layers.29/Add_1_output_0"
