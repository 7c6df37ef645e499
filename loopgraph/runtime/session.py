"""One way to open a model with ONNX Runtime, and a runner that returns ``{name: array}``.

``device``: ``cpu``, ``cuda``, ``tensorrt`` or ``auto`` (the best provider the installed wheel
really runs). What is reported is ``session.get_providers()`` — what ORT actually uses, not
what the wheel claims — and a fallback to CPU is logged as a warning (an error with
``strict=True``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import onnx

from loopgraph.errors import LoopgraphError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "tensorrt", "auto")
OPT_LEVELS = ("disable", "basic", "extended", "all")
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise LoopgraphError("onnxruntime is not installed; pip install 'loopgraph[cpu]' (or [gpu])") from None
    return onnxruntime


@dataclasses.dataclass
class Session:
    """An ORT session plus what it really runs on."""
    ort_session: object
    device: str
    providers: list[str]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.ort_session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.ort_session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run with the feeds the model takes (extra feeds are ignored)."""
        names = set(self.input_names)
        arrays = self.ort_session.run(outputs, {k: v for k, v in feeds.items() if k in names})
        return dict(zip(outputs or self.output_names, arrays))


def open_session(model: str | os.PathLike | onnx.ModelProto, device: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", strict: bool = False) -> Session:
    if device not in DEVICES:
        raise LoopgraphError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if opt_level not in OPT_LEVELS:
        raise LoopgraphError(f"unknown optimization level {opt_level!r}; choose one of {', '.join(OPT_LEVELS)}")
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT warns about renaming implicit subgraph inputs: harmless here
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        so.intra_op_num_threads = threads
    available = ort.get_available_providers()
    wanted = device
    if device == "auto":
        wanted = next((d for d in ("tensorrt", "cuda") if _PROVIDERS[d][0] in available), "cpu")
    providers = [p for p in _PROVIDERS[wanted] if p in available] or ["CPUExecutionProvider"]
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(Path(model))
    try:
        sess = ort.InferenceSession(source, so, providers=providers)
    except Exception as e:  # ORT raises its own exception types for invalid graphs
        raise LoopgraphError(f"ONNX Runtime could not open the model: {str(e).splitlines()[0]}") from None
    used = sess.get_providers()
    if wanted != "cpu" and used[0] != _PROVIDERS[wanted][0]:
        msg = (f"device {device!r} asked for {_PROVIDERS[wanted][0]} but ONNX Runtime runs on {used[0]} "
               "(is onnxruntime-gpu installed with its CUDA libraries?)")
        if strict:
            raise LoopgraphError(msg + "; drop --strict-device to fall back to CPU")
        log.warning(msg + "; falling back")
    return Session(sess, wanted if used[0] == _PROVIDERS[wanted][0] else "cpu", used)
