"""The promise on failures (one line, non-zero) and on bad settings, for the cases
black-box passes found: click's usage errors, storage that cannot be reached, job settings
that rows would be refused for, URIs in edit manifests, per-row variants in edit manifests."""

from __future__ import annotations

import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.inputs.images import resolve_uri
from zimage_batch.jobspec import JobError, load_job
from zimage_batch.run.generation import cut_batches


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "zimage_batch.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["run", "--workers", "abc"], "'abc' is not a valid integer"),
    (["run", "--variant", "mega"], "'mega' is not one of"),
    (["status"], "Missing argument 'OUTPUT'"),
    (["no-such-command"], "No such command"),
    (["make-tiny-model", "s3://bucket/tiny/"], "writes a local folder"),
])
def test_usage_errors_are_one_line(args, fragment):
    line = _one_error_line(_cli(*args))
    assert fragment in line


def test_bare_command_prints_the_help():
    result = _cli()
    assert result.returncode == 0 and "Usage:" in result.stdout and "run" in result.stdout


def test_status_and_report_on_unreachable_storage_are_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    for command in ("status", "report"):
        line = _one_error_line(_cli(command, "s3://nowhere/out/", env=env))
        assert "connect" in line.lower(), line


@pytest.mark.parametrize("setting, message", [
    ("guidance_scale=nan", "guidance_scale must be a finite number"),
    ("cfg_truncation=-1", "cfg_truncation must be a finite number >= 0"),
    ("cfg_normalization=-0.5", "cfg_normalization must be a finite number >= 0"),
    ("seed=-1", "seed must be in 0..2**63-1"),
    ("seed=1.5", "seed: cannot use 1.5"),
    ("compile=maybe", "compile: cannot use 'maybe'"),
    ("max_source_pixels=0", "max_source_pixels must be >= 1"),
    ("stall_timeout=0", "stall_timeout must be a positive number of seconds"),
    ("stall_timeout=.inf", "stall_timeout must be a positive number of seconds"),
])
def test_job_settings_are_checked_like_rows(setting, message):
    with pytest.raises(JobError, match=message.replace("*", r"\*").replace(".", r"\.")):
        load_job(None, {"manifest": "m.parquet", "output": "out"}, [setting])


def test_stall_timeout_takes_any_positive_number_and_is_not_part_of_the_job():
    base = load_job(None, {"manifest": "m", "output": "o"}, [])
    job = load_job(None, {"manifest": "m", "output": "o"}, ["stall_timeout=0.5"])
    assert base.stall_timeout is None and job.stall_timeout == 0.5 and job.fingerprint() == base.fingerprint()


def test_switches_take_the_usual_words():
    job = load_job(None, {"manifest": "m", "output": "o"}, ["compile=yes", "report=off", "low_vram=true"])
    assert job.compile is True and job.report is False and job.low_vram == "on"


def test_source_uris_resolve_like_paths():
    assert resolve_uri("./imgs/a.png", "s3://cat/manifests") == "s3://cat/manifests/imgs/a.png"
    assert resolve_uri("../other/a.png", "s3://cat/manifests") == "s3://cat/other/a.png"
    assert resolve_uri("file:///tmp/my%20photo.png", "/x") == "/tmp/my photo.png"
    assert resolve_uri("a.png", "/data/m") == "/data/m/a.png"
    assert resolve_uri("s3://b/k.png", "/data/m") == "s3://b/k.png"


def test_batches_hold_one_batch_key():
    """So a batch runs as one, and each row's duration_ms is that of rows like it."""
    requests = [GenerationRequest("p", i, 64 if i % 2 else 128, 64, 8, 0.0) for i in range(7)]
    batches = list(cut_batches(requests, range(7), lambda request: 2))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({requests[i].batch_key() for i in b}) == 1 and len(b) <= 2 for b in batches)


def test_edit_rows_are_checked_against_their_own_variant(tmp_path):
    """An omni row in a turbo job may ask for `edit`; a turbo row in an omni job may inpaint."""
    source = str(tmp_path / "a.png")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["t", "o"], "prompt": ["x", "y"], "source": [source, source],
                             "variant": [None, "omni"], "mode": [None, "edit"]}), manifest)
    result = _cli("validate", str(manifest))
    assert result.returncode == 0, result.stderr
    pq.write_table(pa.table({"id": ["t", "o"], "prompt": ["x", "y"], "source": [source, source],
                             "variant": ["turbo", "omni"], "mask": [source, None]}), manifest)
    result = _cli("validate", str(manifest), "--variant", "omni")
    assert result.returncode == 0, result.stderr
    pq.write_table(pa.table({"id": ["t", "o"], "prompt": ["x", "y"], "source": [source, source],
                             "variant": [None, "omni"], "mask": [None, source]}), manifest)
    line = _one_error_line(_cli("validate", str(manifest)))
    assert "'mode'" in line and "omni variant does not do" in line and "id='o'" in line
