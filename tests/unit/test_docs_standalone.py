"""The repository stands alone: code and docs cite its own docs/, never an outside design document.

Code and docs point to a section of a page in docs/ (or the README) as ``docs/PAGE.md, Section``
(a step of a numbered section as ``Section N``); this checks that no file cites the outside
document, and that every section cited that way is a heading of the page it names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("service", "workers", "client", "benchmarks", "docs", "deploy", "tests")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml", "docker-compose.yml")
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".sh", ".txt", ""}
OUTSIDE = re.compile(r"\b" + "DES" + r"IGN\b")
"""The outside design document's name (spelled in two parts, so this file does not cite it)."""
CITATION = re.compile(r"\b((?:docs/)?[a-z_]+\.md|README\.md), ([A-Z][A-Za-z ]*[A-Za-z])(?: (\d+))?")
"""``PAGE.md, Section`` and ``PAGE.md, Section N`` (a numbered step of the section)."""
STEP = re.compile(r"^(\d+)\. ")


def _files() -> list[Path]:
    found = [ROOT / name for name in TOP_FILES if (ROOT / name).is_file()]
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                found.append(path)
    return found


def _page(cited: str) -> Path:
    """The page a citation names: README.md at the root, every other page in docs/."""
    return ROOT / "README.md" if cited == "README.md" else ROOT / "docs" / Path(cited).name


def _sections(page: Path) -> dict[str, int]:
    """Heading text -> how many numbered steps (``1. ...``) the section's body has."""
    sections: dict[str, int] = {}
    current: str | None = None
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if line.startswith("#"):
            current = line.lstrip("#").strip()
            sections[current] = 0
        elif current is not None and (step := STEP.match(line)):
            sections[current] = max(sections[current], int(step.group(1)))
    return sections


def test_no_file_cites_the_outside_design_document() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _files()
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "cite a section of docs/ instead:\n" + "\n".join(hits)


def test_every_cited_section_is_a_heading_of_its_page() -> None:
    cited = 0
    bad = []
    for path in _files():
        text = path.read_text(errors="replace")
        # a citation may wrap across lines in a docstring or a paragraph
        for match in CITATION.finditer(re.sub(r"\s*\n\s*", " ", text)):
            page = _page(match.group(1))
            if not page.is_file():
                continue  # a page name in another sense (a file the code writes)
            cited += 1
            section, step = match.group(2), match.group(3)
            sections = _sections(page)
            where = f"{path.relative_to(ROOT)}: {match.group(0)!r}"
            parts = [section] if section in sections else section.split(" and ")
            if any(part not in sections for part in parts):  # "A and B": two sections
                bad.append(f"{where}: no heading {section!r} in {page.relative_to(ROOT)}")
            elif step is not None and not 1 <= int(step) <= sections.get(section, 0):
                bad.append(f"{where}: {section!r} has steps 1..{sections[section]}")
    assert not bad, "\n".join(bad)
    assert cited >= 30, cited  # the citations are found at all


@pytest.mark.parametrize(
    ("page", "section", "steps"),
    [
        ("docs/architecture.md", "The method", 9),
        ("docs/architecture.md", "Distributed shape", 6),
        ("docs/architecture.md", "Dependency rules", 0),
        ("docs/reliability.md", "Persistence", 0),
        ("docs/benchmarks.md", "Targets", 0),
        ("README.md", "Command line", 0),
    ],
)
def test_the_design_sections_exist(page: str, section: str, steps: int) -> None:
    sections = _sections(ROOT / page)
    assert section in sections
    assert sections[section] == steps
