"""cluster/ configs parse and carry what they need; `zimage-batch submit` runs a job through the Ray Jobs API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from output_check import check_exactly_once
from ray_head import free_port, start_node
from test_job_e2e import make_manifest

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _get(doc: dict, dotted: str):
    value = doc
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


REQUIRED = {
    "RayCluster": ["spec.rayVersion", "spec.headGroupSpec.rayStartParams", "spec.headGroupSpec.template.spec.containers.0.image",
                   "spec.workerGroupSpecs.0.groupName", "spec.workerGroupSpecs.0.maxReplicas"],
    "RayJob": ["spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.image",
               "spec.shutdownAfterJobFinishes"],
    "CronJob": ["spec.schedule", "spec.concurrencyPolicy", "spec.jobTemplate.spec.template.spec.containers.0.command"],
    "ConfigMap": ["metadata.name", "data"],
    "launcher": ["cluster_name", "provider.type", "available_node_types", "head_node_type", "max_workers",
                 "head_start_ray_commands", "worker_start_ray_commands"],
}


def test_every_cluster_yaml_parses_and_has_its_fields():
    docs = _documents()
    kinds = {doc.get("kind", "launcher") for _, doc in docs}
    assert {"RayCluster", "RayJob", "CronJob", "launcher"} <= kinds
    for name, doc in docs:
        kind = doc.get("kind", "launcher")
        for field in REQUIRED[kind]:
            _get(doc, field)  # KeyError names the missing field
        if kind == "launcher":
            head = doc["available_node_types"][doc["head_node_type"]]
            assert "node_config" in head
            assert any(t.get("max_workers", 0) > 0 for t in doc["available_node_types"].values())
        if kind in ("RayCluster", "RayJob"):
            spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
            gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
            assert "nvidia.com/gpu" in str(gpu)
        if kind == "CronJob":
            command = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
            assert command[:2] == ["zimage-batch", "submit"] and "--address" in command
        if kind == "ConfigMap":
            for text in doc["data"].values():
                job = yaml.safe_load(text)
                assert {"manifest", "output", "model"} <= set(job)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with the dashboard (Jobs API) on 127.0.0.1, started like an operator would."""
    # Ray's unix socket paths must stay short: a short temp dir, not pytest's long tmp_path.
    # Token auth off for this loopback-only test cluster (a real cluster's token goes in RAY_AUTH_TOKEN).
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # The dashboard agent on a free port, not the default 52365 (start_node): a local Ray started beside
    # this one would take it, and the Jobs API would then answer "No available agent" until the submit gives up.
    node = start_node([f"--port={free_port()}", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard}", "--include-dashboard=true", "--node-ip-address=127.0.0.1"],
                      env, tmp_path, tmp_path / "head.log")
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        node.stop()  # this node's processes only (`ray stop` would stop every Ray on the machine)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_submit_runs_the_job_on_the_cluster(tmp_path, ray_head):
    manifest = tmp_path / "m.parquet"
    ids = make_manifest(manifest, 40)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "manifest: m.parquet\noutput: out\nmodel: tiny:turbo\nworkers: 2\nshard_size: 10\n", encoding="utf-8"
    )
    address, env = ray_head
    result = subprocess.run(
        [sys.executable, "-m", "zimage_batch.cli", "submit", str(job_file), "--address", address],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout and "done: 40 ok" in result.stdout
    check_exactly_once(str(tmp_path / "out"), ids)
    # the run on the cluster ends as every run does: its record, the dataset card and the report
    out = tmp_path / "out"
    assert f"dataset card: {out / 'README.md'}" in result.stdout and f"report: {out / 'report.html'}" in result.stdout
    assert (out / "README.md").is_file() and (out / "report.html").is_file() and list((out / "_runs").glob("2*.json"))
