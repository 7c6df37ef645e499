"""``loopgraph verify``: the looped graph in ONNX Runtime against the PyTorch reference
(:mod:`loopgraph.reference.looped`), plus the N = 1 bit-exactness check against the original.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from loopgraph.errors import LoopgraphError
from loopgraph.onnxio import resolve_model_path
from loopgraph.rewrite import SOURCE_KEY
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
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        raise LoopgraphError(f"{path} is not a loopgraph output (no {METADATA_KEY} metadata); run loopgraph rewrite first")
    return LoopSpec.from_json(meta[METADATA_KEY])


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


def run_logits(session, folder: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of a prompt batch; a with-past file gets zero-length pasts in its own layout (standard,
    stacked or first/last: :class:`loopgraph.runtime.generate.CausalLM` reads it from the session)."""
    feeds = feeds_for(ids, mask)
    if any(name.startswith("past_key_values.") for name in session.inputs):
        from loopgraph.runtime.generate import open_lm
        feeds.update(open_lm(session, folder).initial_past(len(ids)))
    return session.run(feeds, ["logits"])["logits"]


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
           device: str = "cpu", check_n1: bool = True, say: Callable[[str], None] = print) -> VerifyReport:
    from loopgraph.exporters.export import reference_dir
    from loopgraph.reference.looped import reference_logits
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.session import open_session

    path = resolve_model_path(looped)
    header = onnx.load(str(path), load_external_data=False)
    spec = read_spec(header, path)
    meta = {p.key: p.value for p in header.metadata_props}
    del header
    ref_dir = reference or reference_dir(path.parent)
    if ref_dir is None:
        raise LoopgraphError(f"no reference model known for {path} (no loopgraph.json manifest with one); "
                             "pass --reference HF_DIR or --reference smollm2-135m")
    say(f"reference: {ref_dir}")
    hf = load_reference(ref_dir)
    session = open_session(path, device=device)
    say(f"looped model on {session.providers[0]}: {spec.slug()}")

    comparisons = []
    batches = [(", ".join(repr(t[:24]) for t in group), *encode(path.parent, group, hf.config.vocab_size)) for group in prompts]
    for label, ids, mask in batches:
        got = run_logits(session, path.parent, ids, mask)
        ref = reference_logits(hf, spec, ids, mask).numpy()
        comparisons.append(compare(label, got, ref, mask, atol, rtol))

    n1 = None
    original = path.parent / meta[SOURCE_KEY] if SOURCE_KEY in meta else None
    if check_n1 and original is not None and original.is_file():
        one = dataclasses.replace(spec, iters=1, dynamic=False)
        fd, tmp = tempfile.mkstemp(prefix=".verify-n1.", suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            rewrite(original, one, output=tmp)
            s1, s0 = open_session(tmp, device=device), open_session(original, device=device)
            n1 = max(float(np.abs(run_logits(s1, path.parent, i, m) - run_logits(s0, original.parent, i, m)).max()) for _, i, m in batches)
        finally:
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
