"""The documentation in docs/ is what the code and the README cite: every cited page must exist, and every
relative link (with its #anchor) in README.md and docs/*.md must resolve.

Three checks:

* every ``docs/<page>`` path named in source files (Python, C++, CUDA, shell, TOML, the Makefile) and in the
  Markdown files exists in the repository;
* every relative Markdown link in README.md and docs/*.md points at an existing file, and its ``#anchor``,
  if any, at an existing heading of that file (GitHub's heading slugs);
* source files cite the documentation by its path (``docs/ops.md section 3.3``), never by a bare page name
  (``ops.md section 3.3``), which a reader of the code cannot locate.

These tests only read files; they need neither torch nor the compiled extension.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".sh", ".toml", ".cfg", ".txt"}
SOURCE_NAMES = {"Makefile", "setup.py", "pyproject.toml"}
# Folders that are not part of the checked-in sources: VCS data, virtual environments, build outputs,
# benchmark results. Symlinked folders are not followed (reasonrl/kernels -> kernels in a development tree).
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", "results", "node_modules",
             ".ruff_cache", ".pytest_cache", ".hypothesis", "site"}

# "docs/ops.md", "docs/assets/headline.png"; must start with a word character after "docs/", so a template
# such as "docs/<page>.md" is not a citation.
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w][\w./-]*")
# A documentation page named without its folder: "ops.md section 3.3", "(losses.md 13.1)", "style.md".
BARE_PAGE = re.compile(r"(?<![\w./-])(ops|losses|performance|style|rewards|numerics)\.md\b")
# "docs/ops.md section 3.3", "docs/losses.md sections 5-12", "docs/ops.md 2.3", "docs/losses.md, section
# 13.1", "docs/ops.md sections 2, 7 and 8", "docs/ops.md §4.3": the page and the section numbers after it.
SECTION_CITE = re.compile(
    r"docs/([\w-]+\.md),?\s+(?:sections?\s+|§\s*)?(\d+(?:\.\d+)*(?:\s*(?:,|and|-|–)\s*\d+(?:\.\d+)*)*)"
)
NUMBERED_HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def _walk(root: Path):
    for path in sorted(root.iterdir()):
        if path.is_symlink():
            continue
        if path.is_dir():
            if path.name in SKIP_DIRS or path.name.endswith(".egg-info"):
                continue
            yield from _walk(path)
        else:
            yield path


def _source_files() -> list[Path]:
    return [p for p in _walk(ROOT)
            if (p.suffix in SOURCE_SUFFIXES or p.name in SOURCE_NAMES) and p.resolve() != THIS]


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    docs = ROOT / "docs"
    if docs.is_dir():
        files += sorted(p for p in _walk(docs) if p.suffix == ".md")
    return files


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _strip_code(text: str, *, inline: bool = True) -> str:
    """The text with fenced code blocks blanked and (``inline``) inline code spans emptied, line numbers
    kept: what looks like a link inside code (``wrap_triton(kernel)[grid](...)``) is not one."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            out.append("")
            continue
        out.append("" if in_fence else INLINE_CODE.sub("``", line) if inline else line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than '-' and '_' dropped,
    spaces turned into hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = "".join(ch for ch in text if ch.isalnum() or ch in "-_ ")
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in _strip_code(md.read_text(encoding="utf-8"), inline=False).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _cited_docs_paths(path: Path) -> list[tuple[int, str]]:
    hits = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        for m in DOCS_PATH.finditer(line):
            hits.append((lineno, m.group(0).rstrip(".,;:")))
    return hits


def test_the_documentation_pages_exist():
    """The pages the code has always cited, and the table of contents."""
    for page in ("index.md", "ops.md", "losses.md", "performance.md", "benchmarks.md", "contributing.md"):
        assert (ROOT / "docs" / page).is_file(), f"docs/{page} is missing"


def test_every_cited_docs_path_exists():
    missing = []
    for path in _source_files() + _markdown_files():
        for lineno, cited in _cited_docs_paths(path):
            target = ROOT / cited
            if not (target.is_file() or target.is_dir()):
                missing.append(f"{_rel(path)}:{lineno}: {cited}")
    assert not missing, "paths under docs/ cited but not in the repository:\n" + "\n".join(missing)


def test_every_relative_markdown_link_resolves():
    broken = []
    for md in _markdown_files():
        text = _strip_code(md.read_text(encoding="utf-8"))
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in MD_LINK.finditer(line):
                url = m.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", url):  # http:, https:, mailto:
                    continue
                target_part, _, anchor = url.partition("#")
                target = (md.parent / target_part).resolve() if target_part else md.resolve()
                where = f"{_rel(md)}:{lineno}: {url}"
                try:
                    target.relative_to(ROOT)
                except ValueError:
                    broken.append(f"{where} (points outside the repository)")
                    continue
                if not target.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                    broken.append(f"{where} (no heading with anchor #{anchor} in {_rel(target)})")
    assert not broken, "broken links in the documentation:\n" + "\n".join(broken)


def _section_numbers(md: Path) -> set[str]:
    return {m.group(1) for line in _strip_code(md.read_text(encoding="utf-8"), inline=False).splitlines()
            if (m := NUMBERED_HEADING.match(line))}


def test_cited_section_numbers_exist():
    """'docs/ops.md section 3.3' must name a numbered heading of docs/ops.md (every number of a list or a
    range, such as 'sections 5-12', is checked)."""
    sections: dict[str, set[str]] = {}
    unknown = []
    for path in _source_files() + _markdown_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in SECTION_CITE.finditer(line):
                page = ROOT / "docs" / m.group(1)
                if not page.is_file():
                    continue  # reported by test_every_cited_docs_path_exists
                if page not in sections:
                    sections[page] = _section_numbers(page)
                for number in re.findall(r"\d+(?:\.\d+)*", m.group(2)):
                    if number not in sections[page]:
                        unknown.append(f"{_rel(path)}:{lineno}: {m.group(0)} (no section {number} in "
                                       f"docs/{m.group(1)})")
    assert not unknown, "citations of sections that do not exist:\n" + "\n".join(unknown)


def test_index_lists_every_page():
    docs = ROOT / "docs"
    index = (docs / "index.md").read_text(encoding="utf-8")
    linked = {m.group(1).partition("#")[0] for m in MD_LINK.finditer(index)}
    unlisted = [p.name for p in sorted(docs.glob("*.md")) if p.name != "index.md" and p.name not in linked]
    assert not unlisted, f"docs/index.md does not link these pages: {unlisted}"


def test_site_navigation_lists_every_page():
    """mkdocs.yml (the documentation site) names every page of docs/ in its nav, and only existing ones."""
    config = ROOT / "mkdocs.yml"
    if not config.exists():
        pytest.skip("no mkdocs.yml")
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*([\w./-]+\.md)\s*$", config.read_text(encoding="utf-8"), re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert nav <= pages, f"mkdocs.yml nav names missing pages: {sorted(nav - pages)}"
    assert pages <= nav, f"mkdocs.yml nav does not list: {sorted(pages - nav)}"


def test_sources_cite_docs_by_path():
    """A citation such as 'ops.md section 3.3' must read 'docs/ops.md section 3.3' (and 'style.md' is
    'docs/contributing.md'), so that a reader of the code can open the page it points at."""
    bare = []
    for path in _source_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in BARE_PAGE.finditer(line):
                bare.append(f"{_rel(path)}:{lineno}: {m.group(0)}")
    if bare:
        pytest.fail(
            f"{len(bare)} documentation citations without the docs/ prefix (write 'docs/<page>.md "
            "section N'; style.md is docs/contributing.md):\n" + "\n".join(bare[:60])
            + ("\n..." if len(bare) > 60 else "")
        )
