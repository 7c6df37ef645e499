"""A resumable cache of per-item scores, so an interrupted evaluation picks up where it stopped.

One SQLite file (``<cache dir>/scores.sqlite``), one row per (model, item): the key is the
sha256 of the model key (:func:`model_key`: the model file, its external data, its tokenizer
and config files, and the max_length used), the scoring version and the item's request
strings, so the same item from the full split, from the shipped samples or from another
``--limit`` subset hits the same entry, while any change to the model, the tokenizer or the
rendered text misses. Writes are SQLite transactions: a crash loses at most the batch being
written, never corrupts what was committed. Several processes may share the file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from loopgraph.errors import LoopgraphError
from loopgraph.eval.scoring import Score

#: bump when a change alters scores for the same model and text
SCORING_VERSION = 1
_FILES_BESIDE = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def file_sha256(path: Path, h: hashlib._Hash | None = None) -> hashlib._Hash:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h


def model_key(model: Path, external: Sequence[str], max_length: int) -> str:
    """sha256 over the model file, its external data files, the tokenizer/config files beside it and max_length."""
    h = file_sha256(model)
    for name in [*external, *_FILES_BESIDE]:
        p = model.parent / name
        h.update(f"\0{name}\0".encode())
        if p.is_file():
            file_sha256(p, h)
    h.update(f"\0max_length={max_length}".encode())
    return h.hexdigest()


def item_key(model: str, requests: Iterable[tuple[str, str]]) -> str:
    payload = json.dumps([SCORING_VERSION, model, [list(r) for r in requests]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ScoreCache:
    """``get(keys)`` / ``put({key: scores})``; ``folder=None`` keeps nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else Path(folder) / "scores.sqlite"
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=60)
                self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db.commit()
            except (OSError, sqlite3.Error) as e:
                raise LoopgraphError(f"cannot use the cache {self.path} ({e}); pass --cache-dir with a writable folder or --no-cache") from None

    def get(self, keys: Sequence[str]) -> dict[str, list[Score]]:
        if self._db is None or not keys:
            return {}
        found: dict[str, list[Score]] = {}
        for s in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            part = keys[s:s + 500]
            rows = self._db.execute(f"SELECT key, value FROM scores WHERE key IN ({','.join('?' * len(part))})", part)
            for key, value in rows:
                found[key] = [Score(float(ll), bool(g)) for ll, g in json.loads(value)]
        return found

    def put(self, entries: dict[str, Sequence[Score]]) -> None:
        if self._db is None or not entries:
            return
        with self._db:  # one transaction
            self._db.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)",
                                 [(k, json.dumps([[s.ll, s.greedy] for s in v])) for k, v in entries.items()])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
