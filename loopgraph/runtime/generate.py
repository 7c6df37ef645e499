"""Generation with an ONNX causal LM in ONNX Runtime: greedy or sampled decoding of a left-padded
batch of prompts, with the KV cache when the model has one, stopping at EOS.

The loop is generic over the cache layout, read from the session's input metadata:

* no ``past_key_values.*`` inputs (a plain export, or a looped plain export): every step
  recomputes the whole sequence — the *no-cache recompute* the cached paths are tested against;
* ``past_key_values.{i}.key/.value`` of rank 4 ``[batch, kv_heads, past, head_dim]``: an Optimum
  with-past export, a ``kv="exact"`` rewrite (the standard layout: one pair per virtual layer, i
  counts block applications in execution order; nothing else differs for the loop), or a rewrite
  with ``kv="first"|"last"``;
* rank 5 ``[N, batch, kv_heads, past, head_dim]`` for the looped blocks of a ``kv="stacked"``
  rewrite: one cache per iteration of the Loop. N is the static leading dim, else the spec's
  ``iters`` from the ``loopgraph.spec`` metadata, or the value fed as ``loopgraph/iters`` (a
  ``--dynamic`` file).

Generation starts from zero-length pasts and feeds each ``present.X`` back as
``past_key_values.X``; presents stay on the session's device (IO binding) between steps.
Positions follow the attention mask (``cumsum(mask) - 1``), so left padding is invisible to the
real tokens. A row that reached EOS is fed the pad token from then on (its outputs are ignored;
attention never crosses rows) until every row is done or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loopgraph.errors import LoopgraphError
from loopgraph.exportdir import read_config
from loopgraph.metadata import read_spec
from loopgraph.naming import PAST_PREFIX, lg_name, present_for
from loopgraph.runtime.inputs import left_pad, position_ids
from loopgraph.runtime.session import Session
from loopgraph.spec import MAX_ITERS, LoopSpec

ITERS_INPUT = lg_name("iters")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampled decoding: softmax(logits / temperature), restricted to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus); ``seed`` makes it repeatable."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise LoopgraphError(f"--temperature {self.temperature} must be > 0 (leave it out for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise LoopgraphError(f"--top-p {self.top_p} is outside (0, 1]; pick e.g. 0.9")


@dataclasses.dataclass(frozen=True)
class PastSlot:
    """One KV-cache input and the output that feeds it at the next step."""
    past: str  # past_key_values.L.key
    present: str  # present.L.key
    shape: tuple[int, ...]  # the initial (zero-length) past with batch 0: ([N,] 0, kv_heads, 0, head_dim)
    dtype: Any


@dataclasses.dataclass
class CausalLM:
    """A causal-LM session and how to drive it: its KV-cache slots (empty: recompute) and N."""
    session: Session
    slots: list[PastSlot]
    iters: int | None  # fed as loopgraph/iters (dynamic files), None: the file's own
    spec: LoopSpec | None
    max_positions: int | None

    @property
    def uses_cache(self) -> bool:
        return bool(self.slots)

    @classmethod
    def from_session(cls, session: Session, config: dict[str, Any] | None = None, iters: int | None = None) -> CausalLM:
        """Read the cache layout from ``session``'s inputs; ``config`` (the export's config.json)
        fills dims the graph leaves symbolic and gives the position limit; ``iters`` overrides N
        of a ``--dynamic`` file."""
        config = config or {}
        inputs, outputs = session.inputs, session.outputs
        spec = read_spec(session.metadata)
        for name in ("input_ids", "attention_mask"):
            if name not in inputs:
                raise LoopgraphError(f"the model has no {name!r} input (inputs: {', '.join(inputs)}); "
                                     "generate needs a causal-LM export (loopgraph export)")
        if "logits" not in outputs:
            raise LoopgraphError(f"the model has no 'logits' output (outputs: {', '.join(outputs)}); generate needs a causal-LM export")
        if iters is not None:
            if ITERS_INPUT not in inputs:
                baked = f" (N = {spec.iters} is baked in)" if spec else ""
                raise LoopgraphError(f"--iters applies to files rewritten with --dynamic; this model has no {ITERS_INPUT} input{baked}. "
                                     "Drop --iters, or rewrite with --dynamic")
            if not 1 <= iters <= MAX_ITERS:
                raise LoopgraphError(f"--iters {iters} is out of range; use 1..{MAX_ITERS}")
        n = iters if iters is not None else (spec.iters if spec else None)
        slots = [_slot(info, outputs, config, n) for name, info in inputs.items() if name.startswith(PAST_PREFIX)]
        limit = config.get("max_position_embeddings", config.get("n_positions"))
        return cls(session, slots, iters, spec, int(limit) if limit else None)

    def initial_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length pasts for a batch: ([N,] batch, kv_heads, 0, head_dim)."""
        out = {}
        for s in self.slots:
            shape = list(s.shape)
            shape[-4] = batch
            out[s.past] = np.zeros(shape, s.dtype)
        return out


def _slot(info, outputs: dict, config: dict[str, Any], n: int | None) -> PastSlot:
    present = present_for(info.name)
    if present not in outputs:
        raise LoopgraphError(f"the model has input {info.name} but no output {present} to feed it; it is not a with-past export loopgraph can drive")
    rank = len(info.shape)
    if rank not in (4, 5):
        raise LoopgraphError(f"{info.name} has rank {rank} ({list(info.shape)}); expected [batch, kv_heads, past, head_dim] "
                             "or, for a kv=stacked rewrite, [N, batch, kv_heads, past, head_dim]")
    dtype = _DTYPES.get(info.type)
    if dtype is None:
        raise LoopgraphError(f"{info.name} has type {info.type}, which numpy cannot hold; use a float32 or float16 export")
    heads = config.get("num_attention_heads", config.get("n_head"))  # GPT-2 names in the second place
    kv_heads = config.get("num_key_value_heads", heads)
    hidden = config.get("hidden_size", config.get("n_embd"))
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    dims = list(info.shape)

    def static(axis: int, fallback: int | None, what: str) -> int:
        if isinstance(dims[axis], int):
            return dims[axis]
        if fallback is None:
            raise LoopgraphError(f"{info.name} leaves {what} symbolic ({dims[axis]!r}) and config.json does not give it; "
                                 "put the export's config.json next to the .onnx file")
        return int(fallback)

    shape = [0, static(-3, kv_heads, "kv_heads"), 0, static(-1, head_dim, "head_dim")]
    if rank == 5:
        lead = dims[0]
        if isinstance(lead, int) and n is not None and lead != n:
            raise LoopgraphError(f"{info.name} has a per-iteration axis of {lead} but N = {n} was asked; use --iters {lead}")
        shape.insert(0, static(0, n, "N (iterations; no loopgraph.spec metadata)"))
    return PastSlot(info.name, present, tuple(shape), dtype)


def open_lm(session: Session, folder: str | Path, iters: int | None = None) -> CausalLM:
    """A :class:`CausalLM` for a session opened on a model in ``folder`` (which holds config.json)."""
    return CausalLM.from_session(session, read_config(Path(folder)), iters)


@dataclasses.dataclass
class Generation:
    """What :func:`generate` produced. ``tokens[i]`` are prompt i's new tokens, up to and
    including its first EOS; ``step_logits`` (when kept) are the next-token logits of every step,
    ``[batch, vocab]`` each, before the choice of that step's token."""
    tokens: list[list[int]]
    finish: list[str]  # "eos" or "length"
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    step_logits: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the whole time (prefill included)."""
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / total if total > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first (the one prefill gives) over the time of the decode steps."""
        later = self.new_tokens - len(self.tokens)
        return later / self.decode_seconds if self.decode_seconds > 0 else float("inf")


def choose(logits: np.ndarray, sampling: Sampling | None, rng: np.random.Generator) -> np.ndarray:
    """The next token per row of ``logits`` [batch, vocab]: argmax (the first maximum), or a draw
    from the temperature-scaled, top-p-truncated distribution."""
    if sampling is None:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    order = np.argsort(-p, axis=-1, kind="stable")
    p_sorted = np.take_along_axis(p / p.sum(-1, keepdims=True), order, -1)
    if sampling.top_p < 1:  # keep a token while the mass before it is below top_p (the first is always kept)
        p_sorted = np.where(np.cumsum(p_sorted, -1) - p_sorted < sampling.top_p, p_sorted, 0.0)
    cdf = np.cumsum(p_sorted, -1)
    u = rng.random((len(cdf), 1)) * cdf[:, -1:]
    pick = np.minimum((cdf <= u).sum(-1), cdf.shape[-1] - 1)
    return np.take_along_axis(order, pick[:, None], -1)[:, 0]


class _Run:
    """One generation's model state: the sequence so far and, with a cache, the pasts that hold
    its first ``cached`` tokens."""

    def __init__(self, lm: CausalLM, ids: np.ndarray, mask: np.ndarray) -> None:
        self.lm = lm
        self.ids, self.mask = ids, mask
        self.cached = 0
        self.past: dict[str, Any] = lm.initial_past(len(ids)) if lm.uses_cache else {}
        self.extra = {ITERS_INPUT: np.asarray(lm.iters, np.int64)} if lm.iters is not None else {}

    def logits(self) -> np.ndarray:
        """Run the model on the tokens not cached yet (all of them without a cache); the
        next-token logits [batch, vocab]."""
        new = self.ids[:, self.cached:]
        feeds = {"input_ids": new, "attention_mask": self.mask, "position_ids": position_ids(self.mask)[:, -new.shape[1]:],
                 **self.past, **self.extra}
        outputs = ["logits"] + [s.present for s in self.lm.slots]
        out = self.lm.session.run_bound(feeds, outputs, to_host=["logits"])
        if self.lm.uses_cache:
            self.past = {s.past: out[s.present] for s in self.lm.slots}
            self.cached = self.ids.shape[1]
        return np.array(out["logits"][:, -1], np.float32)

    def append(self, tokens: np.ndarray) -> None:
        self.ids = np.concatenate([self.ids, tokens[:, None].astype(np.int64)], 1)
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], 1)


def generate(lm: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int] = (), pad_id: int = 0,
             sampling: Sampling | None = None, on_step: Callable[[np.ndarray, np.ndarray], None] | None = None,
             keep_logits: bool = False) -> Generation:
    """Decode up to ``max_new_tokens`` for each prompt (token ids), greedy unless ``sampling``.

    ``on_step(tokens, active)`` is called after each step with the chosen token per row and a
    mask of the rows still generating (a row's EOS step is active; later pad steps are not)."""
    if not prompts:
        raise LoopgraphError("no prompt given; pass at least one --prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise LoopgraphError(f"prompt {i + 1} has no tokens; give some text")
    if max_new_tokens < 1:
        raise LoopgraphError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    longest = max(map(len, prompts))
    if lm.max_positions and longest + max_new_tokens > lm.max_positions:
        raise LoopgraphError(f"the longest prompt has {longest} tokens and --max-new-tokens is {max_new_tokens}, past the model's "
                             f"{lm.max_positions} positions; shorten the prompt or lower --max-new-tokens to {max(1, lm.max_positions - longest)}")
    rng = np.random.default_rng(sampling.seed if sampling else None)
    eos = np.asarray(list(eos_ids), np.int64)
    ids, mask = left_pad(prompts, pad_id)
    run = _Run(lm, ids, mask)
    batch = len(prompts)
    done = np.zeros(batch, bool)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    kept: list[np.ndarray] = []

    t0 = time.perf_counter()
    logits = run.logits()
    prefill = time.perf_counter() - t0
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(logits)
        chosen = np.where(done, pad_id, choose(logits, sampling, rng))
        active = ~done
        for i in np.flatnonzero(active):
            tokens[i].append(int(chosen[i]))
        if on_step is not None:
            on_step(chosen, active)
        done = done | np.isin(chosen, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        run.append(chosen)
        logits = run.logits()
    decode = time.perf_counter() - t0 - prefill
    finish = ["eos" if t and t[-1] in eos_ids else "length" for t in tokens]
    return Generation(tokens, finish, [len(p) for p in prompts], prefill, decode, kept)
