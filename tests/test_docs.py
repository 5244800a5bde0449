"""The README stays short and its commands and links stay true: at most 200 lines, the two
commands and the "Read next" links on its first screen, every relative link of the user docs
pointing at a file that exists, and no page naming the old config folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200
FIRST_SCREEN = 60

# The README's two commands, verbatim: .ci/run runs the second (tests/test_environment.py).
SET_UP = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock && pip install --no-deps -e ."
STUDY_COMMAND = f"```bash\n{SET_UP} && snakemake --cores all\n```"
TEST_COMMAND = f"```bash\n{SET_UP} && pytest\n```"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    """The Markdown pages whose links must resolve: the README, docs/ and config/README.md."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "config" / "README.md"]


def relative_links(text: str) -> list[str]:
    """Link targets outside code blocks and inline code, less web links and in-page anchors."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = [m.group(1) for m in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t)]


def read_next(text: str) -> str:
    match = re.search(r"^## Read next\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert match, "the README has a '## Read next' section"
    return match.group(1)


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_first_screen_holds_the_two_commands():
    first = "\n".join(README.read_text().splitlines()[:FIRST_SCREEN])
    assert STUDY_COMMAND in first, "the study command, verbatim, in the README's first 60 lines"
    assert TEST_COMMAND in first, "the test command, verbatim, in the README's first 60 lines"


def test_first_screen_links_every_page_read_next_names():
    text = README.read_text()
    named = [t.split("#")[0] for t in relative_links(read_next(text)) if t.startswith("docs/")]
    assert len(named) >= 10, f"'Read next' names the docs pages: {named}"
    first = "\n".join(text.splitlines()[:FIRST_SCREEN])
    on_first_screen = {t.split("#")[0] for t in relative_links(first)}
    missing = [page for page in named if page not in on_first_screen]
    assert not missing, f"'Read next' pages not linked in the README's first {FIRST_SCREEN} lines: {missing}"


def test_read_next_names_every_docs_page():
    named = {t.split("#")[0] for t in relative_links(read_next(README.read_text()))}
    pages_on_disk = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert not pages_on_disk - named, f"docs pages the README's 'Read next' does not link: {sorted(pages_on_disk - named)}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    broken = []
    for target in relative_links(page.read_text()):
        path = target.split("#")[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_link_finder_sees_links_and_skips_code():
    text = "see [a](docs/a.md#x) and ![f](f.png), [w](https://x.org), [h](#top)\n`[c](no.md)`\n```\n[d](no.md)\n```\n"
    assert relative_links(text) == ["docs/a.md#x", "f.png"]


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_no_page_names_the_old_config_folder(page):
    assert "workflow/configs/" not in page.read_text(), f"{page.name} names workflow/configs/ (studies live in config/)"
