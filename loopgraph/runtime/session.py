"""One way to open a model with ONNX Runtime, and a runner that returns ``{name: array}``.

``device``: ``cpu``, ``cuda``, ``tensorrt`` or ``auto`` (the best provider the installed wheel
really runs). What is reported is ``session.get_providers()`` — what ORT actually uses, not
what the wheel claims (onnxruntime-gpu on a box without CUDA libraries lists CUDA as available
and then runs on CPU) — and a fallback to CPU is logged as a warning (an error with
``strict=True``).

Two ways to run:

* :meth:`Session.run` — numpy in, numpy out (what ``verify`` and scoring use).
* :meth:`Session.run_bound` — IO binding: inputs and outputs live on the session's device
  (``cuda`` for the CUDA and TensorRT EPs), so a generation loop can feed the KV-cache outputs of
  one step back as inputs of the next without a round trip through host memory. Integer scalar
  inputs (the Loop trip count ``loopgraph/iters``) are bound in CPU memory: ORT's Loop reads its
  trip count on the host, and a device copy would only be copied back.

The shared command-line options live here too: :func:`add_runtime_args` adds ``--device``,
``--threads``, ``--opt-level`` and ``--strict-device`` to any subcommand, and
:func:`session_from_args` opens a model with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
#: the device kind for IO binding, by the provider ORT really runs first
_IO_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise LoopgraphError("onnxruntime is not installed; pip install 'loopgraph[cpu]' (or [gpu])") from None
    return onnxruntime


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as ORT declares it: dims are ints (static) or names/None (dynamic)."""
    name: str
    shape: tuple[int | str | None, ...]
    type: str  # e.g. "tensor(float)", "tensor(int64)"


@dataclasses.dataclass
class Session:
    """An ORT session plus what it really runs on.

    ``device`` is the device kind actually used (``cpu``, ``cuda`` or ``tensorrt``), after any
    fallback; ``providers`` is ``get_providers()``; ``io_device`` is where :meth:`run_bound`
    keeps tensors (``cpu`` or ``cuda``)."""
    ort_session: Any
    device: str
    providers: list[str]

    def _inputs(self) -> list:
        # graph inputs with a default (an initializer of the same name, e.g. loopgraph/iters of a
        # --dynamic file) are not in get_inputs(): ORT lists them as overridable initializers
        return [*self.ort_session.get_inputs(), *self.ort_session.get_overridable_initializers()]

    @property
    def input_names(self) -> list[str]:
        """Every input that can be fed, those with a default value included."""
        return [i.name for i in self._inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.ort_session.get_outputs()]

    @property
    def inputs(self) -> dict[str, TensorInfo]:
        """Every input that can be fed, those with a default value included."""
        return {i.name: TensorInfo(i.name, tuple(i.shape), i.type) for i in self._inputs()}

    @property
    def outputs(self) -> dict[str, TensorInfo]:
        return {o.name: TensorInfo(o.name, tuple(o.shape), o.type) for o in self.ort_session.get_outputs()}

    @property
    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (e.g. ``loopgraph.spec``)."""
        return dict(self.ort_session.get_modelmeta().custom_metadata_map)

    @property
    def io_device(self) -> str:
        return _IO_DEVICE.get(self.providers[0], "cpu")

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run with the feeds the model takes (extra feeds are ignored); numpy in, numpy out."""
        names = set(self.input_names)
        outputs = list(outputs) if outputs is not None else self.output_names
        arrays = self.ort_session.run(outputs, {k: v for k, v in feeds.items() if k in names})
        return dict(zip(outputs, arrays))

    def to_device(self, array: np.ndarray) -> Any:
        """An ``OrtValue`` holding ``array`` on :attr:`io_device` (on the CPU it wraps ``array``'s memory)."""
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.io_device, 0)

    def run_bound(self, feeds: Mapping[str, Any], outputs: Sequence[str], to_host: Sequence[str] = ()) -> dict[str, Any]:
        """Run with IO binding. ``feeds`` are numpy arrays or ``OrtValue`` s (extra feeds are
        ignored); numpy feeds are copied to :attr:`io_device`, except integer scalars, which stay
        in CPU memory (the Loop trip count). Outputs stay on :attr:`io_device` as ``OrtValue`` s,
        except those named in ``to_host``, which come back as numpy arrays."""
        ort = _ort()
        inputs = self.inputs
        binding = self.ort_session.io_binding()
        held = []  # OrtValues on the CPU wrap numpy memory: keep both alive until the run is done
        for name, value in feeds.items():
            if name not in inputs:
                continue
            if not isinstance(value, ort.OrtValue):
                array = np.ascontiguousarray(value)
                on_host = array.ndim == 0 and np.issubdtype(array.dtype, np.integer)
                # an OrtValue, not bind_cpu_input: that one cannot bind inputs that have a default
                value = ort.OrtValue.ortvalue_from_numpy(array, "cpu" if on_host else self.io_device, 0)
                held.append((array, value))
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.io_device, 0)
        self.ort_session.run_with_iobinding(binding)
        host = set(to_host)
        return {name: value.numpy() if name in host else value for name, value in zip(outputs, binding.get_outputs())}


def _graph_optimization_level(ort, opt_level: str):
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]


def open_session(model: str | os.PathLike | onnx.ModelProto, device: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", strict: bool = False, optimized_model_path: str | os.PathLike | None = None,
                 provider_options: Mapping[str, Mapping[str, str]] | None = None,
                 base_dir: str | os.PathLike | None = None) -> Session:
    """Open ``model`` (an .onnx path, an export folder, or a ModelProto) on ``device``.

    Refuses an unknown device or optimization level and a thread count below 1. When the wanted
    execution provider is not what ORT really runs, logs a warning and falls back to CPU, or
    raises with ``strict=True``. ``optimized_model_path`` saves the graph as ORT runs it (after
    partitioning, with any Memcpy nodes), for inspection. ``provider_options`` maps a provider
    name to its ORT options, e.g. ``{"CUDAExecutionProvider": {"use_tf32": "0"}}`` for strict fp32.
    ``base_dir``: for a ModelProto whose weights are external data, the folder they are in."""
    if device not in DEVICES:
        raise LoopgraphError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if opt_level not in OPT_LEVELS:
        raise LoopgraphError(f"unknown optimization level {opt_level!r}; choose one of {', '.join(OPT_LEVELS)}")
    if threads is not None and threads < 1:
        raise LoopgraphError(f"--threads {threads} must be at least 1 (or left out for ONNX Runtime's default)")
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT warns about renaming implicit subgraph inputs: harmless here
    so.graph_optimization_level = _graph_optimization_level(ort, opt_level)
    if threads:
        so.intra_op_num_threads = threads
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    available = ort.get_available_providers()
    wanted = device
    if device == "auto":
        wanted = next((d for d in ("tensorrt", "cuda") if _PROVIDERS[d][0] in available), "cpu")
    providers = [p for p in _PROVIDERS[wanted] if p in available] or ["CPUExecutionProvider"]
    options = [dict((provider_options or {}).get(p, {})) for p in providers]
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
        if base_dir is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    else:
        from loopgraph.onnxio import resolve_model_path
        source = str(resolve_model_path(Path(model)))
    try:
        sess = ort.InferenceSession(source, so, providers=providers, provider_options=options)
    except Exception as e:  # ORT raises its own exception types for invalid graphs
        raise LoopgraphError(f"ONNX Runtime could not open the model: {str(e).splitlines()[0]}") from None
    used = sess.get_providers()
    if wanted != "cpu" and used[0] != _PROVIDERS[wanted][0]:
        msg = (f"device {device!r} asked for {_PROVIDERS[wanted][0]} but ONNX Runtime runs on {used[0]} "
               f"(available providers: {', '.join(available)}; is onnxruntime-gpu installed with its CUDA libraries?)")
        if strict:
            raise LoopgraphError(msg + "; drop --strict-device to fall back to CPU")
        log.warning(msg + "; falling back to CPU")
    kind = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}.get(used[0], "cpu")
    return Session(sess, kind, used)


def add_runtime_args(parser: argparse.ArgumentParser, *, session_options: bool = True) -> argparse._ArgumentGroup:
    """Add the shared runtime options to a subcommand's parser: ``--device`` (a checked choice of
    :data:`DEVICES`) and ``--threads`` always; ``--opt-level`` and ``--strict-device`` with
    ``session_options`` (commands that open their sessions with :func:`session_from_args`)."""
    from loopgraph.cliargs import int_arg
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", choices=list(DEVICES),
                   help="execution provider: cpu (default), cuda, tensorrt, or auto (the best one that really runs)")
    g.add_argument("--threads", type=int_arg, help="intra-op threads (default: ONNX Runtime's choice, one per core)")
    if session_options:
        g.add_argument("--opt-level", default="all", choices=list(OPT_LEVELS), help="ORT graph optimization level (default all)")
        g.add_argument("--strict-device", action="store_true", help="fail instead of falling back to CPU when the device is not usable")
    return g


def session_from_args(args: argparse.Namespace, model: str | os.PathLike | onnx.ModelProto) -> Session:
    """Open ``model`` with the options added by :func:`add_runtime_args`."""
    return open_session(model, device=args.device, threads=args.threads, opt_level=args.opt_level, strict=args.strict_device)
