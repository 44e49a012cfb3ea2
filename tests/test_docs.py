"""The README is one screen with docs/ behind it: short, undated, every page one link away, and no
link that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
INDEX = REPO / "docs" / "index.md"
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    """Every documentation page: docs/**/*.md and the benchmarks' measurements."""
    return sorted([*(REPO / "docs").rglob("*.md"), REPO / "benchmarks" / "README.md"])


def relative_links(page: Path) -> list[str]:
    """The targets of `page`'s Markdown links outside code blocks, less web addresses."""
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def linked(page: Path) -> set[Path]:
    """The files `page` links to, resolved."""
    return {(page.parent / t.split("#", 1)[0]).resolve()
            for t in relative_links(page) if not t.startswith("#")}


def test_the_readme_fits_one_screen_of_200_lines() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_has_no_dates() -> None:
    dates = re.findall(r"20\d\d-\d\d-\d\d", README.read_text())
    assert not dates, f"dated text belongs in docs/ or benchmarks/README.md: {dates}"


def test_the_readme_has_no_measured_ratios() -> None:
    ratios = re.findall(r"\d[\d.–-]*×", README.read_text())
    assert not ratios, f"measurements belong in benchmarks/README.md: {ratios}"


def test_every_page_is_one_link_from_the_readme_or_its_index() -> None:
    from_readme = linked(README)
    assert INDEX.resolve() in from_readme
    reachable = from_readme | linked(INDEX)
    missing = [str(p.relative_to(REPO)) for p in pages() if p.resolve() not in reachable]
    assert not missing, f"not linked from README.md or docs/index.md: {missing}"


@pytest.mark.parametrize("page", [README, *pages()], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        missing_anchor = anchor and file.suffix == ".md" and anchor not in anchors(file)
        if not file.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links to nothing: {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) [b](page.md#nowhere) [c](https://example.org)\n"
                    "```\n[d](in-code.md)\n```\n")
    assert relative_links(page) == ["missing.md", "page.md#nowhere"]
    assert "nowhere" not in anchors(page)
