"""The README stays short and its commands and links stay true: at most 200 lines, the two
commands and the "Read next" links on its first screen, every relative link of the user docs
pointing at a file that exists, and no page naming the old config folder.

Docs that cannot rot: every fenced block of the user docs names its language, and every shell
block (info string ``bash``, ``sh``, ``console`` or ``shell``) is marked either runnable
(```` ```bash runnable ````, or ``sh runnable``) or illustrative (```` ```bash illustrative ````;
renderers read the first word only, so GitHub still highlights it as bash). Each runnable block
runs here, from the repository root, under ``bash -euo pipefail``, offline (HF_HUB_OFFLINE=1,
SAEFT_TRACKING=off, SAEFT_WORKER=off), with HOME and every ``snakemake``'s working directory in a
scratch folder (``$DOCS_TMP``): runnable means a command that needs nothing but the checkout and
takes seconds (``saeft --help``, ``snakemake -n ...``). Whole studies, installs, cluster and GPU
commands, servers (``mlflow ui``) and anything that needs downloaded data are illustrative."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

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


# --- shell blocks: marked, and the runnable ones run ---------------------------------------------

SHELL_LANGUAGES = {"bash", "sh", "console", "shell"}
RUNNABLE_LANGUAGES = {"bash", "sh"}  # console blocks hold prompts and output: illustrative only
MARKS = {"runnable", "illustrative"}
BLOCK_TIMEOUT_S = 300
OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")

# The README's two commands keep the info string exactly `bash`: tests/test_environment.py finds
# them with the pattern ```bash\n(python3 -m venv .*)\n``` and .ci/run runs the test command
# verbatim (CI itself runs it; the study command is the whole default study, 23 minutes). They
# count as illustrative here; the marking check names any other unmarked block.
ALLOWED_UNMARKED = {
    ("README.md", STUDY_COMMAND.split("\n")[1]),
    ("README.md", TEST_COMMAND.split("\n")[1]),
}


@dataclass(frozen=True)
class Block:
    """A fenced block: where it opens (file and 1-based line of the fence), its info string's
    words and its text, less the fence's indentation."""

    file: str
    line: int
    words: tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def language(self) -> str:
        return self.words[0].lower() if self.words else ""

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES

    @property
    def marks(self) -> set[str]:
        return MARKS & {w.lower() for w in self.words[1:]}

    @property
    def runnable(self) -> bool:
        return self.is_shell and self.marks == {"runnable"} and self.language in RUNNABLE_LANGUAGES


def fenced_blocks(text: str, file: str) -> list[Block]:
    """Every fenced block of a Markdown text, indented ones (in list items) included: a fence of
    three or more backticks or tildes, closed by a fence of the same character at least as long."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), len(lines))
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[i + 1:end]]
        blocks.append(Block(file, i + 1, tuple(opening["info"].split()), "\n".join(body) + "\n"))
        i = end + 1
    return blocks


def doc_blocks() -> list[Block]:
    return [b for page in pages() for b in fenced_blocks(page.read_text(), str(page.relative_to(ROOT)))]


def unmarked(blocks: list[Block]) -> list[str]:
    """'file:line: why' for each shell block marked neither runnable nor illustrative (or both,
    or runnable in a language that does not run), less the allow-list."""
    problems = []
    for block in blocks:
        if not block.is_shell or (block.file, block.text.strip()) in ALLOWED_UNMARKED:
            continue
        if len(block.marks) != 1:
            problems.append(f"{block.where}: ```{' '.join(block.words)}: mark it 'runnable' or 'illustrative'")
        elif block.marks == {"runnable"} and block.language not in RUNNABLE_LANGUAGES:
            problems.append(f"{block.where}: ```{' '.join(block.words)}: only bash and sh blocks run")
    return problems


def run_block(block: Block, scratch: Path) -> subprocess.CompletedProcess:
    """Run a block's text under bash -euo pipefail from the repository root: offline, no tracking
    and no worker, HOME and DOCS_TMP in `scratch`, and `snakemake` a shim that puts every run's
    working directory (.snakemake, results/, logs/) in $DOCS_TMP."""
    docs_tmp, home, shims = scratch / "docs_tmp", scratch / "home", scratch / "bin"
    for folder in (docs_tmp, home, shims):
        folder.mkdir(parents=True, exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)
    path = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    snakemake = shutil.which("snakemake", path=path)
    assert snakemake, "snakemake on PATH"
    shim = shims / "snakemake"
    shim.write_text(f'#!/bin/sh\nexec {snakemake!s} --directory "$DOCS_TMP" "$@"\n')  # a later -d wins
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{path}", "HOME": str(home), "DOCS_TMP": str(docs_tmp),
           "HF_HUB_OFFLINE": "1", "SAEFT_TRACKING": "off", "SAEFT_WORKER": "off", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)


def test_every_fenced_block_names_its_language():
    """A command in a block with no info string would escape the checks below."""
    bare = [b.where for b in doc_blocks() if not b.words]
    assert not bare, f"fenced blocks with no info string (```text for plain text, ```bash ... for commands): {bare}"


def test_every_shell_block_is_marked_runnable_or_illustrative():
    problems = unmarked(doc_blocks())
    assert not problems, "unmarked shell blocks (see tests/test_docs.py):\n" + "\n".join(problems)


RUNNABLE = [b for b in doc_blocks() if b.runnable]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_block_runs(block, tmp_path):
    result = run_block(block, tmp_path)
    assert result.returncode == 0, f"{block.where}: exit {result.returncode}\n{block.text}\n{result.stdout[-4000:]}"


def test_the_docs_have_runnable_blocks():
    assert RUNNABLE, "no runnable shell block in the docs: the harness would check nothing"


SYNTHETIC = """# A page

Some prose.

```bash runnable
saeft no-such-command
```

- a list item:

  ```bash
  echo unmarked
  ```

```console illustrative
$ saeft --help
```

```sh runnable
true
```
"""


def test_block_finder_sees_indented_fences_and_marks():
    blocks = fenced_blocks(SYNTHETIC, "page.md")
    assert [(b.line, b.words) for b in blocks] == [
        (5, ("bash", "runnable")), (11, ("bash",)), (15, ("console", "illustrative")), (19, ("sh", "runnable"))]
    assert blocks[1].text == "echo unmarked\n"
    assert [b.runnable for b in blocks] == [True, False, False, True]


def test_the_marking_check_names_an_unmarked_block():
    problems = unmarked(fenced_blocks(SYNTHETIC, "page.md"))
    assert len(problems) == 1 and problems[0].startswith("page.md:11: ```bash:"), problems


def test_a_broken_runnable_block_fails(tmp_path):
    [broken] = [b for b in fenced_blocks(SYNTHETIC, "page.md") if "no-such-command" in b.text]
    result = run_block(broken, tmp_path)
    assert result.returncode != 0 and "no-such-command" in result.stdout, result.stdout


def test_blocks_run_offline_with_snakemake_in_the_scratch_folder(tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text("rule all:\n    output: 'done.txt'\n    shell: 'touch {output}'\n")
    script = (f'test "$HF_HUB_OFFLINE" = 1 && test "$SAEFT_TRACKING" = off && test "$SAEFT_WORKER" = off\n'
              f'test "$HOME" != "{Path.home()}"\n'
              f"snakemake --cores 1 --quiet -s {snakefile}\n"
              'test -f "$DOCS_TMP/done.txt"\n')
    result = run_block(Block("page.md", 1, ("bash", "runnable"), script), tmp_path / "scratch")
    assert result.returncode == 0, result.stdout
    assert (tmp_path / "scratch" / "docs_tmp" / "done.txt").exists() and not (ROOT / "done.txt").exists()


# --- tables: each one quotes a run's table file, or says why it does not -------------------------
#
# Every Markdown table of README.md and docs/*.md has an HTML comment on the line just above it:
#
#   <!-- table from docs/results/default/tables/shifts.md -->
#       its header, alignment row and data rows appear in that file, verbatim (less each line's
#       leading and trailing whitespace) and in order: one table of the file with the same header
#       and alignment row holds every quoted data row, in the same order (a subset may be quoted).
#       The file lies under docs/results/, the snapshot of the run the docs quote
#       (docs/results/README.md says which run, and how to refresh it);
#   <!-- table: not from a run file: <why> -->
#       a layout table, numbers from the literature, a benchmark's printout, a run whose files
#       are not kept here.
#
# docs/calibration.md is left out: its tables are printouts of calibration probes, not of a run.

RUN_TABLES = ROOT / "docs" / "results"
TABLES_UNCHECKED = {"docs/calibration.md"}
FROM_FILE = re.compile(r"^\s*<!-- table from (?P<file>\S+) -->\s*$")
NOT_FROM_FILE = re.compile(r"^\s*<!-- table: not from a run file: (?P<why>\S.*?)\s*-->\s*$")
ALIGNMENT_ROW = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


@dataclass(frozen=True)
class Table:
    """A Markdown table outside fenced blocks: its header's 1-based line, the line above it and
    its lines (header, alignment row, data rows), each stripped."""

    file: str
    line: int
    above: str
    rows: tuple[str, ...]


def fenced_lines(lines: list[str]) -> set[int]:
    """0-based indices of the lines inside fenced blocks, fences included (as fenced_blocks)."""
    inside, i = set(), 0
    while i < len(lines):
        opening = OPENING.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), len(lines))
        inside.update(range(i, min(end + 1, len(lines))))
        i = end + 1
    return inside


def tables(text: str, file: str) -> list[Table]:
    """Every table outside fenced blocks, found as GitHub does: a row with a pipe, then an
    alignment row with a pipe; the table runs to the first blank line or line with no pipe."""
    lines, found, i = text.splitlines(), [], 1
    fenced = fenced_lines(lines)
    while i < len(lines):
        header, alignment = lines[i - 1], lines[i]
        if (i - 1 in fenced or i in fenced or "|" not in header or "|" not in alignment
                or not ALIGNMENT_ROW.match(alignment)):
            i += 1
            continue
        end = i + 1
        while end < len(lines) and end not in fenced and "|" in lines[end] and lines[end].strip():
            end += 1
        above = lines[i - 2] if i >= 2 else ""
        found.append(Table(file, i, above, tuple(line.strip() for line in lines[i - 1:end])))
        i = end + 1
    return found


def table_problems(table: Table, root: Path = ROOT) -> list[str]:
    """'file:line: why' for a table with no marker, or whose marked file does not hold its rows."""
    where = f"{table.file}:{table.line}"
    if NOT_FROM_FILE.match(table.above):
        return []
    marker = FROM_FILE.match(table.above)
    if not marker:
        return [f"{where}: no marker on the line above the table: '<!-- table from docs/results/...md -->' "
                f"or '<!-- table: not from a run file: <why> -->'"]
    name, results = marker["file"], root / RUN_TABLES.relative_to(ROOT)
    path = root / name
    if not path.resolve().is_relative_to(results.resolve()):
        return [f"{where}: {name} is not under {results.relative_to(root)}/ (the run's table files)"]
    if not path.is_file():
        return [f"{where}: {name} does not exist"]
    candidates = [t for t in tables(path.read_text(), name) if t.rows[:2] == table.rows[:2]]
    if not candidates:
        return [f"{where}: header and alignment row not in {name}:\n  {table.rows[0]}\n  {table.rows[1]}"]
    best = []
    for candidate in candidates:
        file_rows, at, missing = candidate.rows[2:], 0, []
        for number, row in enumerate(table.rows[2:], start=table.line + 2):
            nxt = next((k for k in range(at, len(file_rows)) if file_rows[k] == row), None)
            if nxt is None:
                missing.append(f"{table.file}:{number}: row not in {name} (or out of order):\n  {row}")
            else:
                at = nxt + 1
        if not missing:
            return []
        best = missing if not best or len(missing) < len(best) else best
    return best


def doc_tables() -> list[Table]:
    checked = [README, *sorted((ROOT / "docs").glob("*.md"))]
    return [t for page in checked if str(page.relative_to(ROOT)) not in TABLES_UNCHECKED
            for t in tables(page.read_text(), str(page.relative_to(ROOT)))]


DOC_TABLES = doc_tables()


@pytest.mark.parametrize("table", DOC_TABLES, ids=[f"{t.file}:{t.line}" for t in DOC_TABLES])
def test_table_is_from_a_run_file_or_says_why_not(table):
    problems = table_problems(table)
    assert not problems, "\n".join(problems)


def test_the_docs_quote_run_tables():
    """The check has something to check: the README's main table and default_study.md's result
    tables are marked as quotes of the snapshot (so the tests above compare them)."""
    quoted = {(t.file, FROM_FILE.match(t.above)["file"]) for t in DOC_TABLES if FROM_FILE.match(t.above)}
    assert ("README.md", "docs/results/default/tables/shifts.md") in quoted, quoted
    assert sum(1 for file, _ in quoted if file == "docs/default_study.md") >= 3, quoted


TABLE_PAGE = """# A page

<!-- table from docs/results/default/tables/t.md -->
| Method | ID |
|:--|--:|
| FT | 96.0 |
| SAE-FT | 95.5 |

<!-- table from docs/results/default/tables/t.md -->
| Method | ID |
|:--|--:|
| SAE-FT | 95.5 |

<!-- table: not from a run file: a layout table -->
| key | meaning |
|---|---|
| `a` | b |

```text
| a fenced | block |
|---|---|
```

| no | marker |
|---|---|
| x | y |
"""

TABLE_FILE = """| Method | ID |
|:--|--:|
| Zero-shot | 83.6 |
| FT | 96.0 |
| SAE-FT | 95.5 |

A caption.
"""


def write_table_file(root: Path) -> None:
    folder = root / "docs" / "results" / "default" / "tables"
    folder.mkdir(parents=True)
    (folder / "t.md").write_text(TABLE_FILE)


def test_the_table_finder_sees_tables_and_their_markers():
    found = tables(TABLE_PAGE, "page.md")
    assert [(t.line, len(t.rows)) for t in found] == [(4, 4), (10, 3), (15, 3), (24, 3)]
    assert found[0].above == "<!-- table from docs/results/default/tables/t.md -->"
    assert found[0].rows[2] == "| FT | 96.0 |" and found[3].above == ""


def test_quoted_tables_and_a_subset_of_rows_pass(tmp_path):
    write_table_file(tmp_path)
    found = tables(TABLE_PAGE, "page.md")
    assert [table_problems(t, tmp_path) for t in found[:3]] == [[], [], []]


def test_a_table_without_a_marker_fails(tmp_path):
    [problem] = table_problems(tables(TABLE_PAGE, "page.md")[3], tmp_path)
    assert problem.startswith("page.md:24: no marker"), problem


def test_a_cell_that_differs_from_its_file_fails_naming_page_line_and_file(tmp_path):
    write_table_file(tmp_path)
    edited = TABLE_PAGE.replace("| SAE-FT | 95.5 |\n\n<!-- table from", "| SAE-FT | 95.6 |\n\n<!-- table from")
    [problem] = table_problems(tables(edited, "page.md")[0], tmp_path)
    assert problem.startswith("page.md:7: row not in docs/results/default/tables/t.md"), problem
    assert "| SAE-FT | 95.6 |" in problem


def test_rows_out_of_order_a_changed_header_or_a_missing_file_fail(tmp_path):
    write_table_file(tmp_path)
    swapped = TABLE_PAGE.replace("| FT | 96.0 |\n| SAE-FT | 95.5 |", "| SAE-FT | 95.5 |\n| FT | 96.0 |")
    [problem] = table_problems(tables(swapped, "page.md")[0], tmp_path)
    assert problem.startswith("page.md:7: row not in"), problem
    renamed = TABLE_PAGE.replace("| Method | ID |\n|:--|--:|\n| FT", "| Method | ID avg |\n|:--|--:|\n| FT")
    [problem] = table_problems(tables(renamed, "page.md")[0], tmp_path)
    assert problem.startswith("page.md:4: header and alignment row not in"), problem
    elsewhere = TABLE_PAGE.replace("tables/t.md", "tables/gone.md")
    [problem] = table_problems(tables(elsewhere, "page.md")[0], tmp_path)
    assert problem == "page.md:4: docs/results/default/tables/gone.md does not exist", problem
    outside = TABLE_PAGE.replace("docs/results/default/tables/t.md", "README.md")
    [problem] = table_problems(tables(outside, "page.md")[0], tmp_path)
    assert "is not under docs/results/" in problem, problem


PLANNED_JOBS = re.compile(r"^\| `(config/[\w.]+\.yaml)` \| (\d+) \|$", re.M)


@pytest.mark.slow
def test_the_planned_job_counts_are_what_snakemake_plans(tmp_path):
    """docs/performance.md's table of jobs per study is what `snakemake -n` plans now."""
    rows = PLANNED_JOBS.findall((ROOT / "docs" / "performance.md").read_text())
    assert {"config/config.yaml", "config/paper_vitb16.yaml"} <= {config for config, _ in rows}
    for config, jobs in rows:
        workdir = tmp_path / config.replace("/", "_")
        workdir.mkdir()
        needs_root = "data_root" in (yaml.safe_load((ROOT / config).read_text()) or {})
        extra = ["--config", f"data_root={tmp_path / 'data'}"] if needs_root else []
        result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-d", str(workdir),
                                 "--configfile", config, *extra], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        planned = re.search(r"^total\s+(\d+)$", result.stdout, re.M)
        assert planned, f"{config}: no job count in snakemake -n's output:\n{(result.stdout + result.stderr)[-2000:]}"
        assert int(planned[1]) == int(jobs), f"docs/performance.md says {config} plans {jobs} jobs; snakemake -n plans {planned[1]}"
