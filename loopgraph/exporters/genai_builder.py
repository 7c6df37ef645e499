"""``loopgraph export --builder genai``: an HF checkpoint folder to onnxruntime-genai's model builder graph.

The model builder (``onnxruntime_genai.models.builder.create_model``, onnxruntime-genai 0.11.4, the
``genai`` extra) writes the fused graph deployments run: ``GroupQueryAttention``,
``SkipSimplifiedLayerNormalization`` (the residual Add fused with the next norm),
``RotaryEmbedding`` and, at int4, ``MatMulNBits``; beside it ``genai_config.json`` and the tokenizer.
It runs offline here: the input is a local folder and Hugging Face authentication is off.

Builder options (``extra_options``: ``int4_algo_config``, ``int4_block_size``, ``int4_accuracy_level``, ...)
pass through as ``KEY=VALUE`` strings. SmolLM2-135M at the default int4 (RTN, block 32, int8 activations)
no longer answers "Paris" to "The capital of France is" (it says " approximately 315 kilometres"); with
``int4_algo_config=k_quant_mixed`` (int4 + int8 k-quant) it does (measured; docs/builder.md).

Handled: precisions ``int4`` and ``fp32`` for the CPU execution provider, ``int4``, ``fp16`` and
``fp32`` for CUDA. Refused (one-line error): any other pair (the builder writes fp16 I/O with
CUDA-only kernels in mind; ``bf16`` is a CUDA-only precision), and an architecture the builder does
not know.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from loopgraph.errors import LoopgraphError

PRECISIONS = ("int4", "fp16", "fp32")
PROVIDERS = ("cpu", "cuda")
#: (precision, execution provider) pairs the builder writes and ONNX Runtime runs
SUPPORTED = {"cpu": ("int4", "fp32"), "cuda": ("int4", "fp16", "fp32")}
INSTALL_HINT = "pip install 'loopgraph[genai]' (onnxruntime-genai==0.11.4, onnx-ir)"


def check_options(precision: str, execution_provider: str) -> None:
    """Refuse a precision/provider pair the builder does not support (before anything is loaded)."""
    if execution_provider not in PROVIDERS:
        raise LoopgraphError(f"--execution-provider {execution_provider} is not supported by --builder genai; "
                             f"use one of {', '.join(PROVIDERS)}")
    if precision not in PRECISIONS:
        raise LoopgraphError(f"--precision {precision} is not supported by --builder genai; use one of {', '.join(PRECISIONS)}")
    if precision not in SUPPORTED[execution_provider]:
        ok = ", ".join(SUPPORTED[execution_provider])
        raise LoopgraphError(f"--precision {precision} is a CUDA precision of the model builder and is not supported "
                             f"with --execution-provider {execution_provider}; use --precision {ok} "
                             f"(or --execution-provider cuda)")


def parse_options(items: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` builder options (``--builder-option int4_algo_config=k_quant_mixed``), passed to the builder as is."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoopgraphError(f"--builder-option {item!r} is not KEY=VALUE (e.g. int4_algo_config=k_quant_mixed)")
        if key.strip() in ("hf_token", "hf_remote", "filename", "config_only"):
            raise LoopgraphError(f"--builder-option {key.strip()} is set by loopgraph (offline, model.onnx); leave it out")
        out[key.strip()] = value.strip()
    return out


def build(hf_dir: Path, out: Path, precision: str, execution_provider: str, say: Callable[[str], None],
          options: dict[str, str] | None = None) -> None:
    """Run the model builder on ``hf_dir``, writing ``out/model.onnx`` (+ ``model.onnx.data``),
    ``genai_config.json`` and the tokenizer files; config.json and generation_config.json are copied
    too (the reference, ``verify`` and the runnable-folder writer read them)."""
    check_options(precision, execution_provider)
    try:
        from onnxruntime_genai.models.builder import create_model
    except ImportError as e:
        raise LoopgraphError(f"--builder genai needs onnxruntime-genai's model builder ({e}); install it with: {INSTALL_HINT}") from None
    cache = out / ".builder-cache"
    log = io.StringIO()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach the hub
    try:
        # the builder prints every layer it writes and a progress bar per weight
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            create_model("", str(hf_dir), str(out), precision, execution_provider, str(cache),
                         **(options or {}), hf_token="false", hf_remote="false")
    except (NotImplementedError, ValueError) as e:
        raise LoopgraphError(f"the model builder cannot build {hf_dir}: {str(e).splitlines()[0]}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file() and not (out / name).exists():
            shutil.copyfile(hf_dir / name, out / name)
    if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"the model builder wrote no model.onnx/genai_config.json into {out}:\n{log.getvalue()[-2000:]}")
    say(f"      model builder: {precision}, {execution_provider}{''.join(f', {k}={v}' for k, v in (options or {}).items())}")
