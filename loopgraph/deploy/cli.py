"""The inspection tools ``inspect``, ``check``, ``diff`` and ``view``, and the precision tools ``quantize`` and
``optimize`` (registered through ``loopgraph.cli.COMMAND_MODULES``).

Imports here are light (argparse only); each command imports its module when it runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

TARGETS = ("tensorrt",)


def cmd_inspect(args: argparse.Namespace) -> int:
    from loopgraph.deploy.describe import describe, format_text
    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from loopgraph.deploy.tensorrt import check_tensorrt, format_findings, is_ready
    from loopgraph.onnxio import load_model, resolve_model_path
    findings = check_tensorrt(load_model(resolve_model_path(args.model)))
    if args.json:
        print(json.dumps({"model": str(args.model), "target": args.target, "ready": is_ready(findings),
                          "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        print(format_findings(findings, str(args.model)))
    return 0 if is_ready(findings) else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from loopgraph.deploy.diff import diff_files
    d = diff_files(args.a, args.b)
    print(json.dumps(d.to_dict(), indent=2) if args.json else d.format_text())
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    if args.png:
        from loopgraph.deploy.view import render_png
        from loopgraph.onnxio import check_output, load_model, resolve_model_path
        check_output(args.png, force=args.force, what="--png")
        out = render_png([(str(p), load_model(resolve_model_path(p))) for p in args.models], args.png)
        print(f"wrote {out}")
        return 0
    from loopgraph.deploy.view import netron_servers
    with netron_servers(args.models, port=args.port, browse=not args.no_browser) as urls:
        for path, url in zip(args.models, urls):
            print(f"{path}: {url}")
        print("serving with Netron on loopback; press Ctrl-C to stop", file=sys.stderr)
        sys.stdout.flush()
        # a parent that ignores SIGINT (a background job of a script, a test runner) passes that on; Ctrl-C must still stop us
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # kill PID / a closed terminal: unwind too, so netron_servers stops the servers instead of orphaning them
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
        except _Stopped as e:
            print(f"stopped ({signal.Signals(e.signum).name})", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from loopgraph.deploy.quantize import quantize_file
    report = quantize_file(args.model, args.output, args.to, block_size=args.block_size,
                           accuracy_level=args.accuracy_level, force=args.force)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from loopgraph.deploy.optimize import optimize_file
    report = optimize_file(args.model, args.output, level=args.level, device=args.device, force=args.force)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _precision_commands(sub: argparse._SubParsersAction) -> None:
    from loopgraph.cliargs import add_output_args, int_arg
    p = sub.add_parser("quantize", help="int4 / int8 / fp16 copy of a model (Loop bodies included) with ONNX Runtime's tools",
                       description="Quantize every MatMul with a constant weight, in the main graph and in Loop bodies, each "
                                   "weight once: int4 (MatMulNBits), int8 (dynamic), fp16 (inputs/outputs stay fp32).")
    p.add_argument("model", help="an .onnx file or an export folder (original, looped or unrolled)")
    p.add_argument("--to", required=True, help="int4, int8 or fp16")
    add_output_args(p, "output .onnx", required=True)
    p.add_argument("--block-size", type=int_arg, default=32, help="int4 block size along K (power of 2, >= 16; default 32)")
    p.add_argument("--accuracy-level", type=int_arg,
                   help="int4 MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (default 4, the genai builder's on CPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("optimize", help="save ONNX Runtime's optimized graph as a file that reloads (Loop-safe)",
                       description="Run ONNX Runtime's session-level graph optimizer and save the result, repairing what makes "
                                   "a looped file invalid (names repeated across the main graph and a Loop body).")
    p.add_argument("model", help="an .onnx file or an export folder")
    add_output_args(p, "output .onnx", required=True)
    p.add_argument("--level", default="extended", choices=("basic", "extended", "all"),
                   help="ORT graph optimization level (default extended: 'all' adds layout changes tied to this machine's EP)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="execution provider the file is optimized for")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_optimize)


class _Stopped(BaseException):
    """Raised by the SIGTERM/SIGHUP handler of ``view`` (a BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    raise _Stopped(signum)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe an ONNX model and its decoder blocks",
                       description="Print opset, inputs/outputs, external data, KV cache, decoder blocks and any loopgraph rewrite. "
                                   "Never loads external weights.")
    p.add_argument("model", help="an .onnx file or an export folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check", help="check that a graph meets a deployment target's constraints",
                       description="Report whether a (looped) ONNX graph meets TensorRT's ONNX Loop constraints: a counted loop "
                                   "with M, no data-dependent condition, carried tensors of one shape, static scan-output length, "
                                   "supported data types and operators. Exit code 1 when a blocking finding (error) exists.")
    p.add_argument("model", help="an .onnx file or an export folder")
    p.add_argument("--target", default="tensorrt", choices=TARGETS, help="deployment target (default tensorrt)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("diff", help="summarize what changed between two ONNX graphs",
                       description="A Loop-aware summary: blocks moved into a Loop (range, N, regularizer), nodes added by kind, "
                                   "inputs/outputs, initializers (bytes), weight duplication, metadata. Never loads external weights.")
    p.add_argument("a", help="the first .onnx (e.g. the original export)")
    p.add_argument("b", help="the second .onnx (e.g. its rewrite)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("view", help="open models in Netron, or draw their block structure as a PNG",
                       description="Serve each model with Netron on 127.0.0.1 (one port each) until Ctrl-C; or, with --png, write "
                                   "a compact picture of the block structure (the Loop as a frame with N and the regularizer).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="one or more .onnx files (or export folders)")
    p.add_argument("--png", metavar="OUT.png", help="write the block-structure picture instead of starting Netron (needs graphviz)")
    p.add_argument("--force", action="store_true", help="with --png: replace an existing picture")
    p.add_argument("--port", type=int, default=0, help="first port (default: a free port per model)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    p.set_defaults(func=cmd_view)
    _precision_commands(sub)
