"""The ``loopgraph`` command: a thin layer over the Python API, one function per subcommand.

User errors (:class:`LoopgraphError`), argparse's usage errors and writes that fail for want of
room or permission print as one line and exit with code 2; ``--debug`` shows their traceback.
Ctrl-C and SIGTERM (``kill PID``) unwind every command the same way (``finally`` blocks run: temporary files
are removed, process-pool workers and a local Ray instance stop) and exit with code 130.
Any other exception is a bug and keeps its traceback. torch/transformers/optimum are imported only inside the commands that
need them, so ``loopgraph rewrite --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from loopgraph._version import __version__
from loopgraph.cliargs import Parser, add_form_args, add_spec_args, finite_float, int_arg, spec_from_args
from loopgraph.errors import WRITE_ERRNOS, LoopgraphError

#: modules that add subcommands: each has ``register(subparsers)`` and imports nothing heavy
COMMAND_MODULES: tuple[str, ...] = (
    "loopgraph.runtime.cli",
    "loopgraph.deploy.cli",
    "loopgraph.eval.cli",
    "loopgraph.experiments.cli",
    "loopgraph.experiments.tune_cli",
)


def cmd_export(args: argparse.Namespace) -> int:
    from loopgraph.exporters.export import export
    export(args.model, args.output, with_past=args.with_past, opset=args.opset, force=args.force,
           builder=args.builder, precision=args.precision, execution_provider=args.execution_provider,
           builder_options=_builder_options(args.builder_option), say=lambda m: print(m, file=sys.stderr))
    return 0


def _builder_options(items: list[str] | None) -> dict[str, str]:
    from loopgraph.exporters.genai_builder import parse_options
    return parse_options(items)


def cmd_rewrite(args: argparse.Namespace) -> int:
    from loopgraph.passes.unroll import UnrollReport
    from loopgraph.rewrite import rewrite
    t0 = time.time()
    spec = spec_from_args(args)
    result = rewrite(args.model, spec, args.output, copy_weights=args.copy_weights, force=args.force,
                     kv_given=args.kv is not None, say=lambda m: print(m, file=sys.stderr))
    s = result.spec
    report = result.report
    how = (f"{s.reg}{'' if s.weight is None else f', weight {s.weight:g}'}{', dynamic' if s.dynamic else ''}"
           f"{', kv ' + s.kv if report.kv else ''}"
           f"{'' if s.halt is None else f', halt {s.halt_metric} <= {s.halt:g}' + ('' if s.halt_kv == 'live' else f', {s.halt_kv} K/V')}")
    if isinstance(report, UnrollReport):
        detail = f"{report.copied_nodes} nodes in {s.iters} straight-line copies"
    else:
        detail = f"{report.body_nodes} nodes in the Loop body, {report.regularizer_nodes} regularizer nodes"
        if report.skipping:
            detail += f"; skipped per iteration: {report.skipping}"
    print(f"looped blocks {s.start}:{s.end} of {len(result.blocks)} x{s.iters} ({how}): {detail}")
    print(f"wrote {result.path} in {time.time() - t0:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from loopgraph.verify import DEFAULT_PROMPTS, format_report, verify
    prompts = [tuple(args.prompts)] if args.prompts else DEFAULT_PROMPTS
    report = verify(args.model, args.reference, prompts, atol=args.atol, rtol=args.rtol, device=args.device,
                    threads=args.threads, original=args.original, say=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from loopgraph.runtime.session import add_runtime_args  # its DEVICES check --device; numpy/onnx, no torch
    parser = Parser(prog="loopgraph", description="Regularized inner looping of frozen decoder LMs as an ONNX graph rewrite.")
    parser.add_argument("--version", action="version", version=f"loopgraph {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("export", help="export a causal LM to ONNX with Optimum",
                       description="Export a Hugging Face checkpoint folder, a .gguf file or the built-in smollm2-135m to DIR/model.onnx.")
    p.add_argument("model", help="checkpoint folder, .gguf file, or smollm2-135m")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--with-past", action="store_true", help="export with KV-cache inputs/outputs (text-generation-with-past)")
    p.add_argument("--opset", type=int_arg, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--builder", choices=["genai"], help="build with onnxruntime-genai's model builder (fused GQA/"
                   "skip-norm graph + genai_config.json; always with KV cache) instead of Optimum; needs the [genai] extra")
    p.add_argument("--precision", default="fp32", help="--builder genai: int4, fp16 (cuda) or fp32 (default)")
    p.add_argument("--execution-provider", default="cpu", help="--builder genai: cpu (default) or cuda")
    p.add_argument("--builder-option", action="append", metavar="KEY=VALUE",
                   help="--builder genai: an extra builder option, e.g. int4_algo_config=k_quant_mixed (repeatable)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("rewrite", help="wrap a block range in an ONNX Loop",
                       description="Re-apply blocks S..E-1 N times inside an ONNX Loop with a regularizer (formulas in docs/rewrite.md).")
    p.add_argument("model", help="the .onnx file of an export")
    add_spec_args(p)
    add_form_args(p)
    p.add_argument("-o", "--output", help="output .onnx (default: next to the input, e.g. model.loop10-20x3-uniform.onnx), or a folder "
                                          "(ending in / or existing): a runnable folder for Optimum and onnxruntime-genai")
    p.add_argument("--force", action="store_true", help="replace an existing output file or a non-empty output folder (refused without it)")
    p.add_argument("--copy-weights", action="store_true", help="copy external weight files when writing to another folder")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("verify", help="check a looped graph against the PyTorch reference",
                       description="Compare the looped ONNX graph in ORT with an independent PyTorch looped model, "
                                   "and check that N = 1 is bit-exact to the original.")
    p.add_argument("model", help="a looped .onnx written by loopgraph rewrite")
    p.add_argument("--reference", help="HF checkpoint folder or smollm2-135m (default: from the export's loopgraph.json)")
    p.add_argument("--original", help="the original .onnx for the N = 1 check (default: the one the file records, if it is "
                                      "confined and its digest matches; see docs/safety.md)")
    p.add_argument("--prompts", nargs="+", help="prompts to run as one left-padded batch (default: a fixed set)")
    p.add_argument("--atol", type=finite_float, default=1e-5, help="absolute part of the bound (default 1e-5)")
    p.add_argument("--rtol", type=finite_float, default=1e-3, help="part of max|reference logits| added to the bound (default 1e-3)")
    add_runtime_args(p, session_options=False)
    p.set_defaults(func=cmd_verify)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, while the block runs (on the main thread, where
    handlers live); the previous handler comes back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with sigterm_interrupts():
            return args.func(args)
    except LoopgraphError as e:
        if args.debug:
            raise
        print(f"loopgraph: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # a write the user can fix (full disk, read-only folder, permissions) surfacing from a library
        # (Optimum's exporter, matplotlib...) rather than from onnxio's atomic writes; other OSErrors are bugs
        if args.debug or e.errno not in WRITE_ERRNOS:
            raise
        print(f"loopgraph: error: {e.filename or 'a file'}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)}); "
              "free space, fix the permissions or choose another output path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loopgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
