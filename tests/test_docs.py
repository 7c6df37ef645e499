"""The documentation holds together: relative links resolve, the README stays a short entry point.

No network: only relative links are checked (targets on disk, ``#anchors`` against the target's headings
with GitHub's slug rules); ``http(s)://`` and ``mailto:`` links are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loopgraph.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def doc_files() -> list[Path]:
    """README.md, docs/*.md and benchmarks/README.md: the pages a reader follows links through."""
    files = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def prose(text: str) -> str:
    """The text without fenced code blocks (their '#' lines are comments, their brackets code)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """Every anchor GitHub gives the headings of ``md`` (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in HEADING.findall(prose(md.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    """Relative links in ``md`` whose file does not exist or whose #anchor names no heading."""
    problems = []
    text = INLINE_CODE.sub("", prose(md.read_text(encoding="utf-8")))
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path_part, _, fragment = target.partition("#")
        dest = (md.parent / path_part).resolve() if path_part else md
        if not dest.exists():
            problems.append(f"{md.relative_to(root)}: link {target!r}: {path_part} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{md.relative_to(root)}: link {target!r}: no heading with anchor #{fragment} "
                            f"in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    problems = broken_links(md)
    assert not problems, "broken relative links (fix the target or the heading):\n" + "\n".join(problems)


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference material to a docs/ page "
        "and link it")


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:8])
    assert "make demo" in head and "make test" in head, "README.md must show `make demo` and `make test` at the top"


def test_readme_shows_every_subcommand() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    examples = "\n".join(m.group(0) for m in FENCE.finditer(readme))
    missing = [name for name in sub.choices if not re.search(rf"loopgraph {re.escape(name)}\b", examples)]
    assert not missing, f"README.md has no worked example (a code block running `loopgraph NAME`) for: {missing}"


def test_checker_catches_a_broken_link_and_anchor(tmp_path: Path) -> None:
    # the checker itself must be able to fail: a missing file, a missing anchor; a link in code is no link
    (tmp_path / "other.md").write_text("# A `code` heading (x)\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-code-heading-x) [ok](other.md#twice-1) [bad](missing.md) "
                    "[bad](other.md#nope) `[code](missing2.md)`\n\n```\n[fenced](missing3.md)\n```\n",
                    encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md does not exist" in problems[0]
    assert "#nope" in problems[1]
