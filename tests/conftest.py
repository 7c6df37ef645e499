from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import fixtures

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LOOPGRAPH_DATA", ROOT.parent / "shared" / "data" / "benchmarks"))


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    root = ROOT / ".pytest_cache" / "loopgraph-fixtures" / fixtures.cache_key()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _export(src: Path, dest: Path, with_past: bool = False) -> None:
    from loopgraph.exporters.export import export
    export(str(src), dest, with_past=with_past, force=True, say=lambda m: None)


@pytest.fixture(scope="session")
def tiny(fixture_root):
    """tiny(arch, with_past=False) -> export folder (model.onnx, tokenizer, loopgraph.json -> hf/)."""
    def get(arch: str, with_past: bool = False) -> Path:
        ckpt = fixtures.ensure(fixture_root, f"{arch}-hf", lambda d: fixtures.build_checkpoint(arch, d))
        return fixtures.ensure(fixture_root, f"{arch}{'-past' if with_past else ''}-onnx",
                               lambda d: _export(ckpt, d, with_past))
    return get


@pytest.fixture(scope="session")
def hf_model(fixture_root, tiny):
    """hf_model(arch) -> the fp32 eager PyTorch model of the tiny fixture (cached per session)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            from transformers import AutoModelForCausalLM
            tiny(arch)
            cache[arch] = AutoModelForCausalLM.from_pretrained(fixture_root / f"{arch}-hf", attn_implementation="eager").eval()
        return cache[arch]
    return get


def _real(with_past: bool) -> Path:
    """The real SmolLM2-135M export, made once per cache key (marked tests only)."""
    out = ROOT / ".pytest_cache" / "loopgraph-real" / (fixtures.cache_key() + ("-past" if with_past else ""))
    if not (out / "model.onnx").is_file():
        from loopgraph.exporters.export import export
        export("smollm2-135m", out, with_past=with_past, force=True, say=lambda m: None)
    return out


@pytest.fixture(scope="session")
def real_export() -> Path:
    """The real SmolLM2-135M, exported without a KV cache."""
    return _real(with_past=False)


@pytest.fixture(scope="session")
def past_export() -> Path:
    """The real SmolLM2-135M, exported with a KV cache."""
    return _real(with_past=True)


def batch_feeds(vocab: int = fixtures.VOCAB, seed: int = 0):
    """A left-padded batch of 2 (one row with 3 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, 11))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopgraph.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
