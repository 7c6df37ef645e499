"""``loopgraph verify``: the looped graph in ONNX Runtime against the PyTorch reference
(:mod:`loopgraph.reference.looped`), plus the N = 1 bit-exactness check against the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.metadata import BLOCKS_KEY, props
from loopgraph.onnxio import load_model, resolve_model_path, temp_name
from loopgraph.provenance import original_of
from loopgraph.spec import METADATA_KEY, LoopSpec

DEFAULT_PROMPTS: tuple[tuple[str, ...], ...] = (
    ("The capital of France is",),
    ("def fibonacci(n):\n    ",),
    ("Hello!", "In a distant galaxy, a small robot learned to"),  # a batch of 2, left padded
)


@dataclasses.dataclass
class Comparison:
    label: str
    max_abs: float
    max_rel: float  # max_abs / max |reference logits|
    argmax_agree: float  # fraction of valid positions with the same argmax
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.bound


@dataclasses.dataclass
class VerifyReport:
    spec: LoopSpec
    provider: str
    comparisons: list[Comparison]
    n1_max_abs: float | None  # N = 1 rewrite vs original (must be 0.0)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons) and self.n1_max_abs in (None, 0.0)


def read_spec(model: onnx.ModelProto, path: Path) -> LoopSpec:
    from loopgraph.metadata import read_spec as read_record
    spec = read_record(model)
    if spec is None:
        raise LoopgraphError(f"{path} is not a loopgraph output (no {METADATA_KEY} metadata); run loopgraph rewrite first")
    return spec


def _embedding_rows(model: onnx.ModelProto) -> int | None:
    """Rows of the token embedding: the initializer a Gather on ``input_ids`` reads."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids" and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def check_reference(hf, model: onnx.ModelProto, path: Path, ref: str | os.PathLike, spec: LoopSpec) -> None:
    """The reference must be the model the file was exported from, as far as the graph tells:
    the vocabulary (logits width), the block count recorded at rewrite time, and the hidden size
    where the graph states them. A checkpoint of another model would otherwise fail deep in
    PyTorch (an embedding index out of range) or compare unrelated logits."""
    cfg = hf.config
    logits = next((o for o in model.graph.output if o.name == "logits"), None)
    if logits is None or not {"input_ids", "attention_mask"} <= {i.name for i in model.graph.input}:
        raise LoopgraphError(f"{path} is not a causal LM export (needs inputs input_ids, attention_mask and output logits); "
                             "verify a loopgraph rewrite of an export")
    dims = logits.type.tensor_type.shape.dim
    vocab = dims[-1].dim_value if len(dims) and dims[-1].HasField("dim_value") else _embedding_rows(model)
    blocks = props(model).get(BLOCKS_KEY)
    layers = getattr(cfg, "num_hidden_layers", None)
    for what, graph_says, ref_says in (("vocabulary size", vocab, getattr(cfg, "vocab_size", None)),
                                       ("block count", int(blocks) if blocks and blocks.isdigit() else None, layers)):
        if graph_says is not None and ref_says is not None and graph_says != ref_says:
            raise LoopgraphError(f"--reference {ref} is not the model {path} was exported from: its {what} is {ref_says}, "
                                 f"the graph's is {graph_says}; pass the checkpoint the export was made from")
    if layers is not None and spec.end is not None and spec.end > layers:
        raise LoopgraphError(f"--reference {ref} has {layers} layers but {path} loops blocks {spec.start}:{spec.end}; "
                             "pass the checkpoint the export was made from")


def encode(folder: Path, texts: Sequence[str], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids and mask. Uses the export's tokenizer.json (the ``tokenizers``
    library, no transformers); without one, a deterministic id sequence per text."""
    tok_file = folder / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_file))
        seqs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    else:
        seqs = [list(np.random.default_rng(len(t)).integers(0, vocab_size, max(2, len(t) // 3))) for t in texts]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def feeds_for(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}


def compare(label: str, got: np.ndarray, ref: np.ndarray, mask: np.ndarray, atol: float, rtol: float) -> Comparison:
    valid = mask.astype(bool)
    g, r = got[valid], ref[valid]
    max_abs = float(np.abs(g - r).max())
    scale = float(np.abs(r).max())
    agree = float((g.argmax(-1) == r.argmax(-1)).mean())
    return Comparison(label, max_abs, max_abs / scale if scale else 0.0, agree, atol + rtol * scale)


def load_reference(ref: str | os.PathLike):
    """The HF model to compare against: a checkpoint folder or the built-in name."""
    import torch
    from transformers import AutoModelForCausalLM

    from loopgraph.exporters.export import BUILTIN, builtin_gguf
    torch.set_grad_enabled(False)
    if str(ref) in BUILTIN:
        gguf = builtin_gguf(str(ref))
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    p = Path(ref)
    if not (p / "config.json").is_file():
        raise LoopgraphError(f"--reference {ref}: not a Hugging Face checkpoint folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, attn_implementation="eager").eval()


def verify(looped: str | os.PathLike, reference: str | os.PathLike | None = None,
           prompts: Sequence[Sequence[str]] = DEFAULT_PROMPTS, *, atol: float = 1e-5, rtol: float = 1e-3,
           device: str = "cpu", check_n1: bool = True, original: str | os.PathLike | None = None,
           say: Callable[[str], None] = print) -> VerifyReport:
    """Compare ``looped`` in ORT with the PyTorch reference on ``prompts``, and (``check_n1``)
    its N = 1 rewrite with the original. Refused: a file that is no loopgraph rewrite or not
    readable, a reference of another model (:func:`check_reference`), a recorded original that
    is not confined or not the original (:func:`loopgraph.provenance.original_of`); ``original``
    overrides the recorded one."""
    from loopgraph.exporters.export import reference_dir
    from loopgraph.reference.looped import reference_logits
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.session import open_session

    path = resolve_model_path(looped)
    header = load_model(path)  # a truncated or damaged file is a one-line error
    spec = read_spec(header, path)
    source = original_of(path, header, original, missing_ok=True) if check_n1 else None
    ref_dir = reference or reference_dir(path.parent)
    if ref_dir is None:
        raise LoopgraphError(f"no reference model known for {path} (no loopgraph.json manifest with one); "
                             "pass --reference HF_DIR or --reference smollm2-135m")
    say(f"reference: {ref_dir}")
    hf = load_reference(ref_dir)
    check_reference(hf, header, path, ref_dir, spec)
    del header
    session = open_session(path, device=device)
    say(f"looped model on {session.providers[0]}: {spec.slug()}")

    comparisons = []
    batches = [(", ".join(repr(t[:24]) for t in group), *encode(path.parent, group, hf.config.vocab_size)) for group in prompts]
    for label, ids, mask in batches:
        got = session.run(feeds_for(ids, mask), ["logits"])["logits"]
        ref = reference_logits(hf, spec, ids, mask).numpy()
        comparisons.append(compare(label, got, ref, mask, atol, rtol))

    n1 = None
    if check_n1 and source is None:
        say(f"N = 1 check skipped: the original of {path} is not recorded or not there (pass --original PATH)")
    if check_n1 and source is not None:
        one = dataclasses.replace(spec, iters=1, dynamic=False)
        tmp = temp_name(path.parent / "verify-n1.onnx", ".onnx")  # named as ours: a kill -9 leftover is cleaned later
        try:
            rewrite(source, one, output=tmp)
            s1, s0 = open_session(tmp, device=device), open_session(source, device=device)
            n1 = max(float(np.abs(s1.run(feeds_for(i, m), ["logits"])["logits"] - s0.run(feeds_for(i, m), ["logits"])["logits"]).max())
                     for _, i, m in batches)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return VerifyReport(spec, session.providers[0], comparisons, n1)


def format_report(r: VerifyReport) -> str:
    lines = [f"spec: {json.loads(r.spec.to_json())}", f"provider: {r.provider}",
             f"{'prompt':<52} {'max|Δ|':>10} {'rel':>10} {'argmax':>7} {'bound':>10}  ok"]
    for c in r.comparisons:
        lines.append(f"{c.label[:52]:<52} {c.max_abs:>10.3g} {c.max_rel:>10.3g} {c.argmax_agree:>7.1%} {c.bound:>10.3g}  {'yes' if c.ok else 'NO'}")
    if r.n1_max_abs is not None:
        lines.append(f"N = 1 rewrite vs original: max|Δlogits| = {r.n1_max_abs} ({'bit-exact' if r.n1_max_abs == 0.0 else 'NOT bit-exact'})")
    lines.append("PASS" if r.ok else "FAIL")
    return "\n".join(lines)
