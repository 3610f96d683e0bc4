"""The README and docs/ stay navigable: every relative link resolves, the README stays short, and
the README's test command (read by .ci/run) is where CI looks for it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def md_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def strip_code(text: str) -> str:
    """Markdown text without fenced blocks and code spans (links are not parsed inside them)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Targets of the inline links and images and of the reference definitions in `text`."""
    body = strip_code(text)
    return _INLINE.findall(body) + _REFDEF.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = _CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading).strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `path` whose file (or heading anchor in a .md file) is missing."""
    bad = []
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.relative_to(root)}: {target} (no heading #{anchor})")
    return bad


def test_checker_finds_broken_links(tmp_path):
    # the checker itself must be able to fail: a missing file, a missing anchor, and links hidden
    # in code (not links) are told apart from good ones
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "b.md").write_text("# Some Title (v2)\n\n## `code` heading\n")
    doc = tmp_path / "a.md"
    doc.write_text("![ok](x.png) [ok](b.md#some-title-v2) [ok](b.md#code-heading) "
                   "[web](https://example.org/nope.md) [gone](missing.md) "
                   "[bad anchor](b.md#nowhere)\n`[not](a-link.md)`\n```\n[no](code.md)\n```\n"
                   "[ref]: also-missing.png\n")
    assert broken_links(doc, root=tmp_path) == [
        "a.md: missing.md (no such file)",
        "a.md: b.md#nowhere (no heading #nowhere)",
        "a.md: also-missing.png (no such file)",
    ]


@pytest.mark.parametrize("path", md_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines; move detail into docs/ (max {README_MAX_LINES})")


def test_readme_links_the_docs_index():
    assert "docs/index.md" in links(README.read_text(encoding="utf-8"))


def test_docs_index_lists_every_page():
    listed = {Path(t.partition("#")[0]).name for t in links((DOCS / "index.md").read_text())}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - listed == set(), "docs pages missing from docs/index.md"


def test_docs_pages_start_with_a_summary():
    # one topic a page: a title, then a paragraph of prose (not a table, list or code block)
    for page in sorted(DOCS.glob("*.md")):
        blocks = [b.strip() for b in page.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        assert blocks[0].startswith("# "), f"{page.name}: no title"
        assert len(blocks) > 1 and not blocks[1].startswith(("#", "|", "* ", "- ", "```", "!",
                                                              "<")), (
            f"{page.name}: no summary paragraph")


def test_readme_test_command_is_where_ci_reads_it():
    text = README.read_text(encoding="utf-8")
    assert text.count("<!-- test-command -->") == 1 and text.count("<!-- /test-command -->") == 1
    block = text.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    m = re.fullmatch(r"\s*```[^\n]*\n(.+?)\n```\s*", block, re.S)
    assert m, "the test-command markers must hold exactly one fenced code block"
    cmd = m.group(1).strip()
    assert "pytest" in cmd and "pip install" in cmd
    # the same extraction as .ci/run
    ci = subprocess.run(
        ["bash", "-c", "awk '/<!-- test-command -->/{f=1;next}/<!-- \\/test-command -->/{f=0}f' "
         "README.md | sed -n '/^```/,/^```/p' | sed '/^```/d'"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert ci == cmd
