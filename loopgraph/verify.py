"""``loopgraph verify``: the looped graph in ONNX Runtime against the PyTorch reference
(:mod:`loopgraph.reference.looped`), plus the N = 1 bit-exactness check against the original.

Orchestration only: the inputs come from :mod:`loopgraph.runtime.inputs`, the numbers from the
comparator :mod:`loopgraph.runtime.compare`, the reference model from :mod:`loopgraph.reference.hf`.
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
from loopgraph.exportdir import MANIFEST, reference_dir
from loopgraph.metadata import SOURCE_KEY, SPEC_KEY, props, read_spec
from loopgraph.onnxio import resolve_model_path
from loopgraph.runtime.compare import OutputComparison, compare
from loopgraph.runtime.inputs import feeds_for, left_pad
from loopgraph.runtime.tokenizer import TOKENIZER_FILE, TextTokenizer
from loopgraph.spec import LoopSpec

DEFAULT_PROMPTS: tuple[tuple[str, ...], ...] = (
    ("The capital of France is",),
    ("def fibonacci(n):\n    ",),
    ("Hello!", "In a distant galaxy, a small robot learned to"),  # a batch of 2, left padded
)


@dataclasses.dataclass
class PromptCheck:
    """One batch of prompts: the looped graph's logits against the reference's, at real (unpadded) positions."""
    label: str
    logits: OutputComparison
    argmax_agree: float  # fraction of valid positions with the same argmax

    @property
    def ok(self) -> bool:
        return self.logits.ok


@dataclasses.dataclass
class VerifyReport:
    spec: LoopSpec
    provider: str
    comparisons: list[PromptCheck]
    n1_max_abs: float | None  # N = 1 rewrite vs original (must be 0.0)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons) and self.n1_max_abs in (None, 0.0)


def recorded_spec(model: onnx.ModelProto, path: Path) -> LoopSpec:
    """The rewrite's spec; refuses a file that is no loopgraph output."""
    spec = read_spec(model)
    if spec is None:
        raise LoopgraphError(f"{path} is not a loopgraph output (no {SPEC_KEY} metadata); run loopgraph rewrite first")
    return spec


def encode(folder: Path, texts: Sequence[str], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids and mask. Uses the export's tokenizer.json (the ``tokenizers``
    library, no transformers); without one, a deterministic id sequence per text."""
    if (folder / TOKENIZER_FILE).is_file():
        tok = TextTokenizer.from_folder(folder)
        seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    else:
        seqs = [list(np.random.default_rng(len(t)).integers(0, vocab_size, max(2, len(t) // 3))) for t in texts]
    return left_pad(seqs)


def run_logits(session, folder: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of a prompt batch; a with-past file gets zero-length pasts in its own layout (standard,
    stacked or first/last: :class:`loopgraph.runtime.generate.CausalLM` reads it from the session)."""
    feeds = feeds_for(ids, mask)
    if any(name.startswith("past_key_values.") for name in session.inputs):
        from loopgraph.runtime.generate import open_lm
        feeds.update(open_lm(session, folder).initial_past(len(ids)))
    return session.run(feeds, ["logits"])["logits"]


def check_prompts(label: str, got: np.ndarray, ref: np.ndarray, mask: np.ndarray, atol: float, rtol: float,
                  provider: str) -> PromptCheck:
    """``got`` against ``ref`` (logits [batch, seq, vocab]) where ``mask`` is 1."""
    valid = mask.astype(bool)
    logits = compare({"logits": got}, {"logits": ref}, atol=atol, rtol=rtol, provider=provider, valid=valid)["logits"]
    agree = float((got[valid].argmax(-1) == ref[valid].argmax(-1)).mean())
    return PromptCheck(label, logits, agree)


def verify(looped: str | os.PathLike, reference: str | os.PathLike | None = None,
           prompts: Sequence[Sequence[str]] = DEFAULT_PROMPTS, *, atol: float = 1e-5, rtol: float = 1e-3,
           device: str = "cpu", threads: int | None = None, check_n1: bool = True,
           say: Callable[[str], None] = print) -> VerifyReport:
    """Run the looped graph and the PyTorch looped reference on ``prompts`` (each group one
    left-padded batch) and compare their logits; with ``check_n1``, also rewrite the recorded
    original with N = 1 and check it is bit-exact to the original. Refuses a file without a
    rewrite record and a model whose reference checkpoint is unknown."""
    from loopgraph.reference.hf import load_reference
    from loopgraph.reference.looped import reference_logits
    from loopgraph.runtime.session import open_session

    path = resolve_model_path(looped)
    header = onnx.load(str(path), load_external_data=False)
    spec = recorded_spec(header, path)
    source = props(header).get(SOURCE_KEY)
    del header
    ref_dir = reference or reference_dir(path.parent)
    if ref_dir is None:
        raise LoopgraphError(f"no reference model known for {path} (no {MANIFEST} manifest with one); "
                             "pass --reference HF_DIR or --reference smollm2-135m")
    say(f"reference: {ref_dir}")
    hf = load_reference(ref_dir)
    session = open_session(path, device=device, threads=threads)
    provider = session.providers[0]
    say(f"looped model on {provider}: {spec.slug()}")

    comparisons = []
    batches = [(", ".join(repr(t[:24]) for t in group), *encode(path.parent, group, hf.config.vocab_size)) for group in prompts]
    for label, ids, mask in batches:
        got = run_logits(session, path.parent, ids, mask)
        ref = reference_logits(hf, spec, ids, mask).numpy()
        comparisons.append(check_prompts(label, got, ref, mask, atol, rtol, provider))

    original = path.parent / source if source is not None else None
    n1 = None
    if check_n1 and original is not None and original.is_file():
        n1 = n1_max_abs(original, spec, [(ids, mask) for _, ids, mask in batches], device, threads)
    return VerifyReport(spec, provider, comparisons, n1)


def n1_max_abs(original: Path, spec: LoopSpec, batches: Sequence[tuple[np.ndarray, np.ndarray]], device: str = "cpu",
               threads: int | None = None) -> float:
    """The largest |Δlogits| (every position, pads included) between the N = 1 rewrite of
    ``original`` and ``original`` itself: 0.0 when the rewrite is bit-exact, as it must be."""
    from loopgraph.rewrite import rewrite
    from loopgraph.runtime.session import open_session

    one = dataclasses.replace(spec, iters=1, dynamic=False)
    fd, tmp = tempfile.mkstemp(prefix=".verify-n1.", suffix=".onnx", dir=original.parent)
    os.close(fd)
    try:
        rewrite(original, one, output=tmp)
        s1, s0 = (open_session(m, device=device, threads=threads) for m in (tmp, original))
        return max(compare({"logits": run_logits(s1, original.parent, ids, mask)}, {"logits": run_logits(s0, original.parent, ids, mask)},
                           atol=0.0, rtol=0.0, provider=s1.providers[0])["logits"].max_abs for ids, mask in batches)
    finally:
        os.unlink(tmp)


def format_report(r: VerifyReport) -> str:
    """The table of prompt batches (largest and mean |Δ|, relative error, argmax agreement, the
    bound and where the worst logit is: row, position, token id), the N = 1 line and PASS/FAIL."""
    lines = [f"spec: {json.loads(r.spec.to_json())}", f"provider: {r.provider}",
             f"{'prompt':<52} {'max|Δ|':>10} {'mean|Δ|':>10} {'rel':>10} {'argmax':>7} {'bound':>10}  {'worst at':<18} ok"]
    for c in r.comparisons:
        d = c.logits
        where = "-" if d.worst is None else "(" + ", ".join(map(str, d.worst)) + ")"
        lines.append(f"{c.label[:52]:<52} {d.max_abs:>10.3g} {d.mean_abs:>10.3g} {d.max_rel:>10.3g} {c.argmax_agree:>7.1%} "
                     f"{d.bound:>10.3g}  {where:<18} {'yes' if c.ok else 'NO'}")
    if r.n1_max_abs is not None:
        lines.append(f"N = 1 rewrite vs original: max|Δlogits| = {r.n1_max_abs} ({'bit-exact' if r.n1_max_abs == 0.0 else 'NOT bit-exact'})")
    lines.append("PASS" if r.ok else "FAIL")
    return "\n".join(lines)
