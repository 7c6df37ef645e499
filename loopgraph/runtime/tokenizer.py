"""Text in and out without transformers: the ``tokenizers`` library on the ``tokenizer.json`` an
export wrote, the chat template rendered with jinja2, and the EOS/pad ids from the export's
``generation_config.json`` / ``config.json`` / ``tokenizer_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from loopgraph.errors import LoopgraphError
from loopgraph.exportdir import read_config, read_json

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer_json(folder: Path, what: str = "the text"):
    """``folder/tokenizer.json`` read by the ``tokenizers`` library (no transformers)."""
    tok_file = folder / TOKENIZER_FILE
    if not tok_file.is_file():
        raise LoopgraphError(f"{folder} has no {TOKENIZER_FILE}, so {what} cannot be tokenized; export the model with "
                             f"loopgraph export (it writes the tokenizer) or copy the checkpoint's {TOKENIZER_FILE} next to the .onnx file")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LoopgraphError("the tokenizers library is not installed; pip install 'loopgraph[cpu]'") from None
    try:
        return Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise LoopgraphError(f"{tok_file} could not be loaded by the tokenizers library: {str(e).splitlines()[0]}") from None


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _prefix_id(tokenizer: Any, special: dict[str, Any], config: dict[str, Any]) -> int | None:
    """lm-eval's prefix token: the ``bos_token`` (of tokenizer_config.json, else special_tokens_map.json),
    else the ``eos_token``, else config.json's ``bos_token_id``/``eos_token_id``; None when there is none."""
    for key in ("bos_token", "eos_token"):
        text = token_text(special.get(key))
        if text is not None and tokenizer.token_to_id(text) is not None:
            return tokenizer.token_to_id(text)
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


@dataclasses.dataclass
class TextTokenizer:
    """A model folder's tokenizer (the one for generation, evaluation, sweeps, traces and verify):
    encode/decode, chat template, EOS and pad ids, and the prefix token of empty contexts."""
    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: tuple[int, ...]
    pad_id: int
    chat_template: str | None
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as text, for the chat template
    folder: Path
    prefix_id: int | None = None  # see _prefix_id; prefix_token_id() refuses None

    @classmethod
    def from_folder(cls, folder: str | Path, what: str = "the text") -> TextTokenizer:
        """Load the tokenizer files an export wrote into ``folder``; ``what`` names the text in
        the error for a folder without tokenizer.json."""
        folder = Path(folder)
        tokenizer = load_tokenizer_json(folder, what)
        tok_config = read_json(folder / "tokenizer_config.json")
        gen_config = read_json(folder / "generation_config.json")
        config = read_config(folder)
        special = {k: t for k, v in tok_config.items() if k.endswith("_token") and (t := token_text(v)) is not None}

        eos = _ids(gen_config.get("eos_token_id")) or _ids(config.get("eos_token_id"))
        if not eos and special.get("eos_token") is not None:
            eos = _ids(tokenizer.token_to_id(special["eos_token"]))
        pad = gen_config.get("pad_token_id", config.get("pad_token_id"))
        if pad is None and special.get("pad_token") is not None:
            pad = tokenizer.token_to_id(special["pad_token"])
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        pad_id = int(pad) if pad is not None else (eos[0] if eos else 0)  # only fills masked positions

        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else tok_config.get("chat_template")
        if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        prefix = _prefix_id(tokenizer, {**read_json(folder / "special_tokens_map.json"), **tok_config}, config)
        return cls(tokenizer, eos, pad_id, template, special, folder, prefix)

    def prefix_token_id(self) -> int:
        """The token an empty context becomes (lm-eval: BOS if the tokenizer has one, else EOS)."""
        if self.prefix_id is None:
            raise LoopgraphError(f"{self.folder}: no BOS or EOS token in tokenizer_config.json or config.json, so there is no "
                                 "prefix token for empty contexts; add bos_token to tokenizer_config.json")
        return self.prefix_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens (e.g. BOS) as the tokenizer's post-processor adds them."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}]) through the model's chat template,
        rendered as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
        if not self.chat_template:
            raise LoopgraphError(f"{self.folder} has no chat template (neither chat_template.jinja nor a chat_template entry in "
                                 "tokenizer_config.json); drop --chat and write the prompt as plain text")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise LoopgraphError("--chat needs jinja2; pip install 'loopgraph[cpu]'") from None

        def raise_exception(message: str) -> None:
            raise LoopgraphError(f"the chat template of {self.folder} refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise LoopgraphError(f"the chat template of {self.folder} failed to render: {e}") from None

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the chat prompt. The template already writes any BOS, so no special tokens are
        added on top (as transformers' ``apply_chat_template(tokenize=True)``)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class TextStream:
    """Incremental detokenization: feed token ids, get the new text as soon as it is complete.

    The whole generated sequence is decoded each time and the part not yet returned is given
    out, held back while it ends in an incomplete UTF-8 sequence (U+FFFD), so multi-token
    characters and byte-level merges come out whole."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._sent = text[self._sent:], len(text)
        return new

    def flush(self) -> str:
        """What is left (an incomplete character at the very end, if any)."""
        text = self._tokenizer.decode(self._ids)
        new, self._sent = text[self._sent:], len(text)
        return new
