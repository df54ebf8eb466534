"""The documentation stays true to the repository: the benchmarks page is what its generator gives now,
every relative link (and heading anchor) resolves, and nothing refers to files outside the repository.

Pure file reading: no Ray, no torch; well under a second.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ["pipelines", "vision", "benchmarks", "tests", "cluster"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ".sh", ".cfg", ".ini"}
# Spelled in pieces so that this file does not match itself.
OUTSIDE = [
    re.compile(re.escape("DES" + "IGN.md")),
    re.compile(re.escape("..") + r"/(?:DES" + "IGN|sha" + r"red)\b"),
    re.compile(re.escape("/wo" + "rk/") + r"(?:sha" + r"red|main)\b"),
]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: links become their text, lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            anchors.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return anchors


def test_benchmarks_page_is_generated():
    want = report.render()
    have = report.OUTPUT.read_text() if report.OUTPUT.is_file() else ""
    assert have == want, "docs/benchmarks.md differs from its results: run `python -m benchmarks.report`"


def test_generator_marks_what_a_results_file_lacks(tmp_path):
    (tmp_path / "bare.json").write_text('{"ratio": 0.5}')
    (tmp_path / "full.json").write_text('{"command": "python -m benchmarks.x --n 3", "date": "2026-01-01", '
                                        '"load_average": [1.5, 1.2, 1.0], "cores": 8, "ratio": 0.5}')
    text = report.render(tmp_path)
    bare = text.split("## bare", 1)[1].split("## full", 1)[0]
    full = text.split("## full", 1)[1].split("## Limits", 1)[0]
    for what in ("command", "date", "load average", "cores"):
        assert f"- {what}: not recorded" in bare
        assert f"- {what}: not recorded" not in full
    assert "`python -m benchmarks.x --n 3`" in full and "1.5, 1.2, 1" in full and "- cores: 8" in full
    assert "- None of the results files records a GPU run." in text
    (tmp_path / "gpu_check.json").write_text('{"device": "cuda:0", "checks": {}}')  # it said "none" regardless
    assert "- GPU runs: gpu_check; every other file was measured on a CPU." in report.render(tmp_path)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    bad = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(bad)


def test_docs_pages_are_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(readme.read_text()))}
    missing = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("doc", DOCS[1:], ids=lambda p: p.name)
def test_every_docs_page_ends_with_its_limits(doc):
    headings = [line for line in _prose(doc.read_text()).splitlines() if line.startswith("## ")]
    assert headings and headings[-1].strip() == "## Limits", f"{doc.name}: the last section must be '## Limits'"


def _repo_text_files():
    yield from DOCS
    for d in CODE_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and (p.suffix in TEXT_SUFFIXES or p.name == "Dockerfile"):
                yield p


def test_nothing_refers_outside_the_repository():
    bad = []
    for p in _repo_text_files():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if any(rx.search(line) for rx in OUTSIDE):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not bad, "references to files outside the repository:\n  " + "\n  ".join(bad)
