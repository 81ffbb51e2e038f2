"""The docs point at what exists: the files the architecture and the API reference name, and
every section a doc or a docstring cites by its title."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("contract", "core", "service", "workers", "robustscope", "migrations", "benchmarks",
       "tests", "scripts", "docs")
#: ``ARCHITECTURE.md, "Storage and many hosts"`` or ``SECURITY.md ("The API")``.
CITATION = re.compile(r"\b([A-Z]+)\.md(?:, | \()\"([^\"]+)\"")


def named_paths(text: str) -> set[str]:
    """Repository paths written in backticks: ``workers/jobs.py``,
    ``workers/sandbox/remote.py::RemoteModel`` and ``workers/engine/runner.py: merge_states``
    name the file; a pattern (``<id>``, ``{id}``, ``*``) names none."""
    found = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        path = re.split(r"::|:\s", span)[0].rstrip(",.;")
        if path.split("/")[0] in TOP and "/" in path and not re.search(r"[<{*\s]", path):
            found.add(path)
    return found


def headings(text: str) -> list[str]:
    """A markdown file's headings, outside fenced code."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    return found


def citations(text: str) -> set[tuple[str, str]]:
    return set(CITATION.findall(re.sub(r"\s+", " ", text)))


def test_named_paths_exist() -> None:
    missing = [f"{doc}: {path}" for doc in ("ARCHITECTURE.md", "API.md")
               for path in sorted(named_paths((ROOT / "docs" / doc).read_text()))
               if not (ROOT / path).exists()]
    assert missing == []


def test_cited_sections_exist() -> None:
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
               *(p for top in TOP for p in (ROOT / top).rglob("*.py")
                 if p != Path(__file__).resolve())]
    titles = {p.stem: headings(p.read_text()) for p in (ROOT / "docs").glob("*.md")}
    titles["README"] = headings((ROOT / "README.md").read_text())
    cited = {(source.relative_to(ROOT), doc, title) for source in sources
             for doc, title in citations(source.read_text())}
    assert len(cited) >= 10
    assert sorted((str(s), d, t) for s, d, t in cited
                  if not any(h.startswith(t) for h in titles.get(d, []))) == []


def test_the_readers_see_what_they_look_for() -> None:
    text = ("`workers/jobs.py`, `workers/sandbox/remote.py::RemoteModel`, "
            "`workers/engine/runner.py: merge_states`, `state/<job id>/`, `workers/*_jobs.py`, "
            "`service/http`, `POST /models`, `a/b`")
    assert named_paths(text) == {"workers/jobs.py", "workers/sandbox/remote.py",
                                 "workers/engine/runner.py", "service/http"}
    assert headings("# A\n```\n# not one\n```\n## B: more\n") == ["A", "B: more"]
    assert citations('(docs/ARCHITECTURE.md, "The\n  sandbox") and SECURITY.md ("The API")') == {
        ("ARCHITECTURE", "The sandbox"), ("SECURITY", "The API")}
