"""``loopgraph generate``: text in, text out with an (optionally looped) ONNX causal LM.

Registered through ``loopgraph.cli.COMMAND_MODULES``; imports nothing heavy at import time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loopgraph.cliargs import int_arg
from loopgraph.errors import LoopgraphError
from loopgraph.runtime.session import add_runtime_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with an ONNX model (KV cache, streaming)",
        description="Greedy (default) or sampled decoding of one or more prompts with an export or a looped rewrite, "
                    "using its KV cache when it has one. One prompt streams its text as it is produced; several "
                    "run as one left-padded batch and print when done. Tokens/s go to stderr.")
    p.add_argument("model", help="an .onnx file, or an export folder holding model.onnx (the tokenizer files must be beside it)")
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int_arg, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--system", help="with --chat: a system message before the prompt")
    p.add_argument("--temperature", type=float, help="sample with this temperature (> 0); without it decoding is greedy")
    p.add_argument("--top-p", type=float, help="with --temperature: nucleus sampling mass (0 < p <= 1, default 1)")
    p.add_argument("--seed", type=int_arg, help="with --temperature: random seed for repeatable sampling")
    p.add_argument("--iters", type=int_arg, help="N for a file rewritten with --dynamic (default: the value it was written with)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_generate)


def _sampling(args: argparse.Namespace):
    from loopgraph.runtime.generate import Sampling
    if args.temperature is None:
        for flag, value in (("--top-p", args.top_p), ("--seed", args.seed)):
            if value is not None:
                raise LoopgraphError(f"{flag} applies to sampled decoding; add --temperature (e.g. 0.7) or drop {flag}")
        return None
    return Sampling(args.temperature, 1.0 if args.top_p is None else args.top_p, args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from loopgraph.onnxio import resolve_model_path
    from loopgraph.runtime.generate import generate, open_lm
    from loopgraph.runtime.session import session_from_args
    from loopgraph.runtime.tokenizer import TextStream, TextTokenizer

    if args.max_new_tokens < 1:
        raise LoopgraphError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    for i, text in enumerate(args.prompt):
        if not text.strip():
            raise LoopgraphError(f"--prompt {i + 1} is empty; give some text")
    if args.system is not None and not args.chat:
        raise LoopgraphError("--system applies to --chat prompts; add --chat or drop --system")
    sampling = _sampling(args)
    path = resolve_model_path(args.model)
    tokenizer = TextTokenizer.from_folder(path.parent)  # before the session: a missing tokenizer fails fast
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompts = [tokenizer.encode_chat([*system, {"role": "user", "content": text}]) for text in args.prompt]
    else:
        prompts = [tokenizer.encode(text) for text in args.prompt]
    session = session_from_args(args, path)
    lm = open_lm(session, path.parent, args.iters)
    cache = "KV cache" if lm.uses_cache else "no KV cache: recomputing the sequence each step"
    if lm.spec is not None:
        cache += f", looped {lm.spec.slug()} kv={lm.spec.kv}"
        if lm.uses_cache and all(len(s.shape) == 4 for s in lm.slots) and lm.spec.kv == "exact":
            cache += f": {len(lm.slots) // 2} virtual-layer cache pairs"
    print(f"{Path(path).name} on {', '.join(session.providers)} ({cache})", file=sys.stderr)

    stream = TextStream(tokenizer) if len(prompts) == 1 else None

    def on_step(tokens, active) -> None:
        if stream is not None and active[0]:
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()

    result = generate(lm, prompts, args.max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id, sampling, on_step=on_step)
    if stream is not None:
        sys.stdout.write(stream.flush() + "\n")
    else:
        for i, (text, tokens) in enumerate(zip(args.prompt, result.tokens)):
            print(f"[{i + 1}] {text}{tokenizer.decode(tokens)}")
    print(f"{result.new_tokens} new tokens ({', '.join(result.finish)}) in {result.prefill_seconds + result.decode_seconds:.2f} s: "
          f"{result.tokens_per_second:.1f} tokens/s (prefill of {sum(result.prompt_lengths)} prompt tokens {result.prefill_seconds:.3f} s, "
          f"decode {result.decode_tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    return 0
