"""Small decoder-like graphs built in code (onnx.helper; no torch, no Optimum), and their numpy forward.

Block L (named ``/model/layers.{L}/...`` so block discovery finds it by module path) is a residual
``h + g_l(h)`` whose output is ``/model/layers.{L}/Add_1_output_0``:

- without a cache: ``g_l(h) = tanh(h W_l)``;
- with a toy cache per block: ``K = concat(past.L.key, h Wk_l)``, ``V = concat(past.L.value, h Wv_l)``
  (over the sequence axis; both are graph outputs ``present.L.*``) and
  ``g_l(h) = softmax(h Wq_l K^T) V`` (no mask: the toy attends to everything it holds).

After the last block: ``logits = h W_head``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 8
BLOCKS = 4
OPSET = 18


def weights(seed: int = 0, blocks: int = BLOCKS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"W_head": (0.3 * rng.standard_normal((HIDDEN, HIDDEN))).astype(np.float32)}
    for L in range(blocks):
        for part in ("W", "Wq", "Wk", "Wv"):
            w[f"{part}_{L}"] = (0.2 * rng.standard_normal((HIDDEN, HIDDEN))).astype(np.float32)
    return w


def _io(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _block(L: int, h: str, kv: bool) -> tuple[list[onnx.NodeProto], list, list]:
    """Nodes of block L reading ``h``; returns (nodes, extra inputs, extra outputs)."""
    p = f"/model/layers.{L}"
    out = f"{p}/Add_1_output_0"
    if not kv:
        return [helper.make_node("MatMul", [h, f"W_{L}"], [f"{p}/MatMul_output_0"], name=f"{p}/MatMul"),
                helper.make_node("Tanh", [f"{p}/MatMul_output_0"], [f"{p}/Tanh_output_0"], name=f"{p}/Tanh"),
                helper.make_node("Add", [h, f"{p}/Tanh_output_0"], [out], name=f"{p}/Add_1")], [], []
    nodes = [helper.make_node("MatMul", [h, f"{w}_{L}"], [f"{p}/{w}/MatMul_output_0"], name=f"{p}/{w}/MatMul") for w in ("Wq", "Wk", "Wv")]
    past_k, past_v, pres_k, pres_v = (f"past_key_values.{L}.key", f"past_key_values.{L}.value", f"present.{L}.key", f"present.{L}.value")
    nodes += [
        helper.make_node("Concat", [past_k, f"{p}/Wk/MatMul_output_0"], [pres_k], name=f"{p}/Concat_k", axis=1),
        helper.make_node("Concat", [past_v, f"{p}/Wv/MatMul_output_0"], [pres_v], name=f"{p}/Concat_v", axis=1),
        helper.make_node("Transpose", [pres_k], [f"{p}/Transpose_output_0"], name=f"{p}/Transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", [f"{p}/Wq/MatMul_output_0", f"{p}/Transpose_output_0"], [f"{p}/scores"], name=f"{p}/MatMul_qk"),
        helper.make_node("Softmax", [f"{p}/scores"], [f"{p}/probs"], name=f"{p}/Softmax", axis=-1),
        helper.make_node("MatMul", [f"{p}/probs", pres_v], [f"{p}/attn"], name=f"{p}/MatMul_av"),
        helper.make_node("Add", [h, f"{p}/attn"], [out], name=f"{p}/Add_1"),
    ]
    cache = ["batch", "past", HIDDEN]
    return nodes, [_io(past_k, cache), _io(past_v, cache)], [_io(pres_k, ["batch", "total", HIDDEN]), _io(pres_v, ["batch", "total", HIDDEN])]


def model(kv: bool = False, blocks: int = BLOCKS, opset: int = OPSET, seed: int = 0) -> onnx.ModelProto:
    """The toy decoder as a ModelProto (checked by onnx.checker)."""
    nodes, inputs, outputs, h = [], [_io("x", ["batch", "seq", HIDDEN])], [], "x"
    for L in range(blocks):
        n, i, o = _block(L, h, kv)
        nodes, inputs, outputs, h = nodes + n, inputs + i, outputs + o, f"/model/layers.{L}/Add_1_output_0"
    nodes.append(helper.make_node("MatMul", [h, "W_head"], ["logits"], name="/lm_head/MatMul"))
    inits = [numpy_helper.from_array(v, k) for k, v in weights(seed, blocks).items() if k.startswith(("Wq", "Wk", "Wv")) == kv or k == "W_head"]
    graph = helper.make_graph(nodes, "toy", inputs, [_io("logits", ["batch", "seq", HIDDEN]), *outputs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="toy")
    onnx.checker.check_model(m, full_check=True)
    return m


def block_np(L: int, h: np.ndarray, w: dict, past: tuple[np.ndarray, np.ndarray] | None = None):
    """Block L in numpy: (output, (present key, present value) or None)."""
    if past is None:
        return h + np.tanh(h @ w[f"W_{L}"]), None
    k = np.concatenate([past[0], h @ w[f"Wk_{L}"]], axis=1)
    v = np.concatenate([past[1], h @ w[f"Wv_{L}"]], axis=1)
    s = (h @ w[f"Wq_{L}"]) @ k.transpose(0, 2, 1)
    e = np.exp(s - s.max(-1, keepdims=True))
    return h + (e / e.sum(-1, keepdims=True)) @ v, (k, v)
