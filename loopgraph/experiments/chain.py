"""The block chain: one ORT session per decoder block, so the block order is chosen at run time.

``loopgraph tune`` scores hundreds of (range, N, regularizer) cells on the same items. A Loop
rewrite per cell (what ``sweep`` does) pays a rewrite and a session per range and runs every
block of every cell from the embeddings. The chain instead cuts the original export once into

- an **embedding** session: graph inputs -> the residual stream entering block 0;
- one session **per block** ``l``: (hidden state entering ``l``, the graph inputs its mask and
  rotary tables are built from) -> the hidden state leaving ``l``;
- a **head** session: the last block's output at the scored positions only -> logits
  (:func:`loopgraph.experiments.graphs.logit_lens`: the final norm and the unembedding).

A cell ``[s, e) x N`` then reuses what every cell shares (per batch of token ids):

- the boundary states ``h_0 .. h_L`` of the baseline, computed once;
- ``y_1 = B(h_s) = h_e``: the first application of the range *is* the baseline's state at ``e``
  (the same sessions compute both), so it is never recomputed;
- ``y_2 = B(h_e)``, shared by every regularizer and every N >= 2 of the range, and ``x_t`` of one
  regularizer, shared by its N >= t cells; ``y_3``, shared by a regularizer's plain and halting cells.

So a cell costs ``(N - 1) * (E - S)`` range blocks plus ``L - E`` tail blocks, and N = 2 and 3 of a
range together cost ``2 * (L - S)`` blocks instead of ``2 * L + 3 * (E - S)``. The regularizers
are evaluated in numpy with the formulas of :mod:`loopgraph.spec`, written as the graph writes
them (``(1 - a) * p + a * q``, ``a = 1 / t`` in the model's float type), and the noise control
as :func:`loopgraph.passes.loop.noise_control` does it (same ``W`` from the same seed). Halting
(a :class:`Reg` with ``halt``) is the live rule of docs/halting.md: the range runs on every token,
frozen ones keep their state; the Loop's early stop changes nothing a scored token sees.

Numerics: each session is optimized by ORT on its own, so the chain agrees with the Loop graph
of the same cell to float rounding (tests: max |Δ logits| <= 1e-4 on the tiny fixtures, CPU,
1 thread), not bit for bit; what ``tune`` finally claims is re-measured on the real looped graph.

Packed items (``split_model(..., allow=True)``, :mod:`loopgraph.eval.packing`): every block model
gets one more input, ``loopgraph/chain/allow`` (bool ``[batch, 1, seq, seq]``), AND-ed into the
condition of each attention's ``Where(cond, 0, -inf)`` mask before its Softmax. All ``True`` leaves
the export's own causal and padding mask, so the outputs are bit for bit those of the plain
sessions; a block-diagonal ``allow`` lets the options of one item share their common context in
one row (each option sees the context and itself, at the positions it would have alone).

Handled: exports without KV cache whose consecutive blocks share their boundary tensor (block
``l``'s output is block ``l + 1``'s input: Llama, Qwen2, Mistral, Phi-3, GPT-2 exports). Shape
reads of any residual-stream boundary (the causal mask built from ``Shape(inputs_embeds)``) are
pointed at the block's own input, which has the same shape, so no block session carries the
embedding table. Refused: a block that reads the *value* of a tensor of another block or of the
embeddings (besides its input); a with-past export; a looped model; with ``allow``, an
attention whose Softmax is not fed by ``Add(scores, Where(cond, 0, -inf))``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from loopgraph.errors import LoopgraphError
from loopgraph.experiments.graphs import _inferred_infos, _tensor_info, lens_feeds, logit_lens
from loopgraph.experiments.grid import Cell, Reg
from loopgraph.passes.dataflow import SHAPE_ONLY_OPS, GraphIndex
from loopgraph.passes.regularize import COS_EPS

log = logging.getLogger(__name__)
_GRAPH_INPUTS = ("input_ids", "attention_mask", "position_ids")
ALLOW = "loopgraph/chain/allow"  # the extra block input of packed items: which keys each query may see


# --- cutting the export into sessions ---------------------------------------------------------

def _closure(index: GraphIndex, target: str, stop: str | None, boundaries: set[str]) -> tuple[list[int], dict[int, str], set[str]]:
    """Nodes needed to compute ``target`` when ``stop`` is given as an input: (node indices in
    graph order, Shape/Size nodes whose input is redirected to ``stop``, graph inputs read)."""
    nodes: set[int] = set()
    redirect: dict[int, str] = {}
    inputs: set[str] = set()
    stack, seen = [target], set()
    while stack:
        t = stack.pop()
        if t in seen or not t or t == stop:
            continue
        seen.add(t)
        if t in index.initializers:
            continue
        if t in index.graph_inputs:
            inputs.add(t)
            continue
        i = index.producer.get(t)
        if i is None:
            raise LoopgraphError(f"tensor {t} has no producer; the export is malformed")
        node = index.nodes[i]
        if stop is not None and node.op_type in SHAPE_ONLY_OPS and node.input[0] in boundaries:
            redirect[i] = stop  # every residual-stream boundary is [batch, seq, hidden]
            nodes.add(i)
            continue
        nodes.add(i)
        stack.extend(index.reads[i])
    return sorted(nodes), redirect, inputs


def _submodel(model: onnx.ModelProto, index: GraphIndex, infos: dict, node_ids: Sequence[int], redirect: dict[int, str],
              inputs: Sequence[str], output: str, name: str) -> onnx.ModelProto:
    nodes = []
    for i in node_ids:
        node = index.nodes[i]
        if i in redirect:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[0] = redirect[i]
            node = copy
        nodes.append(node)
    read = {t for i in node_ids for t in index.reads[i]}
    inits = [t for t in model.graph.initializer if t.name in read]
    graph = helper.make_graph(nodes, name, [_tensor_info(infos, n) for n in inputs], [_tensor_info(infos, output)], inits)
    sub = helper.make_model(graph, ir_version=model.ir_version)
    del sub.opset_import[:]
    sub.opset_import.extend(model.opset_import)
    return sub


@dataclasses.dataclass
class ChainModels:
    """The pieces of one export (ModelProtos with their weights)."""
    embed: onnx.ModelProto
    blocks: list[onnx.ModelProto]
    head: onnx.ModelProto
    block_inputs: list[list[str]]  # per block: the graph inputs it reads besides the hidden state
    embed_inputs: list[str]
    hidden: str  # name of every block model's hidden-state input
    dtype: np.dtype
    allow: bool = False  # the block models take ALLOW (packed items)


def split_model(model: onnx.ModelProto, allow: bool = False) -> ChainModels:
    """Cut ``model`` (an original export with its weights) into embedding, per-block and head
    models; with ``allow`` every block model also takes :data:`ALLOW` (see the module docstring)."""
    from loopgraph.passes.blocks import find_blocks, has_kv_cache
    from loopgraph.passes.loop import is_looped
    if is_looped(model):
        raise LoopgraphError("the model is already looped; tune the original export (model.onnx)")
    if has_kv_cache(model):
        raise LoopgraphError("the model takes KV-cache inputs (a --with-past export); tune an export made without --with-past")
    blocks = find_blocks(model).blocks
    for a, b in zip(blocks, blocks[1:]):
        if a.output != b.input:
            raise LoopgraphError(f"block {a.index} leaves the residual stream in {a.output} but block {b.index} reads {b.input}; "
                                 "the block chain needs consecutive blocks to share their boundary tensor")
    index = GraphIndex(model.graph)
    infos = _inferred_infos(model)
    boundaries = {b.input for b in blocks} | {blocks[-1].output}
    bodies = [index.between(b.input, [b.output]) for b in blocks]
    hidden = "loopgraph/chain/hidden"
    embed_ids, _, embed_inputs = _closure(index, blocks[0].input, None, boundaries)
    embed = _submodel(model, index, infos, embed_ids, {}, sorted(embed_inputs), blocks[0].input, "loopgraph_chain_embed")
    block_models, block_inputs = [], []
    for b in blocks:
        ids, redirect, inputs = _closure(index, b.output, b.input, boundaries)
        foreign = [i for i in ids if any(i in body for j, body in enumerate(bodies) if j != b.index)]
        if foreign:
            node = index.nodes[foreign[0]]
            raise LoopgraphError(f"block {b.index} reads node {node.name} ({node.op_type}) of another block; "
                                 "this export cannot be cut into per-block sessions")
        if any(index.nodes[i].output[0] == blocks[0].input for i in ids) and b.index > 0:
            raise LoopgraphError(f"block {b.index} reads the value of the embeddings ({blocks[0].input}) besides its input; "
                                 "this export cannot be cut into per-block sessions")
        sub = _submodel(model, index, infos, ids, redirect, [b.input, *sorted(inputs)], b.output, f"loopgraph_chain_block{b.index}")
        _rename(sub, b.input, hidden)
        if allow:
            _add_allow(sub, b.index)
        block_models.append(sub)
        block_inputs.append(sorted(inputs) + ([ALLOW] if allow else []))
    head = logit_lens(model, blocks[-1].output)
    dtype = helper.tensor_dtype_to_np_dtype(infos[blocks[0].input].type.tensor_type.elem_type)
    return ChainModels(embed, block_models, head, block_inputs, sorted(embed_inputs), hidden, np.dtype(dtype), allow)


def _constant(nodes: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = nodes.get(name)
    if node is None or node.op_type != "Constant":
        return None
    value = next((a for a in node.attribute if a.name == "value"), None)
    return None if value is None else numpy_helper.to_array(value.t)


def mask_wheres(graph: onnx.GraphProto) -> list[onnx.NodeProto] | str:
    """The ``Where(cond, 0, -inf)`` nodes whose output each attention adds to its scores before
    the Softmax (``cond`` True = the key is seen), or why the graph has none such."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    out: list[onnx.NodeProto] = []
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        return "it has no Softmax"
    for sm in softmaxes:
        add = producer.get(sm.input[0])
        wheres = [producer.get(t) for t in add.input] if add is not None and add.op_type == "Add" else []
        where = next((w for w in wheres if w is not None and w.op_type == "Where"
                      and np.array_equal(_constant(producer, inits, w.input[1]), [0.0])
                      and np.array_equal(_constant(producer, inits, w.input[2]), [-np.inf])), None)
        if where is None:
            return f"the input of {sm.name} is not Add(scores, Where(cond, 0, -inf))"
        if all(where is not w for w in out):
            out.append(where)
    return out


def _add_allow(model: onnx.ModelProto, block: int) -> None:
    """AND :data:`ALLOW` into the condition of every attention mask of a block model."""
    wheres = mask_wheres(model.graph)
    if isinstance(wheres, str):
        raise LoopgraphError(f"block {block}: {wheres}; items cannot be packed for this export (tune --no-pack)")
    for where in wheres:
        allowed = f"{ALLOW}/{where.name}"
        node = helper.make_node("And", [where.input[0], ALLOW], [allowed], name=f"{ALLOW}/{where.name}/And")
        where.input[0] = allowed
        at = next(i for i, n in enumerate(model.graph.node) if n is where)
        model.graph.node.insert(at, node)
    model.graph.input.append(helper.make_tensor_value_info(ALLOW, TensorProto.BOOL, ["batch", 1, "seq", "seq"]))


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a graph input (one name for every block's hidden input; the chain feeds it by name)."""
    for v in model.graph.input:
        if v.name == old:
            v.name = new
    for n in model.graph.node:
        for k, t in enumerate(n.input):
            if t == old:
                n.input[k] = new


# --- the regularizers and the noise control in numpy ------------------------------------------

def _interpolate(p: np.ndarray, q: np.ndarray, a) -> np.ndarray:
    """``(1 - a) * p + a * q`` as the graph computes it (two Mul, one Add; exact ``q`` at a = 1)."""
    one = a.dtype.type(1)
    return (one - a) * p + a * q


@dataclasses.dataclass
class LoopState:
    """x_t and what a regularizer carries (r = y_1; auto-align's weighted sums)."""
    t: int
    x: np.ndarray
    r: np.ndarray
    wsum_y: np.ndarray | None = None
    wsum: np.ndarray | None = None
    frozen: np.ndarray | None = None  # per token [..., 1], with halting


def first_state(r: np.ndarray) -> LoopState:
    """t = 1: x_1 = y_1 = r for every regularizer; no token is frozen."""
    return LoopState(1, r, r, r, np.ones(r.shape[:-1] + (1,), r.dtype), np.zeros(r.shape[:-1] + (1,), np.bool_))


def change(x: np.ndarray, prev: np.ndarray, metric: str) -> np.ndarray:
    """Per-token change [..., 1] as :func:`loopgraph.passes.halt._change` writes it."""
    def norm(v: np.ndarray) -> np.ndarray:
        return np.sqrt((v * v).sum(-1, keepdims=True))
    if metric == "rel":
        return norm(x - prev) / norm(prev)
    dt = x.dtype.type
    return dt(1) - (x * prev).sum(-1, keepdims=True) / np.maximum(norm(x) * norm(prev), dt(COS_EPS))


def halt_update(reg: Reg, prev: LoopState, y: np.ndarray) -> LoopState:
    """:func:`update`, then docs/halting.md's rule (t >= 2): a frozen token keeps x and every
    carried state, and a token whose change is <= TOL freezes. Without halting, :func:`update`."""
    new = update(reg, prev, y)
    if reg.halt is None:
        return new
    f = prev.frozen

    def keep(old, cand):
        return None if cand is None else np.where(f, old, cand)
    x = keep(prev.x, new.x)
    settled = change(x, prev.x, reg.halt_metric) <= x.dtype.type(reg.halt)
    return LoopState(new.t, x, keep(prev.r, new.r), keep(prev.wsum_y, new.wsum_y), keep(prev.wsum, new.wsum), f | settled)


def update(reg: Reg, prev: LoopState, y: np.ndarray) -> LoopState:
    """x_t from y_t and the state at t - 1 (t >= 2), DESIGN §1's table."""
    dt = y.dtype.type
    t = prev.t + 1
    if reg.name == "naive":
        return LoopState(t, y, prev.r)
    if reg.name == "uniform":
        return LoopState(t, _interpolate(prev.x, y, dt(1) / dt(t)), prev.r)
    if reg.name == "ema":
        return LoopState(t, _interpolate(prev.x, y, dt(reg.weight)), prev.r)
    if reg.name == "damped":
        return LoopState(t, _interpolate(prev.x, y, dt(1) / dt(reg.weight)), prev.r)
    if reg.name == "anchor":
        return LoopState(t, _interpolate(prev.r, y, dt(reg.weight)), prev.r)
    if reg.name == "auto-align":
        r = prev.r
        dot = (y * r).sum(-1, keepdims=True)
        norms = np.sqrt((y * y).sum(-1, keepdims=True)) * np.sqrt((r * r).sum(-1, keepdims=True))
        w = np.maximum(dot / np.maximum(norms, dt(COS_EPS)), dt(0))
        wsum_y = prev.wsum_y + w * y
        wsum = prev.wsum + w
        return LoopState(t, wsum_y / wsum, r, wsum_y, wsum)
    raise ValueError(f"unhandled regularizer {reg.name}")


def noise_matrix(seed: int, hidden: int, dtype: np.dtype) -> np.ndarray:
    """W of the noise control, drawn as :func:`loopgraph.passes.loop.noise_control` draws it."""
    return np.random.default_rng(seed).standard_normal((hidden, hidden)).astype(dtype)


def noise(x_final: np.ndarray, r: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``r + e * |x_N - r| / |e|`` per token, ``e = sin(r W)``."""
    dt = r.dtype.type
    shift = np.sqrt(((x_final - r) ** 2).sum(-1, keepdims=True))
    e = np.sin(r @ w)
    scale = shift / np.maximum(np.sqrt((e * e).sum(-1, keepdims=True)), dt(1e-12))
    return r + e * scale


# --- running it -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """What the chain computes: a cell, optionally its noise control (``noise_seed``)."""
    cell: Cell
    noise_seed: int | None = None


class BlockChain:
    """Sessions of one export's pieces and the cell arithmetic on top of them.

    :meth:`forward` is a ``loopgraph.eval.scoring.Forward`` for one variant (``None``: the
    baseline) with a memo of the states every variant of the same batch shares; call
    :meth:`clear` between batches of items (jobs) to free it. ``block_runs`` counts block
    sessions run (the work), ``forwards`` the ``forward`` calls."""

    def __init__(self, models: ChainModels, threads: int | None = None) -> None:
        from loopgraph.runtime.session import open_session
        self.models = models
        self.embed = open_session(models.embed, threads=threads)
        self.blocks = [open_session(m, threads=threads) for m in models.blocks]
        self.head = open_session(models.head, threads=threads)
        for m in (models.embed, *models.blocks, models.head):  # ORT holds the weights now; keep only the graphs' interfaces
            del m.graph.initializer[:]
        self.num_blocks = len(self.blocks)
        self.block_runs = 0
        self.block_tokens = 0  # ids fed to block sessions (padding excluded)
        self.forwards = 0
        self._noise: dict[int, np.ndarray] = {}
        self.clear()

    def clear(self) -> None:
        """Forget every memoized state (between jobs)."""
        self._boundaries: dict[bytes, tuple[list[np.ndarray], dict]] = {}
        self.forget_loops()

    def forget_loops(self) -> None:
        """Forget the loop states (after the last variant of a range)."""
        self._loops: dict[tuple, LoopState | np.ndarray] = {}

    def _inputs(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None, allow: np.ndarray | None) -> dict[str, np.ndarray]:
        if (allow is not None) != self.models.allow:
            raise ValueError("feed allow exactly when the chain was split with allow=True")
        feeds = {"input_ids": ids, "attention_mask": mask,
                 "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None) if positions is None else positions}
        return feeds if allow is None else {**feeds, ALLOW: allow}

    def run_blocks(self, start: int, end: int, x: np.ndarray, feeds: dict) -> np.ndarray:
        """Blocks ``start .. end - 1`` applied once to ``x``."""
        for b in range(start, end):
            wanted = {n: feeds[n] for n in self.models.block_inputs[b]}
            x = self.blocks[b].run({self.models.hidden: x, **wanted})[self.blocks[b].output_names[0]]
            self.block_runs += 1
            self.block_tokens += int(feeds["attention_mask"].sum())
        return x

    def boundaries(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None = None,
                   allow: np.ndarray | None = None) -> tuple[list[np.ndarray], dict]:
        """h_0 .. h_L of the baseline for this batch (memoized). ``positions`` (default: from
        ``mask``) and ``allow`` describe packed rows (:mod:`loopgraph.eval.packing`)."""
        key = b"".join(a.tobytes() for a in (ids, mask, positions, allow) if a is not None) + bytes(str(ids.shape), "ascii")
        if key not in self._boundaries:
            feeds = self._inputs(ids, mask, positions, allow)
            h = [self.embed.run({n: feeds[n] for n in self.models.embed_inputs})[self.embed.output_names[0]]]
            for b in range(self.num_blocks):
                h.append(self.run_blocks(b, b + 1, h[-1], feeds))
            self._boundaries[key] = (h, feeds)
        return self._boundaries[key]

    def final_state(self, variant: Variant | None, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None = None,
                    allow: np.ndarray | None = None) -> np.ndarray:
        """The residual stream leaving the last block for ``variant`` (None: the baseline)."""
        h, feeds = self.boundaries(ids, mask, positions, allow)
        if variant is None or variant.cell.iters == 1 and variant.noise_seed is None:
            return h[-1]
        c = variant.cell
        batch = id(h)
        state = first_state(h[c.end])
        for t in range(2, c.iters + 1):
            key = (batch, c.start, c.end, c.reg, t)
            if key not in self._loops:
                # y_2 = B(r) is the same for every regularizer; y_3 = B(x_2) the same with or without
                # halting (no token is frozen before t = 2 ends)
                ykey = (batch, c.start, c.end, "y2") if t == 2 else (batch, c.start, c.end, c.reg.plain, "y3")
                if t <= 3 and ykey in self._loops:
                    y = self._loops[ykey]
                else:
                    y = self.run_blocks(c.start, c.end, state.x, feeds)
                    if t <= 3:
                        self._loops[ykey] = y
                self._loops[key] = halt_update(c.reg, state, y)
            state = self._loops[key]
        x = state.x
        if variant.noise_seed is not None:
            if variant.noise_seed not in self._noise:
                self._noise[variant.noise_seed] = noise_matrix(variant.noise_seed, x.shape[-1], x.dtype)
            x = noise(x, state.r, self._noise[variant.noise_seed])
        return self.run_blocks(c.end, self.num_blocks, x, feeds)

    def logits(self, variant: Variant | None, ids: np.ndarray, mask: np.ndarray, at: np.ndarray, positions: np.ndarray | None = None,
               allow: np.ndarray | None = None) -> np.ndarray:
        """Logits ``[len(at), vocab]`` at the flat positions ``at`` (``row * seq + position``)."""
        self.forwards += 1
        x = self.final_state(variant, ids, mask, positions, allow)
        picked = x.reshape(-1, x.shape[-1])[at][None]  # [1, positions, hidden]: norm and head act per position
        return self.head.run(lens_feeds(self.models.head, picked))[self.head.output_names[0]][0]

    def forward(self, variant: Variant | None):
        """A ``Forward`` for :func:`loopgraph.eval.scoring.score_groups`."""
        return lambda ids, mask, at: self.logits(variant, ids, mask, at)

    def packed_forward(self, variant: Variant | None):
        """A ``PackedForward`` for :func:`loopgraph.eval.packing.score_packed` (a chain split with allow)."""
        return lambda ids, mask, positions, allow, at: self.logits(variant, ids, mask, at, positions, allow)
