#!/usr/bin/env python
"""Build a TensorRT engine from looped ONNX files, run it, and compare the logits with ORT CPU.

Not a test: it needs an NVIDIA GPU, the ``tensorrt`` package and a CUDA memory API (``cuda-python``,
or a CUDA build of torch). Without ``tensorrt`` it prints "tensorrt not available: skipped" and
exits 0. Make the inputs with loopgraph first, e.g.::

    loopgraph rewrite TINY/model.onnx --range 1:3 --iters 3 -o /tmp/tiny-looped.onnx
    loopgraph export smollm2-135m -o out/smollm2
    loopgraph rewrite out/smollm2/model.onnx --range 10:20 --iters 3 -o out/smollm2/looped.onnx
    loopgraph export smollm2-135m -o out/smollm2-past --with-past
    loopgraph rewrite out/smollm2-past/model.onnx --range 10:20 --iters 3 --kv first -o out/smollm2-past/looped-kv-first.onnx
    python benchmarks/trt_engine_check.py /tmp/tiny-looped.onnx out/smollm2/looped.onnx out/smollm2-past/looped-kv-first.onnx

For each model it prints loopgraph's TensorRT readiness, the parse and build times (one
optimization profile: dynamic dims from 1 to --max-batch / --max-len, optimum at the fed shape),
the mean run time, and max |Δlogits| against ONNX Runtime on CPU with the same inputs (random
token ids, full attention mask, positions after a past of --past tokens, small random past KV).
Pass: max |Δ| <= atol + rtol * max|ORT logits| (TF32 is off unless --tf32; --fp16 loosens rtol).
Exit code: 0 all passed (or skipped), 1 a mismatch, 2 a parse/build/run failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def say(msg: str) -> None:
    print(msg, flush=True)


# --- inputs ------------------------------------------------------------------------------------------------

def dim_value(sym: str, args: argparse.Namespace) -> int:
    """Size of a symbolic dim from its name (Optimum's names: batch_size, sequence_length, past_sequence_length)."""
    if sym in args.dim:
        return args.dim[sym]
    s = sym.replace(" ", "")
    if "batch" in s:
        return args.batch
    if "past" in s and "+" in s:
        return args.past + args.seq
    if "past" in s:
        return args.past
    if "seq" in s or "total" in s:
        return args.seq
    raise SystemExit(f"cannot size dim {sym!r}; pass --dim '{sym}=VALUE'")


def make_feeds(model: onnx.ModelProto, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """A value for every graph input and, per input, its ONNX dims. Inputs with a same-named
    initializer (--dynamic's loopgraph/iters, loopgraph/alpha) get that default value."""
    rng = np.random.default_rng(0)
    defaults = {t.name: t for t in model.graph.initializer}
    feeds, dims = {}, {}
    for v in model.graph.input:
        tt = v.type.tensor_type
        d = [x.dim_value if x.HasField("dim_value") else x.dim_param for x in tt.shape.dim]
        shape = [x if isinstance(x, int) else dim_value(x, args) for x in d]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if v.name in defaults:
            arr = onnx.numpy_helper.to_array(defaults[v.name])
        elif v.name == "input_ids":
            arr = rng.integers(3, 100, shape)
        elif v.name == "attention_mask":
            arr = np.ones(shape)
        elif v.name == "position_ids":
            arr = np.broadcast_to(np.arange(args.past, args.past + shape[-1]), shape)
        elif np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape) * 0.1
        else:
            raise SystemExit(f"do not know how to feed input {v.name} ({dtype}); extend make_feeds")
        feeds[v.name], dims[v.name] = np.array(arr, dtype=dtype, order="C"), d  # 0-d stays 0-d
    return feeds, dims


# --- CUDA memory: cuda-python, else torch ------------------------------------------------------------------

class CudaPython:
    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.ptrs: list = []

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> int:
        ptr = self._ok(self.rt.cudaMalloc(max(nbytes, 1)))
        self.ptrs.append(ptr)
        return int(ptr)

    def to_device(self, host: np.ndarray) -> int:
        ptr = self.alloc(host.nbytes)
        self._ok(self.rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def to_host(self, ptr: int, host: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def stream_handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    def free(self) -> None:
        for p in self.ptrs:
            self.rt.cudaFree(p)
        self.ptrs.clear()


class Torch:
    def __init__(self) -> None:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA")
        self.torch, self.keep = torch, []
        self.stream = torch.cuda.current_stream()  # the stream the copies below run on

    def alloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self.keep.append(t)
        return t.data_ptr()

    def to_device(self, host: np.ndarray) -> int:
        t = self.torch.from_numpy(host.view(np.uint8).reshape(-1).copy()).cuda()
        self.keep.append(t)
        return t.data_ptr()

    def to_host(self, ptr: int, host: np.ndarray) -> None:
        t = next(t for t in self.keep if t.data_ptr() == ptr)
        host.view(np.uint8).reshape(-1)[:] = t.cpu().numpy()[: host.nbytes]

    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def sync(self) -> None:
        self.stream.synchronize()

    def free(self) -> None:
        self.keep.clear()


def cuda_memory():
    for api in (CudaPython, Torch):
        try:
            return api()
        except ImportError:
            continue
    return None


# --- TensorRT ---------------------------------------------------------------------------------------------------

def build_engine(trt, path: Path, feeds: dict, dims: dict, args: argparse.Namespace):
    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x needs it; 10.x ignores it
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(path)):  # reads external data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("ONNX parser failed:\n    " + "\n    ".join(errors))
    say(f"  parsed in {time.perf_counter() - t0:.1f} s: {network.num_layers} layers, "
        f"inputs {[network.get_input(i).name for i in range(network.num_inputs)]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_gb << 30)
    if not args.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if args.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name not in feeds:
            raise RuntimeError(f"the engine wants input {t.name}, which the script does not feed")
        opt = list(feeds[t.name].shape)
        lo, hi = [], []
        for d, sym, v in zip(t.shape, dims[t.name], opt):
            fixed = d >= 0
            big = args.max_batch if isinstance(sym, str) and "batch" in sym else args.max_len * (2 if "+" in str(sym) else 1)
            lo.append(v if fixed else 1)
            hi.append(v if fixed else max(v, big))
        profile.set_shape(t.name, lo, opt, hi)
        say(f"  profile {t.name}: min {lo} opt {opt} max {hi}")
        if t.is_shape_tensor:  # e.g. a trip count fed at run time: TensorRT wants its value range
            values = [int(x) for x in feeds[t.name].reshape(-1)]
            profile.set_shape_input(t.name, values, values, values)
            say(f"  shape-tensor input {t.name} = {values}")
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("engine build failed (see the TensorRT log above)")
    say(f"  built in {time.perf_counter() - t0:.1f} s ({serialized.nbytes / 1e6:.1f} MB engine)")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def run_engine(trt, engine, feeds: dict, mem, repeat: int) -> tuple[dict[str, np.ndarray], float]:
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    for n in inputs:
        context.set_input_shape(n, feeds[n].shape)
        on_host = engine.is_shape_inference_io(n)  # shape-tensor inputs are read from host memory
        context.set_tensor_address(n, feeds[n].ctypes.data if on_host else mem.to_device(feeds[n]))
    outputs, addresses = {}, {}
    for n in names:
        if n in inputs:
            continue
        shape = tuple(context.get_tensor_shape(n))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"output {n} has a data-dependent shape {shape}; this script does not allocate those")
        outputs[n] = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(n)))
        addresses[n] = mem.alloc(outputs[n].nbytes)
        context.set_tensor_address(n, addresses[n])
    if not context.execute_async_v3(mem.stream_handle()):  # warm-up run
        raise RuntimeError("execute_async_v3 failed")
    mem.sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        context.execute_async_v3(mem.stream_handle())
    mem.sync()
    ms = (time.perf_counter() - t0) / repeat * 1e3
    for n, host in outputs.items():
        mem.to_host(addresses[n], host)
    return outputs, ms


def ort_logits(path: Path, feeds: dict) -> tuple[np.ndarray, float]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    t0 = time.perf_counter()
    logits = sess.run(["logits"], {k: v for k, v in feeds.items() if k in wanted})[0]
    return logits, (time.perf_counter() - t0) * 1e3


def check_one(trt, path: Path, mem, args: argparse.Namespace) -> int:
    from loopgraph.deploy.tensorrt import check_tensorrt, summary
    from loopgraph.onnxio import load_model
    say(f"== {path}")
    model = load_model(path)  # graph only, external weights are not read
    say(f"  loopgraph check --target tensorrt: {summary(check_tensorrt(model))}")
    feeds, dims = make_feeds(model, args)
    say("  feeds: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items()))
    try:
        engine = build_engine(trt, path, feeds, dims, args)
    except RuntimeError as e:
        say(f"  FAIL (build): {e}")
        return 2
    if mem is None:
        say("  engine built; no CUDA memory API (pip install cuda-python): run skipped")
        return 0
    try:
        outputs, ms = run_engine(trt, engine, feeds, mem, args.repeat)
    except RuntimeError as e:
        say(f"  FAIL (run): {e}")
        return 2
    finally:
        mem.free()
    ref, ref_ms = ort_logits(path, feeds)
    got = outputs["logits"].astype(np.float32)
    if got.shape != ref.shape:
        say(f"  FAIL: TensorRT logits {got.shape} vs ORT {ref.shape}")
        return 1
    diff = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    bound = args.atol + (args.rtol_fp16 if args.fp16 else args.rtol) * scale
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    ok = diff <= bound
    say(f"  TensorRT {ms:.2f} ms/run (mean of {args.repeat}), ORT CPU {ref_ms:.1f} ms (one run)")
    say(f"  max |Δlogits| = {diff:.3g} (bound {bound:.3g} = atol {args.atol:g} + rtol x max|ref| {scale:.3g}), "
        f"argmax agreement {agree:.1%}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="looped .onnx files written by loopgraph rewrite")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--past", type=int, default=8, help="past length for KV-cache exports")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256, help="profile maximum of sequence/past dims")
    ap.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE", help="size of a symbolic dim the script cannot guess")
    ap.add_argument("--fp16", action="store_true", help="allow FP16 kernels (looser tolerance)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (off by default for a strict fp32 comparison)")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=1e-3, help="fraction of max|ORT logits| added to the bound (fp32)")
    ap.add_argument("--rtol-fp16", type=float, default=5e-2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--workspace-gb", type=int, default=4)
    ap.add_argument("--verbose", action="store_true", help="TensorRT verbose log")
    args = ap.parse_args(argv)
    args.dim = {k: int(v) for k, v in (d.split("=", 1) for d in args.dim)}
    try:
        import tensorrt as trt
    except ImportError:
        say("tensorrt not available: skipped")
        return 0
    mem = cuda_memory()
    say(f"tensorrt {trt.__version__}; CUDA memory via {type(mem).__name__ if mem else 'none'}")
    codes = [check_one(trt, p, mem, args) for p in args.models]
    say(f"== {sum(c == 0 for c in codes)} of {len(codes)} passed")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
