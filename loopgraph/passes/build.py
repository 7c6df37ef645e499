"""Graph-building helpers shared by the Loop and the unrolled emitters (onnx-graphsurgeon).

- :class:`BodyBuilder` appends nodes whose every name comes from :func:`loopgraph.naming.lg_name`.
- :func:`open_range` imports the model and finds the plan's tensors and nodes in the gs graph;
  :func:`splice` puts the new nodes where the range was; :func:`finish` exports the result.
- :func:`initial_states` and :func:`noise_control` build the outer-graph nodes both forms need.
- :func:`fix_subgraph_scope` is the one place that repairs onnx-graphsurgeon's export of subgraphs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from loopgraph.metadata import all_graphs
from loopgraph.naming import lg_name


def replace_tensor(tensors: list, old: gs.Tensor, new: gs.Tensor) -> None:
    """Swap ``old`` for ``new`` in a node's inputs or outputs, by identity (gs compares tensors
    by name; gs keeps producer/consumer links in sync on item assignment)."""
    for i, t in enumerate(tensors):
        if t is old:
            tensors[i] = new


class BodyBuilder:
    """Appends nodes to a list, naming each output ``loopgraph/<scope>/<op>_<k>``."""

    def __init__(self, scope: str, dtype: np.dtype) -> None:
        self.scope = scope
        self.dtype = dtype
        self.nodes: list[gs.Node] = []
        self._count = 0

    def op(self, op: str, *inputs: gs.Tensor, attrs: dict | None = None, dtype=None, shape=None, name: str = "") -> gs.Variable:
        self._count += 1
        base = lg_name(self.scope, name or f"{op}_{self._count}")
        out = gs.Variable(base, dtype=dtype, shape=shape)
        self.nodes.append(gs.Node(op, name=base + "/node", inputs=list(inputs), outputs=[out], attrs=attrs or {}))
        return out

    def const(self, value, name: str) -> gs.Variable:
        """A scalar or small tensor produced by a Constant node inside the body (never an
        initializer: the body must hold no initializers)."""
        arr = np.asarray(value)
        return self.op("Constant", attrs={"value": gs.Constant(lg_name(self.scope, name, "value"), arr)},
                       dtype=arr.dtype, shape=list(arr.shape), name=name)

    def interpolate(self, p: gs.Tensor, q: gs.Tensor, a: gs.Tensor, one: gs.Tensor, shape, name: str) -> gs.Variable:
        """``(1 - a) * p + a * q``: exact ``q`` when ``a == 1``."""
        keep = self.op("Sub", one, a, dtype=self.dtype, shape=[], name=f"{name}_one_minus_a")
        return self.op("Add", self.op("Mul", keep, p, dtype=self.dtype, shape=shape, name=f"{name}_keep"),
                       self.op("Mul", a, q, dtype=self.dtype, shape=shape, name=f"{name}_take"),
                       dtype=self.dtype, shape=shape, name=name)


@dataclasses.dataclass
class RangeGraph:
    """The plan's tensors and nodes inside the graphsurgeon graph being edited."""

    graph: gs.Graph
    x0: gs.Variable
    out: gs.Variable
    nodes: list[gs.Node]  # the range's body nodes, in graph order
    pasts: list[gs.Variable]
    presents: list[gs.Variable]

    @property
    def node_ids(self) -> set[int]:
        """The body nodes by identity (gs nodes have no usable equality)."""
        return {id(n) for n in self.nodes}


def open_range(model: onnx.ModelProto, plan) -> RangeGraph:
    """Import ``model`` into graphsurgeon (the model itself is not changed) and look up the
    tensors and nodes named by ``plan`` (a :class:`~loopgraph.passes.plan.RangePlan`)."""
    graph = gs.import_onnx(model)
    if len(graph.nodes) != len(model.graph.node):
        raise RuntimeError("onnx-graphsurgeon changed the node count on import")
    tensors = graph.tensors()
    return RangeGraph(graph, tensors[plan.x0], tensors[plan.out], [graph.nodes[i] for i in plan.body],
                      [tensors[n] for n in plan.pasts], [tensors[n] for n in plan.presents])


def splice(rng: RangeGraph, at: int, head: list[gs.Node], middle: list[gs.Node]) -> None:
    """Graph order: ``head``, the nodes before ``at`` that stay outside, ``middle`` (what replaces
    the range), the rest."""
    moved = rng.node_ids
    nodes = rng.graph.nodes
    rng.graph.nodes = head + [n for n in nodes[:at] if id(n) not in moved] + middle + [n for n in nodes[at:] if id(n) not in moved]


def initial_states(pre: BodyBuilder, states, x0: gs.Tensor, shape: list) -> dict[str, gs.Tensor]:
    """The value each carried state starts from: x0, or a [batch, seq, 1] tensor made from x0
    (its value is unused at t = 1; it only gives the state its shape)."""
    inits: dict[str, gs.Tensor] = {"x0": x0}
    if any(s.init == "x0_sum" for s in states):
        inits["x0_sum"] = pre.op("ReduceSum", x0, pre.const(np.array([-1], np.int64), "hidden_axis"), attrs={"keepdims": 1},
                                 dtype=pre.dtype, shape=list(shape[:-1]) + [1], name="x0_sum")
    return {s.name: inits[s.init] for s in states}


def scalar_param(graph: gs.Graph, name: str, value: np.ndarray, dynamic: bool) -> gs.Tensor:
    """A scalar the graph reads: an initializer, or a graph input when it is set at run time."""
    if dynamic:
        var = gs.Variable(name, value.dtype, [])
        graph.inputs.append(var)
        return var
    return gs.Constant(name, value)


def noise_control(b: BodyBuilder, x_final: gs.Tensor, r: gs.Tensor, out: gs.Variable, seed: int, shape: list) -> None:
    """``out = r + e * |x_N - r| / |e|`` per token, ``e = sin(r W)`` (see :mod:`loopgraph.spec`)."""
    dt, hidden, token = b.dtype, shape[-1], list(shape[:-1]) + [1]
    w = gs.Constant(lg_name("noise", "W"), np.random.default_rng(seed).standard_normal((hidden, hidden)).astype(dt))
    axes = b.const(np.array([-1], np.int64), "hidden_axis")

    def norm(v: gs.Tensor, name: str) -> gs.Variable:
        sq = b.op("Mul", v, v, dtype=dt, shape=shape, name=f"{name}_sq")
        return b.op("Sqrt", b.op("ReduceSum", sq, axes, attrs={"keepdims": 1}, dtype=dt, shape=token, name=f"{name}_sum"),
                    dtype=dt, shape=token, name=name)

    shift = norm(b.op("Sub", x_final, r, dtype=dt, shape=shape, name="shift"), "shift_norm")
    e = b.op("Sin", b.op("MatMul", r, w, dtype=dt, shape=shape, name="r_w"), dtype=dt, shape=shape, name="e")
    scale = b.op("Div", shift, b.op("Max", norm(e, "e_norm"), b.const(np.array(1e-12, dt), "tiny"), dtype=dt, shape=token, name="e_norm_floor"),
                 dtype=dt, shape=token, name="scale")
    b.nodes.append(gs.Node("Add", name=lg_name("noise", "out/node"),
                           inputs=[r, b.op("Mul", e, scale, dtype=dt, shape=shape, name="noise")], outputs=[out]))


def fix_subgraph_scope(model: onnx.ModelProto) -> None:
    """The one place that repairs onnx-graphsurgeon's export of subgraphs.

    gs writes every constant a body reads into that body as a body initializer, and value_info
    for outer tensors the body reads. Weights must stay main-graph initializers read through
    the outer scope (stored once; ORT's external-data writer duplicates body initializers), so
    body initializers move to the main graph (dropped where the main graph already has them),
    and body value_info is kept only for names the body defines."""
    main_inits = {t.name for t in model.graph.initializer}
    for body in list(all_graphs(model.graph))[1:]:
        for t in list(body.initializer):
            if t.name not in main_inits:
                model.graph.initializer.append(t)
                main_inits.add(t.name)
        del body.initializer[:]
        defined = {v.name for v in body.input} | {o for n in body.node for o in n.output}
        keep = [v for v in body.value_info if v.name in defined]
        del body.value_info[:]
        body.value_info.extend(keep)


def restore_model_fields(new: onnx.ModelProto, old: onnx.ModelProto) -> None:
    """gs's export resets the model-level fields; take them back from the input model."""
    new.ir_version = old.ir_version
    del new.opset_import[:]
    new.opset_import.extend(old.opset_import)
    new.producer_name, new.producer_version = old.producer_name, old.producer_version
    new.doc_string, new.domain, new.model_version = old.doc_string, old.domain, old.model_version
    del new.metadata_props[:]
    new.metadata_props.extend(old.metadata_props)
    if not new.functions:
        new.functions.extend(old.functions)


def export(rng: RangeGraph, model: onnx.ModelProto, *, has_body: bool) -> onnx.ModelProto:
    """The edited graph as a new model with ``model``'s model-level fields."""
    new = gs.export_onnx(rng.graph, do_type_check=False)
    if has_body:
        fix_subgraph_scope(new)
    restore_model_fields(new, model)
    return new
