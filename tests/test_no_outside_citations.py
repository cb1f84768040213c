"""Everything the code cites lives in this repository (``docs/``): no file under ``moeconf/``, ``tests/``,
``examples/`` or ``clients/`` may point at working notes outside it (a path into the team's notes folder
beside the checkout, or a bare "notes §4.2"-style section reference)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("moeconf", "tests", "examples", "clients")
# The notes folder's path, assembled so that this file does not itself cite it.
NOTES_PATH = "/".join(("shared", "notes"))
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}

OUTSIDE_CITATION = re.compile(
    re.escape(NOTES_PATH)  # a path into the notes
    + r"|\bnotes?\s*§"  # "notes §9.5", "note §4.2"
    r"|\.md\s*§"  # "some-note.md §4": docs/ pages are cited by section name, never by § number
    r"|torch-npu-moe-ops\.md",  # the notes' file name (the doc is docs/torch-npu-ops.md)
    re.IGNORECASE,
)


def _scanned_files() -> list[Path]:
    me = Path(__file__).resolve()
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.resolve() != me and not SKIPPED_DIRS & set(path.relative_to(ROOT).parts):
                files.append(path)
    return files


def _citations(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []  # binary or unreadable: nothing a reader would follow
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), start=1)
        if OUTSIDE_CITATION.search(line)
    ]


def test_pattern_catches_the_forms_it_must() -> None:
    for cited in (
        f"see {NOTES_PATH}/regression-cases.md #8",
        "(notes §9.5)",
        "note §4.2 doc trap",
        "transformers-moe-landscape.md §4 R4",
        "semantics in torch-npu-moe-ops.md",
    ):
        assert OUTSIDE_CITATION.search(cited), cited
    for fine in (
        "see docs/torch-npu-ops.md, 'npu_moe_token_unpermute'",
        "docs/regression-cases.md #5",
        "the text report's notes rely on this",
    ):
        assert not OUTSIDE_CITATION.search(fine), fine


def test_scan_covers_the_package_and_the_tests() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _scanned_files()}
    assert "moeconf/npu/emulator.py" in names and "tests/seeded.py" in names
    assert "tests/test_no_outside_citations.py" not in names


@pytest.mark.parametrize("top", SCANNED)
def test_no_citation_of_notes_outside_the_repository(top: str) -> None:
    found = [c for p in _scanned_files() if p.relative_to(ROOT).parts[0] == top for c in _citations(p)]
    assert not found, (
        "cite docs/<page>.md (by section name) or state the fact instead of pointing at notes outside the "
        "repository:\n" + "\n".join(found)
    )
