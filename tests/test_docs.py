"""The documentation's programs run, print what the page says, and the CLI reference lists
every option the CLI has.

Conventions in docs/embedding.md and README.md's "As a library" (docs/embedding.md, "About
the examples", says the same to a reader):

* Every ```python block is a complete program. The ``kvm`` tests run each in a fresh
  ``python3`` process, in an empty directory, with this checkout first on the import path,
  and require exit status 0 within ``BLOCK_TIMEOUT``.
* An ```output block right after a python block (blank lines between allowed) is its exact
  stdout, line for line; ``...`` stands for any text within one line.
* ``<!-- no-test: REASON -->`` on the line before a python block keeps it from running
  (for blocks that need a Linux kernel); it is still compiled, and there may be only
  ``MAX_NOT_RUN`` of them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING = ROOT / "docs" / "embedding.md"
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
LIBRARY_SECTION = "## As a library"
BLOCK_TIMEOUT = 60  # seconds per program: the built-in guest runs in milliseconds
MAX_NOT_RUN = 2
_NO_TEST = re.compile(r"^<!--\s*no-test:\s*(.*?)\s*-->$")
_FENCE = re.compile(r"^```(\S*)\s*$")


@attrs.frozen
class Block:
    """One fenced python block of a page, with what follows it."""

    page: str  # path relative to the checkout
    line: int  # of the opening fence, 1-based
    code: str
    expected: str | None  # the following ```output block, if any
    no_test: str | None  # the reason, if marked not to run

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line of the opening fence, info string, body)`` of each fenced block, in order."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"unclosed ``` fence at line {i + 1}"
        blocks.append((i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def python_blocks(page: Path, text: str | None = None, first_line: int = 1) -> list[Block]:
    """The python blocks of ``text`` (``page``'s whole text by default), with their
    expected output and no-test marks."""
    if text is None:
        text = page.read_text()
    lines = text.splitlines()
    fenced = fenced_blocks(text)
    out = []
    for index, (line, info, body) in enumerate(fenced):
        if info == "output":
            previous = fenced[index - 1] if index else None
            closing = previous[0] + previous[2].count("\n") + 1 if previous else 0  # its closing fence
            between = lines[closing : line - 1] if previous else ["(none)"]
            follows = previous is not None and previous[1] == "python" and not any(s.strip() for s in between)
            assert follows, f"{page.name}:{line + first_line - 1}: an output block must follow a python block directly"
            continue
        if info != "python":
            continue
        expected = None
        if index + 1 < len(fenced) and fenced[index + 1][1] == "output":
            expected = fenced[index + 1][2]
        marker = lines[line - 2].strip() if line >= 2 else ""
        no_test = _NO_TEST.match(marker)
        out.append(Block(str(page.relative_to(ROOT)), line + first_line - 1, body, expected,
                         no_test.group(1) if no_test else None))  # fmt: skip
    return out


def library_section() -> tuple[str, int]:
    """README.md's "As a library" section and the line it starts at."""
    text = README.read_text()
    start = text.index(LIBRARY_SECTION + "\n")
    end = text.find("\n## ", start + len(LIBRARY_SECTION))
    return text[start : end if end >= 0 else len(text)], text.count("\n", 0, start) + 1


def all_blocks() -> list[Block]:
    section, first_line = library_section()
    return python_blocks(EMBEDDING) + python_blocks(README, section, first_line)


BLOCKS = all_blocks()


def output_pattern(expected: str) -> re.Pattern[str]:
    """``expected`` as a regular expression: exact, but ``...`` matches any text in a line."""
    lines = expected.rstrip("\n").split("\n")
    return re.compile("\n".join(re.escape(line).replace(re.escape("..."), "[^\n]*") for line in lines))


# --- the pages themselves (no KVM needed) --------------------------------------------------
def test_the_pages_have_their_programs() -> None:
    pages = {block.page for block in BLOCKS}
    assert pages == {"docs/embedding.md", "README.md"}
    readme = [block for block in BLOCKS if block.page == "README.md"]
    assert readme and all(block.no_test is None for block in readme), "README's library example must run"
    assert sum(block.expected is not None for block in BLOCKS) >= len(BLOCKS) // 2


def test_few_blocks_are_not_run_and_each_says_why() -> None:
    not_run = [block for block in BLOCKS if block.no_test is not None]
    assert len(not_run) <= MAX_NOT_RUN, [block.id for block in not_run]
    for block in not_run:
        assert block.no_test, f"{block.id}: a no-test mark needs a reason"
        assert block.expected is None, f"{block.id}: a block that does not run cannot check its output"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_every_block_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec")


def test_output_patterns() -> None:
    pattern = output_pattern("a ... b\nc(d)...\n")
    assert pattern.fullmatch("a xyz b\nc(d)")
    assert pattern.fullmatch("a  b\nc(d) anything")
    assert not pattern.fullmatch("a x\ny b\nc(d)")  # "..." stays within its line
    assert not pattern.fullmatch("a x b\ncXdY")  # the rest is literal


# --- running them ------------------------------------------------------------------------------
RUN_BLOCKS = [block for block in BLOCKS if block.no_test is None]


@pytest.mark.kvm
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block.id for block in RUN_BLOCKS])
def test_block_runs_and_prints_what_the_page_says(block: Block, tmp_path: Path) -> None:
    program = tmp_path / "example.py"
    program.write_text(block.code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, str(program)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id}: still running after {BLOCK_TIMEOUT} s; stdout so far: {exc.stdout!r}")
    report = f"{block.id} exited {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    if block.expected is not None:
        matched = output_pattern(block.expected).fullmatch(proc.stdout.rstrip("\n"))
        assert matched, f"{report}--- expected (... matches any text in a line)\n{block.expected}"


# --- the CLI reference -------------------------------------------------------------------------
def _help(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "trivmm", *argv, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return proc.stdout


def _options(help_text: str) -> set[str]:
    """The long options a ``--help`` lists, ``--help`` itself aside."""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)) - {"--help"}


@pytest.mark.parametrize("command", [(), ("run",), ("guest", "build"), ("migrate",), ("snapshot",), ("serve",),
                                     ("vm", "define"), ("vm", "stop"), ("vm", "events")],
                         ids=["python -m trivmm", "run", "guest build", "migrate", "snapshot", "serve", "vm define",
                              "vm stop", "vm events"])  # fmt: skip
def test_cli_reference_lists_every_option(command: tuple[str, ...]) -> None:
    options = _options(_help(*command))
    assert options, "no options found in the help text: has its format changed?"
    if command == ("run",):
        assert {"--kernel", "--initrd", "--append", "--memory", "--vcpus", "--cpu-template",
                "--boot-protocol"} <= options  # fmt: skip
    documented = set(re.findall(r"`(--[a-z][a-z0-9-]*)", CLI_DOC.read_text()))
    missing = sorted(options - documented)
    assert not missing, f"docs/cli.md does not describe {missing} (from {' '.join(command) or 'the top level'} --help)"


def test_cli_reference_names_every_command_and_exit_status() -> None:
    from trivmm import cli
    from trivmm.cpu.templates import TEMPLATES

    text = CLI_DOC.read_text()
    for command in ("python -m trivmm run", "python -m trivmm guest build", "python -m trivmm guest builtin",
                    "python -m trivmm migrate", "python -m trivmm snapshot", "python -m trivmm serve",
                    "python -m trivmm vm"):  # fmt: skip
        assert f"## `{command}" in text, command
    statuses = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert statuses == {0, 1, 2, 3, 130}
    for status in statuses:
        assert re.search(rf"^\| `{status}` \|", text, re.MULTILINE), f"exit status {status} is not in the table"
    for name in TEMPLATES:
        assert f"`{name}`" in text, f"CPU template {name} is not described"
