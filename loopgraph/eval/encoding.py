"""From request strings to token ids, with lm-evaluation-harness's rules for causal models.

- :func:`encode_pair`: trailing whitespace of the context moves to the continuation; then
  ``whole = encode(context + continuation)``, ``ctx = encode(context)`` and the continuation
  tokens are ``whole[len(ctx):]`` (joint tokenisation, which matters for BPE merges at the
  boundary). An empty context becomes ``[prefix token]`` (BOS if the tokenizer has one, else EOS).
- :func:`rolling_windows`: lm-eval's ``loglikelihood_rolling`` windows with ``context_len=1``
  (``get_rolling_token_windows`` followed by ``make_disjoint_window``).
- :func:`model_input`: the row a request feeds, ``(ctx + cont)[-(max_length + 1):][:-1]``
  (left truncation), and how many of its last positions are scored.

``encode`` uses the tokenizer's default special-token handling, so BOS is present exactly when
the tokenizer adds it by default (SmolLM2's does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loopgraph.errors import LoopgraphError

Encode = Callable[[str], list[int]]
TokenRequest = tuple[list[int], list[int]]  # (context ids, continuation ids)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer says
_HUGE = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


def encode_pair(context: str, continuation: str, encode: Encode, prefix_id: int) -> TokenRequest:
    if context == "":
        return [prefix_id], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[TokenRequest]:
    """Disjoint (context, prediction) windows covering every token once. The first is fed
    ``[prefix] + tokens[:L-1]`` to predict ``tokens[:L]`` (context ``[prefix]``); each later one
    predicts the next ``L`` tokens (the last one: what is left) and is fed the ``L`` tokens before
    its last target, of which those before its first target are the context (one token for a
    full window, more for the last, partial one)."""
    if max_length < 1:
        raise ValueError("max_length must be >= 1")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        fed = tokens[end - max_length - 1:end - 1]  # lm-eval's window input; end > L, so the start is >= 0
        windows.append((fed[:len(fed) - n + 1], tokens[end - n:end]))
        done = end
    return windows


def model_input(request: TokenRequest, max_length: int) -> tuple[list[int], int]:
    """The ids fed for ``request`` and the number of scored positions at their end."""
    ctx, cont = request
    if len(cont) > max_length:
        raise LoopgraphError(f"a continuation of {len(cont)} tokens does not fit the model's max_length {max_length}; "
                             "lower --limit to skip it or raise --max-length")
    return (ctx + cont)[-(max_length + 1):][:-1], len(cont)


def config_max_length(config: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> tuple[int, str]:
    """lm-eval's ``max_length``: the first of ``n_positions``, ``max_position_embeddings``, ``n_ctx`` in the
    model config, else the tokenizer's ``model_max_length`` (unless it is transformers' "no limit"), else 2048.
    Returns the value and where it came from."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key], f"config.json {key}"
    mml = (tokenizer_config or {}).get("model_max_length")
    if isinstance(mml, int) and mml != _HUGE:
        return mml, "tokenizer_config.json model_max_length"
    return DEFAULT_MAX_LENGTH, "lm-eval's default"
