"""The score cache travels between machines as parts: each snapshot holds only rows no earlier part has."""

import gzip
import sqlite3

import pytest

from loopgraph.eval.cache import ScoreCache, main, restore_parts, snapshot_parts
from loopgraph.eval.scoring import Score


def rows(path):
    return dict(sqlite3.connect(path).execute("SELECT key, value FROM scores"))


def part_rows(part, tmp_path):
    plain = tmp_path / "plain.sqlite"
    plain.write_bytes(gzip.decompress(part.read_bytes()))
    return rows(plain)


def test_snapshot_writes_only_new_rows_and_restore_merges_them(tmp_path):
    live, parts = tmp_path / "live", tmp_path / "parts"
    cache = ScoreCache(live)
    cache.put({"a": [Score(-1.5, True)], "b": [Score(-2.0, False)]})
    first = snapshot_parts(live, parts)
    assert first.name == "part-000.sqlite.gz" and set(part_rows(first, tmp_path)) == {"a", "b"}
    assert snapshot_parts(live, parts) is None  # nothing new: no empty part
    cache.put({"c": [Score(-0.25, True)]})
    cache.close()
    second = snapshot_parts(live, parts)
    assert second.name == "part-001.sqlite.gz" and set(part_rows(second, tmp_path)) == {"c"}

    fresh = tmp_path / "fresh"
    assert restore_parts(parts, fresh) == 3
    assert rows(fresh / "scores.sqlite") == rows(live / "scores.sqlite")
    assert restore_parts(parts, fresh) == 0  # restoring twice adds nothing
    assert ScoreCache(fresh).get(["c"]) == {"c": [Score(-0.25, True)]}


def test_snapshot_without_a_cache_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["snapshot", str(tmp_path / "parts"), str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("loopgraph: error: no score cache at ") and "--cache-dir" in err and err.count("\n") == 1
    assert not (tmp_path / "parts").exists()
