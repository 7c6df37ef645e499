"""What a file says about itself: metadata_props, the rewrite record, the subgraph walker, and the
export folder's JSON files and manifest. Small models built in code."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from loopgraph.errors import LoopgraphError
from loopgraph.exportdir import MANIFEST, model_title, read_json, read_manifest, reference_dir
from loopgraph.metadata import BLOCKS_KEY, SPEC_KEY, all_graphs, num_blocks, props, read_spec, set_props, subgraphs
from loopgraph.onnxio import external_locations
from loopgraph.spec import LoopSpec


def _model(**meta: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    return model


def test_props_and_set_props():
    model = _model(a="1", b="2")
    model.metadata_props.add(key="a", value="3")  # a later duplicate wins, as onnx's helpers read it
    assert props(model) == {"a": "3", "b": "2"}
    set_props(model, {"b": "x", "c": "y"})
    assert [(p.key, p.value) for p in model.metadata_props] == [("a", "3"), ("b", "x"), ("c", "y")]


def test_read_spec_from_a_model_or_a_mapping():
    spec = LoopSpec(1, 3, iters=2, reg="anchor", alpha=0.3)
    assert read_spec(_model()) is None and read_spec({}) is None
    assert read_spec(_model(**{SPEC_KEY: spec.to_json()})) == spec
    assert read_spec({SPEC_KEY: spec.to_json()}) == spec  # what ORT's custom_metadata_map gives
    with pytest.raises(LoopgraphError, match=r"the model's loopgraph\.spec metadata is not a valid rewrite record"):
        read_spec(_model(**{SPEC_KEY: "{not json"}))


def test_num_blocks():
    assert num_blocks(_model(**{BLOCKS_KEY: "30"})) == 30
    assert num_blocks(_model()) is None and num_blocks(_model(**{BLOCKS_KEY: "many"})) is None


def _nested() -> onnx.ModelProto:
    """A Loop whose body holds an If (two branches), each branch with a Constant tensor."""
    def branch(name: str, value: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"{name}_v"], value=numpy_helper.from_array(np.array([value], np.float32)))
        return helper.make_graph([const], name, [], [helper.make_tensor_value_info(f"{name}_v", TensorProto.FLOAT, [1])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("If", ["cond_in"], ["x_next"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_prev", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("x_next", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x"], ["y"], body=body)], "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [numpy_helper.from_array(np.array(2, np.int64), "M")])
    return helper.make_model(graph)


def test_the_subgraph_walker_visits_every_graph_depth_first():
    model = _nested()
    assert [g.name for g in all_graphs(model.graph)] == ["main", "body", "else", "then"]  # attributes in name order
    loop = model.graph.node[0]
    assert [g.name for g in subgraphs(loop)] == ["body"]
    assert [g.name for g in subgraphs(model.graph.node[0].attribute[0].g.node[1])] == ["else", "then"]
    assert list(subgraphs(model.graph.node[0].attribute[0].g.node[0])) == []  # Identity holds no graph


def test_external_locations_are_found_in_subgraphs_too():
    model = _nested()
    else_const = model.graph.node[0].attribute[0].g.node[1].attribute[1].g.node[0].attribute[0].t
    else_const.data_location = TensorProto.EXTERNAL
    else_const.external_data.add(key="location", value="deep.bin")
    assert external_locations(model) == ["deep.bin"]


def test_export_folder_json_and_manifest(tmp_path):
    assert read_json(tmp_path / "absent.json") == {} and read_manifest(tmp_path) is None and reference_dir(tmp_path) is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") == {}
    (tmp_path / "hf").mkdir()
    (tmp_path / MANIFEST).write_text(json.dumps({"source": "smollm2-135m", "reference": "hf"}))
    assert read_manifest(tmp_path) == {"source": "smollm2-135m", "reference": "hf"}
    assert reference_dir(tmp_path) is None  # the checkpoint folder has no config.json
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert reference_dir(tmp_path) == tmp_path / "hf"
    assert model_title(tmp_path / "model.onnx") == "smollm2-135m"
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(LoopgraphError, match=rf"{MANIFEST} is not readable JSON .*; re-export the model"):
        read_manifest(tmp_path)
    assert model_title(tmp_path / "model.onnx") == tmp_path.name  # titles never fail: the folder name instead
