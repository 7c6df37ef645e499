"""The tokenizer without transformers: ids, EOS/pad, chat template, streaming text."""

from __future__ import annotations

import json
import shutil

import pytest

from loopgraph.errors import LoopgraphError
from loopgraph.runtime.tokenizer import TextStream, TextTokenizer


@pytest.fixture(scope="module")
def tok(tiny):
    return TextTokenizer.from_folder(tiny("llama"))


def test_ids_match_transformers(tiny, tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny("llama"))
    for text in ("The capital of France is", "Hello world!\n  def f(x):", "é€ 😀"):
        assert tok.encode(text) == hf(text).input_ids
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True)
    assert (tok.eos_ids, tok.pad_id) == ((2,), 0)


def test_chat_template_matches_transformers(tiny, tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    assert tok.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.encode_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(LoopgraphError, match=r"has no tokenizer\.json, so the text cannot be tokenized; export the model with loopgraph export"):
        TextTokenizer.from_folder(tmp_path)


def test_eos_list_and_template_from_tokenizer_config(tiny, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny("llama") / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = TextTokenizer.from_folder(tmp_path)
    assert tok.eos_ids == (2, 5)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "[hi]</s>"


def test_no_chat_template_is_a_clear_error(tiny, tmp_path):
    shutil.copy(tiny("llama") / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = TextTokenizer.from_folder(tmp_path)
    assert tok.eos_ids == () and tok.pad_id == 0  # nothing to read: no EOS, pad 0
    with pytest.raises(LoopgraphError, match="has no chat template .*; drop --chat"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_stream_holds_back_incomplete_characters(tok):
    text = "Paris é€😀 fox"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some byte-level tokens are parts of a character and were held back


def test_prefix_token_follows_lm_eval(tiny, tmp_path):
    """The empty-context prefix of the evaluation: bos_token (tokenizer_config.json over special_tokens_map.json),
    else eos_token, else config.json's ids; none at all is a clear error when it is needed."""
    assert TextTokenizer.from_folder(tiny("llama")).prefix_token_id() == 1  # <s>
    shutil.copy(tiny("llama") / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<pad>"}, "eos_token": "</s>"}))
    assert TextTokenizer.from_folder(tmp_path).prefix_token_id() == 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))  # wins over the map
    assert TextTokenizer.from_folder(tmp_path).prefix_token_id() == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "no-such-token", "eos_token": "</s>"}))
    assert TextTokenizer.from_folder(tmp_path).prefix_token_id() == 2  # an unknown BOS text: the EOS
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert TextTokenizer.from_folder(tmp_path).prefix_token_id() == 7
    (tmp_path / "config.json").unlink()
    tok = TextTokenizer.from_folder(tmp_path)  # loading still works: generation needs no prefix token
    with pytest.raises(LoopgraphError, match="no BOS or EOS token in tokenizer_config.json or config.json, so there is no prefix token"):
        tok.prefix_token_id()
