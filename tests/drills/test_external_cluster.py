"""A Ray cluster started elsewhere (`ray start --head` in another folder, token authentication on,
as recent Ray sets it up): relative paths give one OUTPUT, a missing token is one clear line, and
a node that does not see the driver's local paths is refused before anything is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from output_check import check_exactly_once
from ray_head import free_port, start_node
from test_job_e2e import make_manifest


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node cluster with token authentication, started in a folder of its own."""
    home = tmp_path_factory.mktemp("head-cwd")
    token = uuid.uuid4().hex + uuid.uuid4().hex
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="zbh-", dir="/tmp"),  # short: Ray's sockets
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    node = start_node(["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                       "--node-ip-address=127.0.0.1"], env, home, home.parent / "head.log")
    try:
        yield {"address": f"127.0.0.1:{port}", "port": port, "jobs_api": f"http://127.0.0.1:{dashboard}",
               "env": env, "home": home}
    finally:
        node.stop()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def _run(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zimage_batch.cli", "run", *args, "--model", "tiny:turbo",
                           "--set", "report=false"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_relative_paths_on_a_cluster_started_elsewhere_give_one_output(tmp_path, head):
    ids = make_manifest(tmp_path / "m.parquet", 12)
    result = _run(tmp_path, head["env"], "--manifest", "m.parquet", "--output", "out", "--shard-size", "6",
                  "--address", head["address"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "done: 12 ok, 0 error of 12 rows; 2 shards committed" in result.stdout
    assert "gcs_client" not in result.stderr and "Token authentication" not in result.stderr, result.stderr
    out = tmp_path / "out"
    for part in ("job.json", "_runs", "metadata", "_commits", "images"):
        assert (out / part).exists(), part
    assert not list(head["home"].iterdir()), "something was written in the cluster's folder"
    check_exactly_once(str(out), ids)


@pytest.mark.parametrize("how", ["address", "auto"])
def test_a_run_without_the_clusters_token_is_refused_in_one_line(tmp_path, head, how):
    """Named by its address or found by `auto`: one line naming the cluster's address, what to set
    and where its token is, exit 2, nothing written; none of Ray's own warning lines."""
    make_manifest(tmp_path / "m.parquet", 4)
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    address = head["address"] if how == "address" else "auto"
    result = _run(tmp_path, env, "--manifest", "m.parquet", "--output", "out", "--address", address)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    found = f"{head['address']} refused" if how == "address" else f":{head['port']} (found by --address auto) refused"
    assert found in result.stderr, result.stderr
    assert "RAY_AUTH_TOKEN" in result.stderr and "RAY_AUTH_MODE" in result.stderr
    assert "~/.ray/auth_token" in result.stderr and "ray get-auth-token" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_submit_without_the_clusters_token_is_refused_in_one_line(tmp_path, head, token):
    """`submit` to a Jobs API that refuses the token: one line that says what to set (not Ray's
    AuthenticationError), exit 2."""
    make_manifest(tmp_path / "m.parquet", 4)
    (tmp_path / "job.yaml").write_text("manifest: m.parquet\noutput: out\nmodel: tiny:turbo\n")
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    if token:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    result = subprocess.run([sys.executable, "-m", "zimage_batch.cli", "submit", "job.yaml", "--address",
                             head["jobs_api"]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert f"the Ray cluster at {head['jobs_api']} refused the connection" in result.stderr
    said = "RAY_AUTH_TOKEN is not the cluster's token" if token else "no token was sent"
    assert said in result.stderr and "~/.ray/auth_token" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def _unshare() -> tuple[str, ...] | None:
    """The command that runs a process in a mount namespace of its own, if this machine allows it."""
    if not shutil.which("unshare"):
        return None
    command = ("unshare", "--mount") if os.geteuid() == 0 else ("unshare", "--mount", "--map-root-user")
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run([*command, "sh", "-c", f'mount -t tmpfs none "{folder}"'], capture_output=True)
    return command if probe.returncode == 0 else None


@pytest.mark.skipif(_unshare() is None, reason="needs mount namespaces (unshare --mount)")
def test_local_paths_a_node_does_not_see_are_refused_before_anything_is_written(tmp_path, head):
    """A second node runs in a mount namespace where the test's folder is an empty tmpfs: a real
    filesystem the driver's local OUTPUT and manifest are not on."""
    hidden, seen = tmp_path / "hidden", tmp_path / "seen"
    hidden.mkdir()
    seen.mkdir()
    make_manifest(hidden / "m.parquet", 4)
    make_manifest(seen / "m.parquet", 4)
    wrap = (*_unshare(), "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$@"', "sh")
    node = start_node([f"--address={head['address']}", "--num-cpus=1", "--node-ip-address=127.0.0.1"],
                      head["env"], tmp_path, tmp_path / "node.log", wrap=wrap)
    try:
        output = _run(seen, head["env"], "--manifest", "m.parquet", "--output", str(hidden / "out"),
                      "--address", head["address"])
        manifest = _run(seen, head["env"], "--manifest", str(hidden / "m.parquet"), "--output", "out",
                        "--address", head["address"])
    finally:
        node.stop()
    for result in (output, manifest):
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and "not shared with every node" in result.stderr, result.stderr
    assert "OUTPUT: cannot read the probe file" in output.stderr and not (hidden / "out").exists()
    assert f"manifest: cannot read {hidden / 'm.parquet'}" in manifest.stderr and not (seen / "out").exists()
