"""The real `zimage-batch` command in a subprocess on manifests: `validate --set` refuses exactly the
job defaults `run --set` refuses, with the same line, and a good folder of parts validates."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process, ray_not_started

CLI = shutil.which("zimage-batch") or "zimage-batch"


def _write(path: Path, columns: dict, schema: pa.Schema | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, **kwargs)
    return path


def _good_columns(n: int = 4) -> dict:
    return {"id": [f"r{i}" for i in range(n)], "prompt": [f"a cat number {i}" for i in range(n)]}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


def _cli(*args: str, timeout: float = 120) -> Result:
    """The real command, in a subprocess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    started = time.monotonic()
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def _cli_in_process(*args: str) -> Result:
    """The command in this process (click's CliRunner: no interpreter start-up). A refusal comes
    before Ray starts: a command that gets as far as Ray fails here, with its own error line."""
    started = time.monotonic()
    with ray_not_started():
        result = cli_in_process(*args)
    return Result(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("manifest_kind, setting", [
    ("prompt", "width=16"),
    ("prompt", "height=4096"),
    ("edit", "strength=2"),
])
def test_validate_checks_job_defaults_as_run_does(tmp_path, manifest_kind, setting):
    """`validate --set` refuses exactly the job defaults `run --set` refuses, with the same line."""
    columns = _good_columns()
    if manifest_kind == "edit":
        columns["source"] = ["a.png"] * 4
    manifest = _write(tmp_path / "m.parquet", columns)
    validate = _cli_in_process("validate", "--set", setting, str(manifest))
    run = _cli("run", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--model", "tiny:turbo",
               "--set", setting)
    assert validate.returncode != 0 and run.returncode != 0, (validate, run)
    assert validate.stderr.strip() == run.stderr.strip(), (validate.stderr, run.stderr)
    assert setting.split("=")[0] in validate.stderr
    assert not (tmp_path / "out").exists()


def test_good_manifest_validates(tmp_path):
    folder = tmp_path / "manifest"
    _write(folder / "part-0.parquet", {"id": ["a", "b"], "prompt": ["a cat", "一只猫"], "width": [64, None],
                                       "seed": [1, None], "variant": ["turbo", None], "extra": [1, 2]})
    _write(folder / "part-1.parquet", {"id": ["c"], "prompt": ["a dog"], "width": [128], "seed": [3],
                                       "variant": [None], "extra": [3]})
    (folder / "_SUCCESS").write_text("")
    result = _cli("validate", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:"), result.stdout
    assert "3 rows" in result.stdout and "2 files" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert _listing(tmp_path) == {"manifest", "manifest/part-0.parquet", "manifest/part-1.parquet",
                                  "manifest/_SUCCESS"}
