"""Loading and saving ONNX files safely.

- :func:`load_model` never reads external weight data unless asked, and refuses external-data
  locations that point outside the model's folder (they are never opened).
- :func:`load_model` refuses what would crash a parser or a pass later: names that are not valid
  UTF-8, and external data shorter than the offsets and lengths the model declares.
- :func:`save_model` writes to a temporary file in the destination folder and renames it, so a
  failed write leaves neither a partial file nor a clobbered one. Temporary files carry the
  writer's host and PID in their name (``.model.onnx.lgtmp-<host>-<pid>-<random>.tmp``); the next
  write to a folder removes those whose writer is dead (a kill -9 leftover), never a live one's.
- :func:`check_output` is the one check of an output path (``-o``, ``--json``...) before any
  work starts: an existing file is refused unless ``force``, a folder is refused, the folder
  must exist.
- :func:`detach_weights` / :func:`attach_weights` swap every initializer for a data-less stub
  (name, dtype, dims) and back, so graph passes cost memory in proportion to the graph, not to
  the weights.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from loopgraph.errors import WRITE_ERRNOS, LoopgraphError
from loopgraph.metadata import all_graphs

log = logging.getLogger(__name__)


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


def external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor stored as external data (initializers, Constant attributes, subgraphs)."""
    return (t for t in _all_tensors(model.graph) if t.data_location == TensorProto.EXTERNAL)


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
    """Refuse locations that escape ``folder`` (never opened), report missing files, and check
    every tensor's declared offset and length against its file's size (a truncated data file
    would otherwise pass until ONNX Runtime reads past its end)."""
    root = folder.resolve()
    sizes: dict[str, int] = {}
    for t in _all_tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location")
        if not loc:
            raise LoopgraphError(f"tensor {t.name!r} is marked as external data but names no file (no 'location'); "
                                 "the model file is damaged: export it again")
        if loc not in sizes:
            sizes[loc] = _data_file_size(root, folder, loc)
        _check_extent(t, entries, loc, sizes[loc])


def _data_file_size(root: Path, folder: Path, loc: str) -> int:
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
    return target.stat().st_size


def _check_extent(t: TensorProto, entries: dict[str, str], loc: str, size: int) -> None:
    """The bytes ``[offset, offset + length)`` that ``t`` declares must lie inside the file; a
    missing length means the tensor's own size (dims x element size)."""
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise LoopgraphError(f"tensor {t.name!r}: external data offset/length {entries.get('offset')!r}/"
                             f"{entries.get('length')!r} are not integers; the model file is damaged: export it again") from None
    need = _nbytes(t)
    if length is None:
        length = need
    if offset < 0 or length is None or length < 0 or (need is not None and length != need) or offset + length > size:
        declared = f"bytes {offset}..{offset + (length or 0)}" + (f" ({need} for its dims {list(t.dims)})" if need is not None else "")
        raise LoopgraphError(f"tensor {t.name!r} declares {declared} of {loc!r}, which holds {size} bytes; "
                             "the data file is truncated or does not belong to this model: copy it again or re-export")


def _nbytes(t: TensorProto) -> int | None:
    """Bytes of a fixed-size tensor (None for strings and unknown types)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    n = 1
    for d in t.dims:
        if d < 0:
            return None
        n *= d
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(t.data_type)
    if bits is not None or itemsize == 0:
        return None  # packed types: length rules differ; only the file size bound applies
    return n * itemsize


def _names(model: onnx.ModelProto) -> Iterator[str | bytes]:
    """Every string a pass or a printer reads: names, op types, domains, attribute names, metadata."""
    yield from (model.producer_name, model.producer_version, model.domain, model.doc_string)
    for g in all_graphs(model.graph):
        yield from (g.name, g.doc_string)
        for v in (*g.input, *g.output, *g.value_info):
            yield from (v.name, v.doc_string)
            yield from (d.dim_param for d in v.type.tensor_type.shape.dim)
        for t in g.initializer:
            yield t.name
            for e in t.external_data:
                yield from (e.key, e.value)
        for node in g.node:
            yield from (node.name, node.op_type, node.domain, node.doc_string, *node.input, *node.output)
            yield from (a.name for a in node.attribute)
    for p in model.metadata_props:
        yield from (p.key, p.value)
    for o in model.opset_import:
        yield o.domain


def check_names(model: onnx.ModelProto, path: Path) -> None:
    """protobuf hands back a string field that is not valid UTF-8 as ``bytes``; every consumer
    (graphsurgeon, ``str.startswith``, JSON) would then fail somewhere deep. Refuse it here."""
    for name in _names(model):
        if not isinstance(name, str):
            raise LoopgraphError(f"{path}: the name {bytes(name)[:60]!r} is not valid UTF-8; "
                                 "the file is damaged or was not written by an ONNX exporter: export it again")


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
    check_names(model, p)
    check_external_data(model, p.parent)
    if load_weights and external_locations(model):
        onnx.load_external_data_for_model(model, str(p.parent))
    return model


# --- writing files ----------------------------------------------------------------------------

_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()
#: ``.<name>.lgtmp-<host>-<pid>-<random>.tmp<suffix>``: whose temp file it is, so only a dead writer's is removed
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.lgtmp-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-z]{8}\.tmp")
#: the names earlier loopgraph versions used (tempfile.mkstemp): no writer recorded, so only reported
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(tmp|png)$")


def check_output(path: str | os.PathLike, *, force: bool = False, what: str = "-o") -> Path:
    """Check an output file path before any work starts (see the module doc): the folder
    exists, the path is not a folder, and an existing file is only replaced with ``force``.
    Returns the path. Writing still goes through :func:`atomic_path`."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise LoopgraphError(f"{what} {p} is a folder; give a file path (e.g. {p / 'out.json'})")
    if not folder.is_dir():
        raise LoopgraphError(f"output folder {folder} does not exist; create it first (for {what} {p})")
    if (p.exists() or p.is_symlink()) and not force:
        raise LoopgraphError(f"{what} {p} already exists; pass --force to replace it, or choose another path")
    return p


def check_output_folder(folder: str | os.PathLike, patterns: tuple[str, ...], *, force: bool = False, what: str = "-o") -> Path:
    """The folder form of :func:`check_output` (``sweep``, ``trace``): refuse a path that is a
    file, and a folder already holding files the command writes (``patterns``, globs) unless
    ``force``. The folder itself may exist (and is created later if not)."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise LoopgraphError(f"{what} {p} is a file; give a folder for the outputs")
    taken = sorted({f.name for pattern in patterns for f in p.glob(pattern)}) if p.is_dir() else []
    if taken and not force:
        shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise LoopgraphError(f"{what} {p} already holds {shown}; pass --force to replace them, or choose another folder")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files of writers on this host that are gone (kill -9, power loss);
    a live writer's file (its PID is running) and files of other hosts are kept. Older
    temp files without a recorded writer are only reported. Returns the removed paths."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        m = _TEMP_RE.match(entry.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                log.info("removed %s, a temporary file left by an interrupted loopgraph write (process %s)", entry.path, m["pid"])
        elif not m and _LEGACY_TEMP_RE.match(entry.name):
            log.warning("%s looks like a temporary file of an interrupted write by an older loopgraph; delete it if no "
                        "loopgraph command is writing to %s", entry.path, folder)
    return removed


def temp_name(dest: Path, suffix: str = ".tmp") -> Path:
    """A fresh temporary path beside ``dest`` whose name records this host and process."""
    return dest.parent / f".{dest.name}.lgtmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp{'' if suffix == '.tmp' else suffix}"


def write_error(e: OSError, dest: Path) -> LoopgraphError:
    """One line for a failed write: the path, the cause, the fix."""
    where = e.filename if isinstance(e.filename, str) and ".lgtmp-" not in e.filename else dest
    return LoopgraphError(f"cannot write {where}: {e.strerror or e} (errno {errno.errorcode.get(e.errno, e.errno)}); "
                          "nothing was replaced: free space, fix the permissions or choose another output path")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tmp", *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.
    With ``replace=False`` an existing ``dest`` is never replaced, not even one that appears while
    the block runs (a hard link claims the name; a :class:`LoopgraphError` if it is taken). A
    write that fails for want of room or permission becomes a one-line :class:`LoopgraphError`
    naming ``dest``; the temporary file is removed either way."""
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise LoopgraphError(f"output folder {folder} does not exist; create it first")
    clean_stale_temps(folder)
    tmp = temp_name(folder / dest.name, suffix)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise LoopgraphError(f"output folder {folder} is not writable ({e.strerror}); choose another -o path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # created 0600; give the file the usual mode
        if replace:
            os.replace(tmp, dest)
        else:
            _claim(tmp, dest)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.errno in WRITE_ERRNOS:
            raise write_error(e, dest) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _claim(tmp: Path, dest: Path) -> None:
    """Give ``tmp`` the name ``dest`` only if nobody holds it (link fails on an existing name)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise LoopgraphError(f"{dest} appeared while it was being written by another process; it was left as it is, retry") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if dest.exists():  # a file system without hard links: the narrow check-then-rename window remains
            raise LoopgraphError(f"{dest} appeared while it was being written by another process; it was left as it is, retry") from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def save_model(model: onnx.ModelProto, dest: str | os.PathLike) -> Path:
    """Write ``model`` to ``dest`` atomically. External-data references are kept as they are
    (relative to the destination folder), so the caller decides where weights live."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        onnx.save_model(model, str(tmp))
    return dest


# --- weights off / on -------------------------------------------------------------------------

def is_stub(t: TensorProto) -> bool:
    """A data-less initializer: what :func:`detach_weights` leaves in place of a weight."""
    has = t.HasField("raw_data") or t.data_location == TensorProto.EXTERNAL
    has = has or bool(t.float_data or t.double_data or t.int32_data or t.int64_data)
    return not has and math.prod(t.dims) > 0


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
