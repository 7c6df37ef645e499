"""The rewrite pipeline (find blocks, then wrap the range in a Loop or unroll it), on files or in-memory models."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx_graphsurgeon.util.exception import OnnxGraphSurgeonException

from loopgraph.deploy.folder import is_folder_output, write_folder
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import SOURCE_KEY, set_props  # noqa: F401 - SOURCE_KEY: re-exported for older importers
from loopgraph.onnxio import (
    atomic_path,
    attach_weights,
    check_output,
    detach_weights,
    external_locations,
    external_tensors,
    load_model,
    resolve_model_path,
    save_model,
)
from loopgraph.passes.base import Pipeline, Reports
from loopgraph.passes.blocks import BlockMap, BlocksReport, FindBlocks, has_kv_cache
from loopgraph.passes.loop import LoopReport, WrapInLoop
from loopgraph.passes.skipnorm import SplitSkipNorms
from loopgraph.passes.unroll import Unroll, UnrollReport
from loopgraph.provenance import file_hash, source_props
from loopgraph.spec import LoopSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RewriteResult:
    model: onnx.ModelProto | None  # the rewritten model (None when written to a file)
    path: Path | None  # where it was written
    spec: LoopSpec  # resolved against the model's blocks
    blocks: BlockMap
    reports: Reports  # every pass's typed report, in pipeline order

    @property
    def report(self) -> LoopReport | UnrollReport:
        """The report of the pass that wrote the range (the Loop or the unrolled copies)."""
        return self.reports.get(UnrollReport if self.spec.unroll else LoopReport)


def default_output(src: Path, spec: LoopSpec) -> Path:
    return src.with_name(f"{src.stem}.{spec.slug()}.onnx")


def pipeline(spec: LoopSpec) -> Pipeline:
    """The rewrite as data: find the blocks, split fused skip-norms at the range's boundaries
    (model-builder graphs; a no-op otherwise), then loop (or unroll) the range."""
    return Pipeline([FindBlocks(), SplitSkipNorms(spec), Unroll(spec) if spec.unroll else WrapInLoop(spec)])


def rewrite_model(model: onnx.ModelProto, spec: LoopSpec) -> tuple[onnx.ModelProto, LoopSpec, BlockMap, Reports]:
    """Rewrite an in-memory model (weights may be stubs). Returns a new model; ``model`` is kept."""
    new, reports = pipeline(spec)(model)
    resolved = reports.get(UnrollReport if spec.unroll else LoopReport).spec
    return new, resolved, reports.get(BlocksReport).blocks, reports


def rewrite(model: onnx.ModelProto | str | os.PathLike, spec: LoopSpec, output: str | os.PathLike | None = None,
            *, copy_weights: bool = False, force: bool = False, kv_given: bool = False,
            say: Callable[[str], None] = log.info) -> RewriteResult:
    """Rewrite ``model`` (a ModelProto, or a path to an .onnx file) according to ``spec``.

    For a ModelProto the result holds the new model and nothing is written. For a path the
    result is written to ``output`` (default: next to the input, e.g.
    ``model.loop10-20x3-uniform.onnx``) through a temporary file; weights are never loaded
    when they are external data, and are never stored twice.

    Refused (:class:`LoopgraphError`, nothing written): an input file that ``onnx.checker``
    (full check, strict shape inference) rejects or whose default opset is outside 1..the newest
    opset onnx knows (:func:`check_input`; files only: an in-memory model is the caller's), an
    output that exists (unless ``force``) or is the input, external weights in another folder
    without ``copy_weights``, and a ``--kv`` mode (``kv_given``) for a model
    without a KV cache. ``copy_weights`` never replaces a data file: an identical one is reused,
    a different one under the same name leaves it alone and writes a fresh name (see
    :func:`_copy_data_files`); ``say`` is told what was done. An ``output`` that ends in ``/``
    or is an existing folder gets a runnable folder (:mod:`loopgraph.deploy.folder`; ``force``
    replaces a non-empty one)."""
    if isinstance(model, onnx.ModelProto):
        # a model the caller's code holds: the passes' preconditions apply, not the file checks
        # (graphs built in code often leave output shapes to inference, which onnx.checker refuses)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        stash = detach_weights(work)
        new, resolved, blocks, reports = rewrite_model(work, spec)
        attach_weights(new, stash)
        return RewriteResult(new, None, resolved, blocks, reports)

    src = resolve_model_path(model)
    if is_folder_output(output):  # a runnable folder (loopgraph.deploy.folder): model.onnx + config, tokenizer, genai_config
        return write_folder(src, Path(output), force, lambda path: rewrite(src, spec, path, copy_weights=copy_weights,
                                                                             kv_given=kv_given, say=say))
    out = Path(output) if output is not None else None  # a folder went to write_folder above
    if out is not None:
        _check_out(src, out, force)  # before any work: a refused output costs nothing
    loaded = load_model(src)  # checks names and external data, never reads the data
    check_input(loaded, str(src), src)
    if kv_given and not has_kv_cache(loaded):
        raise LoopgraphError(f"--kv {spec.kv} applies to exports with a KV cache (--with-past); {src} has none: drop --kv")
    locations = external_locations(loaded)
    stash = detach_weights(loaded)
    new, resolved, blocks, reports = _rewrite_checked(loaded, spec, str(src))
    if out is None:  # the default name is known once the range is resolved
        out = src.parent / default_output(src, resolved).name
        _check_out(src, out, force)
    if locations and out.parent.resolve() != src.parent.resolve():
        if not copy_weights:
            raise LoopgraphError(
                f"the weights of {src.name} are external data ({', '.join(locations)}) in {src.parent}; "
                f"write the output into that folder or pass --copy-weights to copy them to {out.parent}")
        renamed = _copy_data_files(src.parent, out.parent, locations, say)
    else:
        renamed = {}
    attach_weights(new, stash)
    _relocate(new, renamed)
    set_props(new, source_props(src, loaded, out))  # verify's N = 1 check and eval's noise control read it
    save_model(new, out)
    return RewriteResult(None, out, resolved, blocks, reports)


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise LoopgraphError(f"output {out} is the input file; choose another -o path (the input is never overwritten)")
    check_output(out, force=force)


def check_input(model: onnx.ModelProto, label: str, path: Path | None = None) -> None:
    """The precondition of every rewrite: a model onnx.checker accepts (full check: strict shape
    inference; for graphs with ONNX Runtime contrib ops, which onnx has no schemas for, the
    structural check) at an opset onnx knows. A damaged graph (a cycle, a dangling input, an attribute
    of no type, an input of the wrong type) is refused here, with the checker's evidence, instead
    of failing deep inside a pass or yielding a file that does not load. ``path`` (the file of
    ``model``, a header without weights) makes the checker read the weights from the file."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= opset <= newest:
        raise LoopgraphError(f"{label} declares ONNX opset {opset}; onnx {onnx.__version__} knows 1..{newest}: export the model again")
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value <= 0 for d in dims):
            raise LoopgraphError(f"{label}: input {v.name!r} has a fixed dimension of size 0 ({[d.dim_param or d.dim_value for d in dims]}); "
                                 "a causal LM takes non-empty batches: rewrite an unmodified export")
    try:
        if _has_runtime_ops(model):  # strict inference cannot judge ORT's contrib ops: structure only
            onnx.checker.check_model(_checkable(model))
        else:
            onnx.checker.check_model(str(path) if path is not None else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:  # ValueError: an unknown dtype
        first = next((line for line in str(e).strip().splitlines() if line.strip()), type(e).__name__)
        raise LoopgraphError(f"{label} is not a valid ONNX model (onnx.checker: {first.strip()[:300]}); "
                             "rewrite an unmodified export (loopgraph export)") from None


#: ops ONNX Runtime registers in the *default* domain although onnx has no schema for them
#: (onnxruntime-genai's model builder writes block 0's input norm as one)
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def _has_runtime_ops(model: onnx.ModelProto) -> bool:
    """True for a graph with ONNX Runtime contrib ops (quantized files, model-builder graphs)."""
    return any(n.domain == "com.microsoft" or (n.domain in ("", "ai.onnx") and n.op_type in ORT_ONNX_DOMAIN_OPS)
               for n in model.graph.node)


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` (a header: external weights not read) that onnx.checker can judge whole:
    the ORT ops of :data:`ORT_ONNX_DOMAIN_OPS` moved to ``com.microsoft`` (whose ops the checker
    leaves to the runtime), and external-data initializers declared as graph inputs of their
    type and shape (their extents were checked at load; the checker cannot find their files
    from a copy)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ORT_ONNX_DOMAIN_OPS:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.add(domain="com.microsoft", version=1)
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        copy.graph.initializer.remove(t)
    return copy


def _rewrite_checked(model: onnx.ModelProto, spec: LoopSpec, label: str) -> tuple[onnx.ModelProto, LoopSpec, BlockMap, Reports]:
    """:func:`rewrite_model`, with graphsurgeon's refusal of a graph it cannot sort (a cycle the
    checker's order check let through) turned into a user error; other exceptions are bugs."""
    try:
        return rewrite_model(model, spec)
    except OnnxGraphSurgeonException as e:
        raise LoopgraphError(f"{label}: onnx-graphsurgeon cannot process the graph ({e}); rewrite an unmodified export") from None


# --- weights in another folder ------------------------------------------------------------------

def _copy_data_files(src_dir: Path, dst_dir: Path, locations: list[str], say: Callable[[str], None]) -> dict[str, str]:
    """Copy each external data file into ``dst_dir``, never replacing a file there: a file of
    the same name and the same bytes (size, then a streamed sha256) is reused; one of other bytes
    (another model's weights) is left alone and the copy gets a fresh name,
    ``<stem>.<digest12><suffix>``. Returns the locations that changed (old -> new) for
    :func:`_relocate`."""
    renamed: dict[str, str] = {}
    for loc in locations:
        src = src_dir / loc
        dst = dst_dir / loc
        if dst.exists() and _same_bytes(src, dst):
            say(f"reused {dst}: identical to {src}")
            continue
        if dst.exists():
            digest = file_hash(src).hexdigest()[:12]
            fresh = str(Path(loc).with_name(f"{Path(loc).stem}.{digest}{Path(loc).suffix}"))
            target = dst_dir / fresh
            if target.exists() and _same_bytes(src, target):
                say(f"reused {target}: identical to {src} ({dst} holds other data and was left as it is)")
                renamed[loc] = fresh
                continue
            if target.exists():
                raise LoopgraphError(f"{dst} and {target} both hold other data than {src}; they are left as they are: "
                                     "write the output into an empty folder")
            say(f"{dst} holds other data (another model's weights?) and was left as it is; copied {src} to {target}")
            renamed[loc], dst = fresh, target
        else:
            say(f"copied {src} to {dst}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst, replace=False) as tmp:
            shutil.copyfile(src, tmp)
    return renamed


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return a.samefile(b) or file_hash(a).digest() == file_hash(b).digest()


def _relocate(model: onnx.ModelProto, renamed: dict[str, str]) -> None:
    """Point every external-data ``location`` entry (main graph, subgraphs, Constant tensors)
    at its new file name."""
    if not renamed:
        return
    for t in external_tensors(model):
        for entry in t.external_data:
            if entry.key == "location" and entry.value in renamed:
                entry.value = renamed[entry.value]
