"""A runnable folder: ``rewrite -o out/looped/`` writes everything the stock drivers need beside
``model.onnx``, so the looped model runs with no loopgraph code at run time::

    ORTModelForCausalLM.from_pretrained("out/looped/")   # Optimum
    onnxruntime_genai.Model("out/looped/")               # onnxruntime-genai

The folder holds:

- ``model.onnx`` (+ its external data, by the rewrite's rules: ``--copy-weights``);
- ``config.json``: the export's, with the layer count (``num_hidden_layers``, GPT-2's ``n_layer``)
  set to V = L + (N - 1)(E - S), the number of cache pairs of the standard layout (onnxruntime-genai's
  cache classes size themselves from it; Optimum reads the pairs from the session), and the
  original count kept under ``loopgraph_original_num_hidden_layers``; ``use_cache`` says whether
  the file has a KV cache the drivers can feed (rank-4 pairs);
- the tokenizer files and ``generation_config.json`` of the export;
- ``loopgraph.json``: the export's manifest (its reference made absolute, so ``verify`` still
  finds the checkpoint) plus the rewrite (spec, V, the virtual-layer map);
- ``genai_config.json`` (:func:`genai_config`; for a model-builder export its own, with V layers:
  :func:`looped_genai_config`) when the file has rank-4 caches: onnxruntime-genai
  generates wrong tokens from a file without a cache (a genai limit, the original export too), and
  cannot feed the rank-5 ``--kv stacked`` caches.

Refused, before anything is written: an existing non-empty folder without ``force``; an export
without config.json or without a tokenizer (the drivers load both from the folder). The folder is
built in a temporary sibling and moved into place when complete, so a failure leaves nothing
half-written and a replaced folder is never mixed with the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.naming import PAST_PREFIX
from loopgraph.passes.kv import virtual_layers

MANIFEST = "loopgraph.json"
GENAI_CONFIG = "genai_config.json"
ORIGINAL_LAYERS_KEY = "loopgraph_original_num_hidden_layers"
#: tokenizer files an export may hold (Optimum copies the checkpoint's); tokenizer.json is required
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja")
PASSED_THROUGH = ("generation_config.json",)


def is_folder_output(output: str | os.PathLike | None) -> bool:
    """``-o`` names a folder: it ends in a path separator, or it is an existing folder."""
    if output is None:
        return False
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def check_folder_target(src: Path, out: Path, force: bool) -> None:
    """Preconditions of a folder output (nothing is written when one fails)."""
    if out.exists() and not out.is_dir():
        raise LoopgraphError(f"-o {out}/ names a folder but {out} is a file; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoopgraphError(f"output folder {out} exists and is not empty; choose another -o or pass --force to replace it")
    if out.resolve() == src.parent.resolve():
        raise LoopgraphError(f"output folder {out} is the export's own folder; choose another -o (the export is never overwritten)")
    if not (src.parent / "config.json").is_file():
        raise LoopgraphError(f"{src.parent} has no config.json beside {src.name}; a runnable folder needs the export's config "
                             "(loopgraph export writes it), or write a file with -o NAME.onnx")
    if not (src.parent / "tokenizer.json").is_file():
        raise LoopgraphError(f"{src.parent} has no tokenizer (tokenizer.json) beside {src.name}; Optimum and onnxruntime-genai load "
                             "it from the folder: re-export with loopgraph export, or write a file with -o NAME.onnx")


def write_folder(src: Path, out: Path, force: bool, rewrite_file: Callable[[Path], Any]) -> Any:
    """Build the folder in a temporary sibling: ``rewrite_file(staging / "model.onnx")`` writes the
    model (returns the rewrite's result, with ``.spec`` and ``.blocks``), then the side files;
    move it into place. Returns the rewrite result with ``path`` pointing into ``out``."""
    check_folder_target(src, out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        try:
            result = rewrite_file(staging / "model.onnx")
        except LoopgraphError as e:  # messages name the output's folder, not the staging one
            raise LoopgraphError(str(e).replace(str(staging), str(out))) from None
        write_side_files(src.parent, staging, onnx.load(str(staging / "model.onnx"), load_external_data=False),
                         len(result.blocks), result.spec)
        staging.chmod(0o755)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.path = out / "model.onnx"
    return result


def _replace(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an old folder is renamed aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_layout(model: onnx.ModelProto) -> str:
    """``none`` (no cache inputs), ``rank4`` (ordinary pairs: standard, first/last) or ``stacked``."""
    ranks = {len(v.type.tensor_type.shape.dim) for v in model.graph.input if v.name.startswith(PAST_PREFIX)}
    if not ranks:
        return "none"
    return "rank4" if ranks == {4} else "stacked"


def cache_pairs(model: onnx.ModelProto) -> int:
    """Number of ``past_key_values.{v}.key`` inputs."""
    return sum(1 for v in model.graph.input if v.name.startswith(PAST_PREFIX) and v.name.endswith(".key"))


def write_side_files(export_dir: Path, folder: Path, model: onnx.ModelProto, num_blocks: int, spec) -> None:
    """config.json, tokenizer, generation_config.json, loopgraph.json and genai_config.json."""
    layout = cache_layout(model)
    config = json.loads((export_dir / "config.json").read_text())
    vmap = virtual_layers(num_blocks, spec.start, spec.end, spec.iters)
    config.update(looped_config(config, vmap, layout))
    _write_json(folder / "config.json", config)
    for name in (*TOKENIZER_FILES, *PASSED_THROUGH):
        if (export_dir / name).is_file():
            shutil.copyfile(export_dir / name, folder / name)
    manifest = _read_json(export_dir / MANIFEST) or {}
    ref = manifest.get("reference")
    if ref and not Path(ref).is_absolute():  # relative to the export (e.g. "hf" for a GGUF source)
        manifest["reference"] = str((export_dir / ref).resolve())
    manifest["rewrite"] = {"spec": json.loads(spec.to_json()), "export": str(export_dir.resolve()), "virtual_layers": len(vmap),
                           "original_layers": num_blocks, "kv_layout": layout, "virtual_layer_map": [list(e) for e in vmap]}
    _write_json(folder / MANIFEST, manifest)
    if layout == "rank4":
        own = _read_json(export_dir / GENAI_CONFIG)
        if own is not None:  # an onnxruntime-genai model-builder export: keep its config, set the pair count
            _write_json(folder / GENAI_CONFIG, looped_genai_config(own, cache_pairs(model)))
        else:
            generation = _read_json(export_dir / "generation_config.json") or {}
            _write_json(folder / GENAI_CONFIG, genai_config(config, generation, cache_pairs(model)))


def looped_config(config: dict[str, Any], vmap: list[tuple[int, int]], layout: str) -> dict[str, Any]:
    """The keys of config.json a looped folder changes: the layer count (V), ``use_cache``, and
    per-layer lists (``layer_types`` of Qwen2/Gemma2...: transformers checks their length against
    the layer count) expanded to one entry per virtual layer, the entry of its block."""
    key = "n_layer" if "n_layer" in config else "num_hidden_layers"
    blocks = config.get(key)
    changed: dict[str, Any] = {key: len(vmap), ORIGINAL_LAYERS_KEY: blocks, "use_cache": layout == "rank4"}
    for name, value in config.items():
        if isinstance(value, list) and len(value) == blocks and name.startswith("layer_"):
            changed[name] = [value[b] for b, _ in vmap]
    return changed


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def genai_config(config: dict[str, Any], generation: dict[str, Any], pairs: int) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` (0.11.x schema) for a decoder with ``pairs``
    ordinary cache pairs named like Optimum's export (``%d`` = v, contiguous 0..V-1).

    ``past_present_share_buffer`` is off: the exported attention concatenates past and new keys
    (a present longer than the past), it does not write into a preallocated buffer."""
    heads = config.get("num_attention_heads", config.get("n_head"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_dim") or hidden // heads
    context = config.get("max_position_embeddings", config.get("n_positions"))
    eos = _ids(generation.get("eos_token_id", config.get("eos_token_id")))
    bos = _ids(generation.get("bos_token_id", config.get("bos_token_id")))
    pad = _ids(generation.get("pad_token_id", config.get("pad_token_id"))) or eos
    if not eos:
        raise LoopgraphError("the export's config.json and generation_config.json give no eos_token_id; "
                             "onnxruntime-genai needs one to stop: add it to config.json and rewrite again")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": int(head_size), "hidden_size": int(hidden),
        "num_attention_heads": int(heads), "num_key_value_heads": int(kv_heads), "num_hidden_layers": pairs,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    model = {"bos_token_id": bos[0] if bos else eos[0], "context_length": int(context), "decoder": decoder,
             "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": pad[0],
             "type": genai_type(config.get("model_type")), "vocab_size": int(config["vocab_size"])}
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": int(context), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def looped_genai_config(own: dict[str, Any], pairs: int) -> dict[str, Any]:
    """The export's own ``genai_config.json`` (the model builder's) for the looped file: the decoder's
    ``num_hidden_layers`` set to the number of cache pairs V; everything else (the ``%d`` name templates,
    head sizes, the builder's inputs without ``position_ids``, ``past_present_share_buffer``) is kept, since
    the looped file keeps the builder's inputs, outputs and cache tensors, only more of them."""
    out = json.loads(json.dumps(own))
    decoder = out.get("model", {}).get("decoder")
    if not isinstance(decoder, dict) or "num_hidden_layers" not in decoder:
        raise LoopgraphError(f"the export's {GENAI_CONFIG} has no model.decoder.num_hidden_layers; "
                             "re-export with loopgraph export --builder genai")
    decoder["num_hidden_layers"] = pairs
    return out


def genai_type(model_type: str | None) -> str:
    """The model class onnxruntime-genai should use. Its ``gpt2`` class expects the combined
    ``past_%d`` cache of old GPT-2 exports; Optimum's GPT-2 export has separate key/value pairs
    like every other decoder, which genai's generic decoder class (type ``llama``) drives."""
    return "llama" if model_type in (None, "gpt2") else model_type


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
