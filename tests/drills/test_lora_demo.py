"""The LoRA demo job and benchmark keep working: jobs/lora-dataset.yaml runs as its comment says
(adapters built by `zimage-batch make-tiny-model DIR --lora NAME`), and benchmarks/lora.py
prints its figures on a handful of rows (its numbers are read elsewhere: no speed is asserted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from cli_in_process import cli_in_process
from output_check import check_exactly_once

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=900, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_lora_dataset_job_runs_as_documented(tmp_path, ray_local):
    """The two commands of the job file's comment, in this process (the run on the module's cluster)."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("lora-dataset.yaml", "lora-prompts.parquet"):
        shutil.copy(ROOT / "jobs" / name, jobs / name)
    made = cli_in_process("make-tiny-model", str(jobs / "tiny-lora"), "--lora", "watercolor", "--lora", "ink",
                          "--lora", "film")
    assert made.returncode == 0, made.stderr[-3000:]
    assert made.stdout.count("tiny LoRA adapter") == 3 and (jobs / "tiny-lora" / "film.safetensors").is_file()
    result = cli_in_process("run", str(jobs / "lora-dataset.yaml"), "--set", "report=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 12 ok, 0 error of 12 rows" in result.stdout
    ids = pq.read_table(jobs / "lora-prompts.parquet").column("id").to_pylist()
    rows = {r["id"]: r for r in check_exactly_once(str(tmp_path / "out" / "lora-dataset"), ids)}
    assert rows["lora-002"]["lora"] == "film:0.8,watercolor:0.6"
    assert rows["lora-003"]["lora"] == "watercolor:0.7" and rows["lora-004"]["lora"] is None


def test_lora_benchmark_prints_the_ratio_on_a_handful_of_rows():
    out = _run("benchmarks/lora.py", "--rows", "6", "--repeats", "1").stdout
    for label in ("mixed (3 sets)", "one set", "adapters off", "mixed / one set =", "one set / adapters off ="):
        assert label in out, out
    assert "3.0 switches a run" in out  # 6 rows cycling through three sets: three batches, three switches
