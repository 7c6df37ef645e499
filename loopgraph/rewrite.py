"""The rewrite pipeline (find blocks, then wrap the range in a Loop or unroll it), on files or in-memory models."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import onnx

from loopgraph.deploy.folder import is_folder_output, write_folder
from loopgraph.errors import LoopgraphError
from loopgraph.metadata import SOURCE_KEY
from loopgraph.onnxio import atomic_path, attach_weights, detach_weights, external_locations, load_model, resolve_model_path, save_model
from loopgraph.passes.base import Pipeline, Reports
from loopgraph.passes.blocks import BlockMap, BlocksReport, FindBlocks
from loopgraph.passes.loop import LoopReport, WrapInLoop
from loopgraph.passes.skipnorm import SplitSkipNorms
from loopgraph.passes.unroll import Unroll, UnrollReport
from loopgraph.spec import LoopSpec


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
            *, copy_weights: bool = False, force: bool = False) -> RewriteResult:
    """Rewrite ``model`` (a ModelProto, or a path to an .onnx file) according to ``spec``.

    For a ModelProto the result holds the new model and nothing is written. For a path the
    result is written to ``output`` (default: next to the input, e.g.
    ``model.loop10-20x3-uniform.onnx``) through a temporary file; weights are never loaded
    when they are external data, and are never stored twice. An ``output`` that ends in ``/``
    or is an existing folder gets a runnable folder (:mod:`loopgraph.deploy.folder`; ``force``
    replaces a non-empty one)."""
    if isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        stash = detach_weights(work)
        new, resolved, blocks, reports = rewrite_model(work, spec)
        attach_weights(new, stash)
        return RewriteResult(new, None, resolved, blocks, reports)

    src = resolve_model_path(model)
    if is_folder_output(output):  # a runnable folder (loopgraph.deploy.folder): model.onnx + config, tokenizer, genai_config
        return write_folder(src, Path(output), force, lambda path: rewrite(src, spec, path, copy_weights=copy_weights))
    loaded = load_model(src)  # checks external data, never reads it
    out = Path(output) if output is not None else None
    locations = external_locations(loaded)
    stash = detach_weights(loaded)
    new, resolved, blocks, reports = rewrite_model(loaded, spec)
    out = out or default_output(src, resolved)
    if out.resolve() == src.resolve():
        raise LoopgraphError(f"output {out} is the input file; choose another -o path (the input is never overwritten)")
    if out.exists() and out.is_dir():
        out = out / default_output(src, resolved).name
    if locations and out.parent.resolve() != src.parent.resolve():
        if not copy_weights:
            raise LoopgraphError(
                f"the weights of {src.name} are external data ({', '.join(locations)}) in {src.parent}; "
                f"write the output into that folder or pass --copy-weights to copy them to {out.parent}")
        _copy_data_files(src.parent, out.parent, locations)
    attach_weights(new, stash)
    # where the original lives, relative to the output (verify's N = 1 check reads it)
    props = {p.key: p.value for p in new.metadata_props}
    props[SOURCE_KEY] = os.path.relpath(src.resolve(), out.parent.resolve())
    onnx.helper.set_model_props(new, props)
    save_model(new, out)
    return RewriteResult(None, out, resolved, blocks, reports)


def _copy_data_files(src_dir: Path, dst_dir: Path, locations: list[str]) -> None:
    for loc in locations:
        dst = dst_dir / loc
        if dst.exists() and dst.stat().st_size == (src_dir / loc).stat().st_size:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src_dir / loc, tmp)
