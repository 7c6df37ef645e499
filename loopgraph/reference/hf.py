"""The Hugging Face model the graphs are checked against (needs torch and transformers)."""

from __future__ import annotations

import os
from pathlib import Path

from loopgraph.errors import LoopgraphError


def load_reference(ref: str | os.PathLike):
    """The HF model to compare against, in float32 and eval mode, gradients off: a checkpoint
    folder (eager attention) or the built-in name (de-quantised from its GGUF file).
    Refuses a folder without config.json."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise LoopgraphError("the PyTorch reference needs torch and transformers; pip install 'loopgraph[export]'") from None

    from loopgraph.exporters.export import BUILTIN, builtin_gguf
    torch.set_grad_enabled(False)
    if str(ref) in BUILTIN:
        gguf = builtin_gguf(str(ref))
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    p = Path(ref)
    if not (p / "config.json").is_file():
        raise LoopgraphError(f"--reference {ref}: not a Hugging Face checkpoint folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, attn_implementation="eager").eval()
