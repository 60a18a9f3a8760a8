"""`zimage-batch make-tiny-model` through the installed entry point: a folder that already holds a
checkpoint is refused in one line and left untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zimage_batch.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A turbo checkpoint written through the CLI (in this process)."""
    path = tmp_path_factory.mktemp("tiny-cli") / "turbo"
    result = CliRunner().invoke(main, ["make-tiny-model", str(path), "--variant", "turbo"])
    assert result.exit_code == 0, result.output
    return {"turbo": path}


def test_existing_checkpoint_is_refused(built):
    """Through the installed entry point: non-zero exit, one-line reason, folder untouched."""
    path = built["turbo"]
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    exe = Path(sys.executable).with_name("zimage-batch")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "zimage_batch.cli"]
    proc = subprocess.run(
        [*command, "make-tiny-model", str(path), "--variant", "base"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and str(path) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
