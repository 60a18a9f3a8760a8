"""Docs that cannot rot: every code block of README.md and docs/*.md runs here, in the order a
reader meets them, or the document says, right above the block, why it cannot run here.

    python           executed (one namespace per document), no warnings allowed
    bash / sh        each command run: `zimage-batch ...` in this process (tests/cli_in_process.py),
                     others in a shell; every command must exit 0
    yaml             parsed; `<!-- snippet: file NAME -->` above it writes it to NAME first
    text             shown only (diagrams, layouts, command synopses)

Markers, on the line above a block:

    <!-- snippet: skip (REASON) -->    not run here, for REASON (a GPU, a bucket, installing packages)
    <!-- snippet: exit N -->           every command of the block must exit N (a refusal shown on purpose)
    <!-- snippet: file NAME -->        the block is the file NAME, written into the folder

All documents share one folder (the docs pages may read what the README's recipes wrote) and
one local Ray cluster, with tiny models and a handful of rows each.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli_in_process import cli_in_process

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", "docs/manifests.md", "docs/models.md", "docs/outputs.md", "docs/operations.md",
             "docs/curation.md", "docs/prompts.md", "docs/catalogue-editing.md", "docs/performance.md", "docs/architecture.md"]
RUN = {"python", "bash", "sh"}
SHOWN = {"text", "yaml"}
MARKER = re.compile(r"<!--\s*snippet:\s*(skip \((?P<reason>[^)]+)\)|exit (?P<exit>\d+)|file (?P<file>\S+))\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: re.Match | None

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def blocks(document: str) -> list[Block]:
    """The fenced code blocks of `document`, each with the marker on the line above it, if any."""
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        above = lines[i - 1] if i > 0 else ""
        indent = len(opening["indent"])
        code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        found.append(Block(document, i + 1, opening["lang"], code, MARKER.search(above)))
        i = end + 1
    return found


def test_documents_are_listed_and_every_block_is_run_or_says_why_not():
    """A new page under docs/ is run too; a block is python, bash, yaml or text, and a skipped
    one gives its reason."""
    assert sorted(DOCUMENTS) == sorted(["README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
    for document in DOCUMENTS:
        for block in blocks(document):
            assert block.lang in RUN | SHOWN, f"{block.where}: a code block needs a language (python, bash, yaml, text)"
            if block.marker and block.marker["reason"]:
                assert block.lang in RUN, f"{block.where}: only python and bash blocks are skipped"
    readme = blocks("README.md")
    assert sum(b.lang in RUN and not (b.marker and b.marker["reason"]) for b in readme) >= 10, "the recipes run"


def _commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def _run_shell(block: Block, folder: Path) -> None:
    expected = int(block.marker["exit"]) if block.marker and block.marker["exit"] else 0
    for command in _commands(block.code):
        words = shlex.split(command, comments=True)
        env = {}
        while "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        if words[0] == "zimage-batch":
            result = cli_in_process(*words[1:], env=env)
        else:
            result = subprocess.run(command, shell=True, cwd=folder, env={**os.environ, **env}, capture_output=True,
                                    text=True, timeout=300, executable="/bin/bash")
        assert result.returncode == expected, (
            f"{block.where}: `{command}` exited {result.returncode}, not {expected}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        if expected == 0 and words[0] == "zimage-batch":
            assert "Traceback" not in result.stderr, f"{block.where}: {result.stderr[-3000:]}"
        elif expected:
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def _run_python(block: Block, namespace: dict) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (ResourceWarning, ImportWarning, PendingDeprecationWarning):  # hidden from a reader by default
            warnings.simplefilter("ignore", hidden)
        exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - the documented code itself
    ours = [w for w in caught if not _foreign(w)]
    assert not ours, f"{block.where}: the snippet warns: " + "; ".join(f"{w.category.__name__}: {w.message}" for w in ours)


def _foreign(warning: warnings.WarningMessage) -> bool:
    """Warnings from inside Ray or torch internals that a reader's code cannot act on."""
    return any(part in warning.filename for part in (f"{os.sep}ray{os.sep}", f"{os.sep}torch{os.sep}"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("reader")


def test_every_snippet_runs(folder, ray_local, monkeypatch):
    """The README's recipes and the docs pages' examples, run as a reader runs them."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub downloads: the snippets use tiny: models
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(folder))
    ran = []
    started = time.monotonic()
    for document in DOCUMENTS:
        namespace: dict = {"__name__": "__snippet__"}
        for block in blocks(document):
            marker = block.marker
            if marker and marker["reason"]:
                continue
            if block.lang == "yaml":
                yaml.safe_load(block.code)
                if marker and marker["file"]:
                    (folder / marker["file"]).write_text(block.code, encoding="utf-8")
            elif block.lang == "python":
                _run_python(block, namespace)
            elif block.lang in ("bash", "sh"):
                _run_shell(block, folder)
            else:
                continue
            ran.append(f"{block.where} {time.monotonic() - started:.1f}s")
            started = time.monotonic()
    assert ran, "no snippet ran"
    print("snippets run (seconds each):", ", ".join(ran), file=sys.stderr)
