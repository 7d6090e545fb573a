"""The README and docs/: every relative link reaches a file and, with a #fragment, a heading there
(anchors made as GitHub makes them), and every test a page names as evidence exists."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); a target has no spaces or parentheses in these pages.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A test named as evidence: `S/test_x.py::test_y`, `tests/unit/test_x.py`, or `::test_z` after one.
TEST_DIRS = {"S": "tests/security", "U": "tests/unit", "I": "tests/integration", "E": "tests/e2e"}
TEST_REFERENCE = re.compile(
    r"^(?:(?P<dir>[SUIE]|tests/(?:security|unit|integration|e2e|fuzz))/(?P<file>[\w/]+\.py))?(?:::(?P<name>\w+))?$"
)


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    text: str
    code_spans: tuple[str, ...]


def prose_lines(text: str) -> list[Line]:
    """The lines outside fenced code blocks, with their inline code taken out (kept apart)."""
    lines: list[Line] = []
    fenced = False
    for number, raw in enumerate(text.splitlines(), 1):
        if FENCE.match(raw):
            fenced = not fenced
            continue
        if fenced:
            continue
        spans = tuple(match.group(2).strip() for match in CODE_SPAN.finditer(raw))
        lines.append(Line(number, CODE_SPAN.sub(lambda match: match.group(2), raw), spans))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, letters, digits, `_`, `-` and spaces kept, spaces
    as hyphens (markup gone: code spans keep their text, links their text, emphasis nothing)."""
    text = CODE_SPAN.sub(lambda match: match.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("*", "")
    kept = (
        char
        for char in text.lower()
        if char in " -_" or unicodedata.category(char)[0] in "LN" or unicodedata.category(char) == "Mn"
    )
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, a repeated one with -1, -2, ... as GitHub numbers them."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for raw in text.splitlines():
        if FENCE.match(raw):
            fenced = not fenced
            continue
        match = HEADING.match(raw)
        if fenced or match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return [(line.number, match.group(1)) for line in prose_lines(text) for match in LINK.finditer(line.text)]


def broken_link(page: Path, target: str) -> str | None:
    """What is wrong with ``target`` as a link on ``page``, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... : not checked offline
        return None
    path_part, _, fragment = target.partition("#")
    destination = (page.parent / path_part).resolve() if path_part else page
    shown = destination.relative_to(ROOT) if destination.is_relative_to(ROOT) else destination
    if not destination.exists():
        return f"no file {shown}"
    if fragment:
        if destination.suffix != ".md":
            return f"#{fragment} into {shown}, which is not markdown"
        if fragment not in anchors(destination.read_text(encoding="utf-8")):
            return f"no heading with anchor #{fragment} in {shown}"
    return None


def named_tests(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, test file, test name) of every test the page names. A bare ``::name`` belongs to the
    last file named in the same table row or paragraph."""
    found: list[tuple[int, str, str | None]] = []
    current: str | None = None
    for line in prose_lines(page.read_text(encoding="utf-8")):
        if not line.text.strip() or line.text.lstrip().startswith("|"):
            current = None  # a paragraph ends; each table row stands alone
        for span in line.code_spans:
            match = TEST_REFERENCE.match(span)
            if match is None or not (match.group("file") or match.group("name")):
                continue
            if match.group("file"):
                directory = TEST_DIRS.get(match.group("dir"), match.group("dir"))
                current = f"{directory}/{match.group('file')}"
            elif current is None:
                continue  # a driver suite's own test (docs/compatibility.md), not one of ours
            found.append((line.number, current, match.group("name")))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_heading(page: Path) -> None:
    problems = [
        f"{page.relative_to(ROOT)}:{number}: ({target}) {problem}"
        for number, target in links(page)
        if (problem := broken_link(page, target)) is not None
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_test_a_page_names_exists(page: Path) -> None:
    problems = []
    for number, file, name in named_tests(page):
        path = ROOT / file
        if not path.is_file():
            problems.append(f"{page.relative_to(ROOT)}:{number}: no test file {file}")
        elif name is not None and not re.search(
            rf"^\s*(?:async\s+def|def|class)\s+{name}\b", path.read_text(encoding="utf-8"), re.MULTILINE
        ):
            problems.append(f"{page.relative_to(ROOT)}:{number}: {file} has no {name}")
    assert not problems, "\n".join(problems)


def test_the_security_page_names_every_attack_module() -> None:
    """The guarantees are shown by tests/security/: each of its test modules is on the page."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    missing = [
        path.name for path in sorted((ROOT / "tests" / "security").glob("test_*.py")) if path.name not in text
    ]
    assert not missing, f"docs/security.md does not name {missing}"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("All cores: `--workers N`", "all-cores---workers-n"),
        (
            "Idle memory on a non-blocking `ssl.SSLSocket` (2026-11-30, late)",
            "idle-memory-on-a-non-blocking-sslsslsocket-2026-11-30-late",
        ),
        ("What `make test` runs", "what-make-test-runs"),
        ("The demo's PostgreSQL", "the-demos-postgresql"),
        ("PCI DSS v4.0 requirement 10.2.2", "pci-dss-v40-requirement-1022"),
        ("Policy workflow: learn, review, approve, enforce", "policy-workflow-learn-review-approve-enforce"),
        ("`max_rows` and **bold** [link](x.md)", "max_rows-and-bold-link"),
    ],
)
def test_anchors_are_made_as_github_makes_them(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor_and_code_blocks_have_none() -> None:
    text = "# Notes\n\n## Run\n\n```sh\n# not a heading\n```\n\n## Run\n"
    assert anchors(text) == {"notes", "run", "run-1"}


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Known heading\n", encoding="utf-8")
    assert broken_link(page, "#known-heading") is None
    assert broken_link(page, "https://example.com/x#y") is None
    assert broken_link(page, "#unknown") is not None
    assert broken_link(page, "missing.md") is not None
    assert broken_link(page, "page.md#known-heading") is None


def test_a_bare_test_name_belongs_to_the_file_named_before_it_in_its_row_or_paragraph(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "| guarantee | `S/test_a.py::test_one`, `::test_two` |\n"
        "| next row | `::test_three` |\n"
        "\n"
        "See `tests/unit/test_b.py` and\n`::test_four`; then a driver's own `test_sql::test_x`.\n",
        encoding="utf-8",
    )
    assert named_tests(page) == [
        (1, "tests/security/test_a.py", "test_one"),
        (1, "tests/security/test_a.py", "test_two"),
        (4, "tests/unit/test_b.py", None),
        (5, "tests/unit/test_b.py", "test_four"),
    ]
