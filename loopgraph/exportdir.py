"""What an export folder says about itself besides the graph: its JSON files (``config.json``,
``tokenizer_config.json``, ...) and ``loopgraph.json``, the manifest ``loopgraph export`` writes
(where the model came from and which Hugging Face checkpoint is its reference).

Importable without torch: the runtime, the evaluation and the figures read these files too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loopgraph.errors import LoopgraphError

MANIFEST = "loopgraph.json"
CONFIG = "config.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file the export wrote ({} when absent or not an object); a one-line error when unreadable."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoopgraphError(f"{path} is not readable JSON ({e}); re-export the model") from None
    return data if isinstance(data, dict) else {}


def read_config(folder: Path) -> dict[str, Any]:
    """The export's ``config.json`` ({} when the folder has none)."""
    return read_json(Path(folder) / CONFIG)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/loopgraph.json``; None when the folder has none (or it holds no JSON object)."""
    return read_json(Path(folder) / MANIFEST) or None


def reference_dir(export_dir: Path) -> Path | None:
    """The HF checkpoint a manifest points to (for ``verify`` and cross-checks); None when there
    is no manifest or its checkpoint has no config.json."""
    m = read_manifest(export_dir)
    if not m:
        return None
    ref = m.get("reference")
    p = Path(ref) if ref and Path(ref).is_absolute() else Path(export_dir) / (ref or "")
    return p if (p / CONFIG).is_file() else None


def model_title(model: str | Path) -> str:
    """What a model file is called in titles: the ``source`` of its export's manifest (e.g.
    ``smollm2-135m``), else the folder name. Never fails: an unreadable manifest falls back too."""
    path = Path(model)
    try:
        source = (read_manifest(path.parent) or {}).get("source")
    except LoopgraphError:
        source = None
    return str(source) if source else (path.parent.name or path.name)
