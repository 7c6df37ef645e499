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

import gzip
import hashlib
import json
import shutil
import sqlite3
import sys
import tempfile
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
    """sha256 of ``json.dumps([SCORING_VERSION, model, requests])``."""
    return encoded_item_key(model, encode_requests(requests))


def encode_requests(requests: Iterable[tuple[str, str]]) -> bytes:
    """An item's part of :func:`item_key`'s payload: encode it once, key it for many models
    (tune keys every item for each of ~2,000 variants)."""
    return json.dumps([list(r) for r in requests], ensure_ascii=False).encode("utf-8")


def encoded_item_key(model: str, encoded: bytes) -> str:
    """:func:`item_key` from :func:`encode_requests`' bytes."""
    return encoded_item_keys(model, [encoded])[0]


def encoded_item_keys(model: str, encoded: Sequence[bytes]) -> list[str]:
    """:func:`item_key` of many items of one model from their :func:`encode_requests` bytes: the
    same payload, as json.dumps writes a list (``[a, b, c]``)."""
    head = hashlib.sha256(f"[{json.dumps(SCORING_VERSION, ensure_ascii=False)}, {json.dumps(model, ensure_ascii=False)}, ".encode())
    out = []
    for e in encoded:
        h = head.copy()
        h.update(e)
        h.update(b"]")
        out.append(h.hexdigest())
    return out


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


# --- carrying a cache between machines as committed parts -------------------------------------------
# A long run spans sittings on machines that do not outlive them; the cache travels as gzipped SQLite
# parts in a folder (results/tune-cache/part-000.sqlite.gz, ...). A snapshot writes only the rows no
# earlier part holds, so a repository that commits each part grows by the new scores, not the whole cache.

def _parts(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.sqlite.gz"))


def _read_part(part: Path, columns: str) -> list[tuple]:
    """Rows of a gzipped part (``columns`` of its scores table)."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "part.sqlite"
        with gzip.open(part, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        db = sqlite3.connect(plain)
        try:
            return db.execute(f"SELECT {columns} FROM scores").fetchall()
        finally:
            db.close()


def restore_parts(folder: Path, cache_dir: Path) -> int:
    """Merge every part of ``folder`` into ``cache_dir``'s cache (rows already there are kept); the rows added."""
    db = ScoreCache(cache_dir)._db
    assert db is not None
    added = 0
    for part in _parts(folder):
        with db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO scores (key, value) VALUES (?, ?)", _read_part(part, "key, value"))
            added += db.total_changes - before
    db.close()
    return added


def snapshot_parts(cache_dir: Path, folder: Path) -> Path | None:
    """Write the rows of ``cache_dir``'s cache that no part of ``folder`` holds as the next part; None if there are none."""
    live = Path(cache_dir) / "scores.sqlite"
    if not live.is_file():
        raise LoopgraphError(f"no score cache at {live}; pass the --cache-dir the run used")
    parts = _parts(folder)
    known = {k for part in parts for (k,) in _read_part(part, "key")}
    src = sqlite3.connect(live)
    new = [(k, v) for k, v in src.execute("SELECT key, value FROM scores ORDER BY key") if k not in known]
    src.close()
    if not new:
        return None
    out = Path(folder) / f"part-{len(parts):03d}.sqlite.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "part.sqlite"
        db = sqlite3.connect(plain)
        db.execute("CREATE TABLE scores (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.executemany("INSERT INTO scores (key, value) VALUES (?, ?)", new)
        db.commit()
        db.close()
        partial = out.with_suffix(".partial")
        with open(plain, "rb") as f, open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            shutil.copyfileobj(f, gz, 1 << 22)
        partial.replace(out)  # a part appears whole or not at all
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import argparse  # only for the command line
    ap = argparse.ArgumentParser(prog="python -m loopgraph.eval.cache",
                                 description="carry a score cache between machines as gzipped parts in a folder")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("restore", help="merge every part of FOLDER into CACHE_DIR/scores.sqlite")
    s = sub.add_parser("snapshot", help="write CACHE_DIR's rows that no part of FOLDER holds as FOLDER's next part")
    for p in (r, s):
        p.add_argument("folder", type=Path)
        p.add_argument("cache_dir", type=Path)
    a = ap.parse_args(argv)
    try:
        _run(a)
    except (LoopgraphError, OSError, sqlite3.Error) as e:
        print(f"loopgraph: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(a) -> None:
    if a.cmd == "restore":
        print(f"restored {restore_parts(a.folder, a.cache_dir)} rows into {a.cache_dir / 'scores.sqlite'}")
    else:
        out = snapshot_parts(a.cache_dir, a.folder)
        print("nothing new to snapshot" if out is None else f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
