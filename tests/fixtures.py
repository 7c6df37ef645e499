"""Tiny random causal LMs, built by code (never checked in) and exported once per cache key.

Each fixture is an HF checkpoint folder (with a small byte-level BPE tokenizer and a chat
template) plus its Optimum export made with ``loopgraph export``. The cache folder is keyed by
a hash of this file and the library versions, so a changed builder rebuilds everything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

VOCAB = 384
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = """The capital of France is Paris. The quick brown fox jumps over the lazy dog.
Once upon a time in a land far away, a small robot learned to read. Question: Which statement
best explains why photosynthesis is the foundation of most food webs? Answer: Sunlight is the
source of energy for nearly all ecosystems. def fibonacci(n): return n if n < 2 else fibonacci(n - 1)
Sarah was a much better surgeon than Maria so Sarah always got the easier cases. Hello world!
""" * 4

ARCHS = ("llama", "gpt2", "qwen2", "mistral", "gemma2", "phi3")


def _config(arch: str):
    import transformers as T
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    dec = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, **common)
    return {
        "llama": lambda: T.LlamaConfig(**dec),
        "qwen2": lambda: T.Qwen2Config(**dec),
        "mistral": lambda: T.MistralConfig(sliding_window=None, **dec),
        "gemma2": lambda: T.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, **dec),
        "phi3": lambda: T.Phi3Config(**dec),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common),
    }[arch]()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_checkpoint(arch: str, dest: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager").eval()
    with torch.no_grad():  # random init with norms at 1 makes looping too tame to test; vary them
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(dest)
    _tokenizer().save_pretrained(dest)
    return dest


def cache_key() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for pkg in ("torch", "transformers", "optimum-onnx", "onnx"):
        h.update(importlib.metadata.version(pkg).encode())
    h.update((Path(__file__).parents[1] / "loopgraph/exporters/export.py").read_bytes())
    return h.hexdigest()[:12]


def ensure(root: Path, name: str, build) -> Path:
    """Build ``root/name`` once (atomically: a half-built fixture is never reused)."""
    dest = root / name
    if (dest / ".done").is_file():
        return dest
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".done").write_text(json.dumps({"name": name}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
