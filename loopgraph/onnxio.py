"""Loading and saving ONNX files safely.

- :func:`load_model` never reads external weight data unless asked, and refuses external-data
  locations that point outside the model's folder (they are never opened).
- :func:`save_model` writes to a temporary file in the destination folder and renames it, so a
  failed write leaves neither a partial file nor a clobbered one.
- :func:`detach_weights` / :func:`attach_weights` swap every initializer for a data-less stub
  (name, dtype, dims) and back, so graph passes cost memory in proportion to the graph, not to
  the weights.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import all_graphs


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A path to an ``.onnx`` file, or a folder holding ``model.onnx``."""
    p = Path(path)
    if p.is_dir() and (p / "model.onnx").is_file():
        return p / "model.onnx"
    if not p.exists():
        raise LoopgraphError(f"{p}: no such file; give the path of an .onnx file or of an export folder")
    if p.is_dir():
        raise LoopgraphError(f"{p}: is a folder without model.onnx; give the .onnx file itself")
    return p


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in the model: initializers and tensor attributes, in subgraphs too."""
    for g in all_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files the model references, in first-seen order."""
    seen: dict[str, None] = {}
    for t in _all_tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    seen.setdefault(entry.value, None)
    return list(seen)


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse locations that escape ``folder`` (never opened) and report missing files."""
    root = folder.resolve()
    for loc in external_locations(model):
        target = (root / loc).resolve()
        if os.path.isabs(loc) or root not in target.parents:
            raise LoopgraphError(
                f"external data location {loc!r} points outside the model's folder {folder}; "
                "refusing to read it (re-save the model with its weights beside it)"
            )
        if not target.is_file():
            raise LoopgraphError(
                f"external data file {loc!r} is missing from {folder}; copy it next to the model "
                "or re-export the model"
            )


def load_model(path: str | os.PathLike, *, load_weights: bool = False) -> onnx.ModelProto:
    """Load an ONNX model. External weights are only checked (not read) unless ``load_weights``."""
    p = resolve_model_path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise LoopgraphError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e}); "
                             "the file may be truncated: export it again") from None
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise LoopgraphError(f"{p}: not an ONNX model (no graph, IR version or opset); "
                             "the file may be truncated or not ONNX: export it again")
    check_external_data(model, p.parent)
    if load_weights and external_locations(model):
        onnx.load_external_data_for_model(model, str(p.parent))
    return model


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise LoopgraphError(f"output folder {folder} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=folder)
    except OSError as e:
        raise LoopgraphError(f"output folder {folder} is not writable ({e.strerror}); choose another -o path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, dest: str | os.PathLike) -> Path:
    """Write ``model`` to ``dest`` atomically. External-data references are kept as they are
    (relative to the destination folder), so the caller decides where weights live."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        onnx.save_model(model, str(tmp))
    return dest


# --- weights off / on -------------------------------------------------------------------------

def detach_weights(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Replace every main-graph initializer by a data-less stub and return the originals by name.

    Passes then run on a model whose size is that of the graph. :func:`attach_weights` puts the
    original protos back (the same objects, never copied twice)."""
    stash = {t.name: t for t in model.graph.initializer}
    del model.graph.initializer[:]
    model.graph.initializer.extend(
        TensorProto(name=t.name, data_type=t.data_type, dims=t.dims) for t in stash.values()
    )
    return stash


def attach_weights(model: onnx.ModelProto, stash: dict[str, TensorProto]) -> None:
    """Swap stubs for the stashed protos; initializers not in the stash (new ones) stay."""
    current = list(model.graph.initializer)
    del model.graph.initializer[:]
    for t in current:
        model.graph.initializer.append(stash.get(t.name, t))
