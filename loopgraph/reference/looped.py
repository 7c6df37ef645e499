"""The PyTorch looped model: the Hugging Face model's own blocks ``[start, end)`` applied N times
with the regularizer, written directly from the formulas in :mod:`loopgraph.regularizers` (sums over all
``y_i`` rather than the graph's running updates), so it checks the ONNX graph independently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from loopgraph.regularizers import COS_EPS
from loopgraph.runtime import inputs
from loopgraph.spec import LoopSpec


def next_state(spec: LoopSpec, t: int, ys: list[torch.Tensor], x_prev: torch.Tensor) -> torch.Tensor:
    """x_t from y_1..y_t (DESIGN §1); x_1 = y_1 = r."""
    if t == 1:
        return ys[-1]
    return STEPS[spec.reg](spec, t, ys, x_prev)


def _auto_align(spec: LoopSpec, t: int, ys: list[torch.Tensor], x_prev: torch.Tensor) -> torch.Tensor:
    r = ys[0]
    weights = [torch.ones_like(r[..., :1])]
    for y_i in ys[1:]:
        cos = (y_i * r).sum(-1, keepdim=True) / torch.clamp(y_i.norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True), min=COS_EPS)
        weights.append(torch.relu(cos))
    return sum(w * y_i for w, y_i in zip(weights, ys)) / sum(weights)


#: x_t for t >= 2 of each regularizer in :data:`loopgraph.regularizers.ALL`, from its formula
#: (written independently of the graph's running updates; a test checks it is complete)
STEPS: dict[str, Callable[[LoopSpec, int, list[torch.Tensor], torch.Tensor], torch.Tensor]] = {
    "naive": lambda spec, t, ys, x_prev: ys[-1],
    "uniform": lambda spec, t, ys, x_prev: torch.stack(ys).sum(0) / t,
    "ema": lambda spec, t, ys, x_prev: spec.alpha * ys[-1] + (1 - spec.alpha) * x_prev,
    "anchor": lambda spec, t, ys, x_prev: spec.alpha * ys[-1] + (1 - spec.alpha) * ys[0],
    "auto-align": _auto_align,
    "damped": lambda spec, t, ys, x_prev: (1 - 1 / spec.k) * x_prev + (1 / spec.k) * ys[-1],
}


def change(metric: str, x_new: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """Per-token change of the state over the hidden axis, [batch, seq, 1] (docs/halting.md)."""
    if metric == "rel":
        return (x_new - x_prev).norm(dim=-1, keepdim=True) / x_prev.norm(dim=-1, keepdim=True)
    dot = (x_new * x_prev).sum(-1, keepdim=True)
    return 1 - dot / torch.clamp(x_new.norm(dim=-1, keepdim=True) * x_prev.norm(dim=-1, keepdim=True), min=COS_EPS)


class LoopedRange(nn.Module):
    """Stands in for blocks ``[start, end)``: calls them N times, regularizing between passes.

    Each block is called with the arguments the model passes to a block (masks, positions,
    rotary embeddings); tuple outputs (GPT-2) are unpacked and re-packed.

    KV cache: every iteration sees a different input, so each needs its own cache (the ``exact``
    scheme of DESIGN §5). Iteration 1 uses the cache the model passes (``past_key_values``, as a
    keyword (Llama family) or the block's second positional argument (GPT-2)); iterations
    t >= 2 use ``caches[t - 2]``, extra ``DynamicCache`` s (created empty, they fill lazily with
    entries for the looped layers under their own layer indices). They are started afresh when a
    new generation begins: the model's cache is a new object, or holds nothing yet for the range.
    Without a cache (``use_cache=False``) nothing changes.

    Halting (``spec.halt``): after iteration t >= 2 a token whose change is <= TOL is frozen and
    keeps its state for the remaining iterations; it is still fed through the blocks (so the caches
    of every iteration fill as without halting) and its new value is discarded. All N iterations
    always run here: the graph's early stop must not change any result. ``self.iterations`` holds
    each token's last applied iteration after a forward ([batch, seq]).

    Held K/V (``spec.halt_kv == "held"``): every token is still computed here, but at each looped
    attention the K/V of a token frozen before iteration t are replaced by the ones it had at its last
    iteration (the model's eager attention function is wrapped for the forward), which is what the
    graph's compacted iterations compute without computing the frozen tokens at all."""

    def __init__(self, layers: list[nn.Module], spec: LoopSpec, record: list | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.spec = spec
        self.record = record  # when a list, receives (y_t, x_t) per iteration
        self.caches: list = []  # per-iteration caches for t >= 2 (filled during cached generation)
        self.iterations: torch.Tensor | None = None  # with halting: per token, the last iteration it took
        self._cache_owner = None  # the model's cache the extra caches belong to
        for attr in ("attention_type", "layer_idx"):  # read by some models' forward loops
            if hasattr(layers[0], attr):
                setattr(self, attr, getattr(layers[0], attr))

    def _iteration_caches(self, cache) -> list:
        """[cache, extra_2, ..., extra_N]: the cache each iteration's layers read and update."""
        from transformers.cache_utils import DynamicCache
        # the first looped layer's index: on the block (some models) or its attention module
        first = next(m.layer_idx for m in self.layers[0].modules() if isinstance(getattr(m, "layer_idx", None), int))
        if cache is not self._cache_owner or cache.get_seq_length(first) == 0:
            self.caches = [DynamicCache() for _ in range(self.spec.iters - 1)]
            self._cache_owner = cache
        return [cache, *self.caches]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        from transformers.cache_utils import Cache
        positional = bool(args) and isinstance(args[0], Cache)
        cache = args[0] if positional else kwargs.get("past_key_values")
        caches = self._iteration_caches(cache) if isinstance(cache, Cache) else [cache] * self.spec.iters
        with self._held_kv():
            return self._forward(hidden_states, args, kwargs, caches, positional)

    @contextlib.contextmanager
    def _held_kv(self) -> Iterator[None]:
        """With ``halt_kv == "held"``: the model's ``eager_attention_forward`` replaced, for the forward, by
        one that swaps in the held K/V of the tokens in ``self._hold`` (their K/V of the last iteration that
        did not hold them)."""
        import sys
        self._hold, self._kv = None, {}
        if self.spec.halt_kv != "held":
            yield
            return
        module = sys.modules[type(self.layers[0]).__module__]
        original = module.eager_attention_forward

        def attend(attn, query, key, value, attention_mask, *args, **kwargs):
            if attn in self._kv:
                hold = self._hold[:, None, :, :]  # [batch, 1, seq, 1] against [batch, heads, seq, d]
                key, value = torch.where(hold, self._kv[attn][0], key), torch.where(hold, self._kv[attn][1], value)
            self._kv[attn] = (key, value)
            return original(attn, query, key, value, attention_mask, *args, **kwargs)
        module.eager_attention_forward = attend
        try:
            yield
        finally:
            module.eager_attention_forward = original

    def _forward(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict, caches: list, positional: bool):
        x, ys, rest = hidden_states, [], None
        frozen = torch.zeros(x.shape[:-1] + (1,), dtype=torch.bool, device=x.device)
        used = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        for t in range(1, self.spec.iters + 1):
            if positional:
                args = (caches[t - 1], *args[1:])
            elif "past_key_values" in kwargs:
                kwargs["past_key_values"] = caches[t - 1]
            h, self._hold = x, frozen
            for layer in self.layers:
                out = layer(h, *args, **kwargs)
                h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            ys.append(h)
            if self.spec.halt is None:
                x = next_state(self.spec, t, ys, x)
            else:
                x, frozen, used = self._halt(t, ys, x, frozen, used)
            if self.record is not None:
                self.record.append((h.detach(), x.detach()))
        if self.spec.halt is not None:
            self.iterations = used
        return x if rest is None else (x, *rest)

    def _halt(self, t: int, ys: list, x: torch.Tensor, frozen: torch.Tensor, used: torch.Tensor):
        """One iteration with freezing: a frozen token keeps x; an unfrozen one (never frozen before,
        so every y_i is its own) takes the formula's x_t, and freezes when its change is <= TOL."""
        x_new = torch.where(frozen, x, next_state(self.spec, t, ys, x))
        used = torch.where(frozen[..., 0], used, torch.full_like(used, t))
        if t >= 2:
            frozen = frozen | (change(self.spec.halt_metric, x_new, x) <= self.spec.halt)
        return x_new, frozen, used


def block_list(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the ModuleList of decoder blocks, and its attribute name."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr
    raise ValueError(f"no ModuleList of {n} blocks in {type(model).__name__}")


@contextlib.contextmanager
def looped(model: nn.Module, spec: LoopSpec, record: list | None = None) -> Iterator[nn.Module]:
    """Temporarily replace blocks ``[spec.start, spec.end)`` of ``model`` by a :class:`LoopedRange`."""
    parent, attr = block_list(model)
    original = getattr(parent, attr)
    layers = list(original)
    looped_range = LoopedRange(layers[spec.start:spec.end], spec, record)
    setattr(parent, attr, nn.ModuleList(layers[:spec.start] + [looped_range] + layers[spec.end:]))
    try:
        yield model
    finally:
        setattr(parent, attr, original)


def reference_logits(model: nn.Module, spec: LoopSpec | None, input_ids, attention_mask) -> torch.Tensor:
    """Logits of the looped model (or the plain model when ``spec`` is None), no KV cache."""
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(attention_mask)
    # the graph's own position rule, not a second copy: the reference checks the loop, on the inputs the graph is fed
    position_ids = torch.as_tensor(inputs.position_ids(mask.numpy()))
    with torch.no_grad(), (looped(model, spec) if spec else contextlib.nullcontext()):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.logits


def reference_generate(model: nn.Module, spec: LoopSpec | None, input_ids, attention_mask, max_new_tokens: int,
                       **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hugging Face ``generate`` (greedy unless ``generate_kwargs`` say otherwise) with the KV
    cache on the looped model (the plain model when ``spec`` is None): the eager PyTorch
    counterpart of ``loopgraph generate``. Returns the new tokens [batch, steps] and the raw
    next-token logits of every step [batch, steps, vocab] (None with ``output_logits=False``)."""
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(attention_mask)
    kwargs = {"do_sample": False, "output_logits": True, **generate_kwargs}
    with torch.no_grad(), (looped(model, spec) if spec else contextlib.nullcontext()):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1) if out.logits is not None else None
