"""Model sources: tiny:<variant>, local folders, s3:// folders (against the real moto
S3 server), hub ids; safetensors only; variant inference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from zimage_batch.generate.engine import Engine
from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.model import tiny
from zimage_batch.model.sources import ModelSourceError, infer_variant, resolve_model
from zimage_batch.model.variants import variant_for_hub_id
from zimage_batch.storage import S3Storage, s3_client

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sources")
    return {v: tiny.make_tiny_model(root / v, v) for v in ("turbo", "base", "omni")}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("ZIMAGE_BATCH_CACHE", str(path))
    return path


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------ tiny:<variant>
def test_tiny_is_built_once_into_the_cache(cache, monkeypatch):
    first = resolve_model("tiny:turbo")
    path = Path(first.path)
    assert first.variant == "turbo" and first.source == "tiny:turbo"
    assert path.is_relative_to(cache) and (path / "model_index.json").is_file()
    before = _snapshot(path)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("tiny checkpoint rebuilt instead of reused")

    monkeypatch.setattr(tiny, "make_tiny_model", no_rebuild)
    second = resolve_model("tiny:turbo")
    assert second == first
    assert _snapshot(path) == before


def test_tiny_unknown_variant_is_refused(cache):
    with pytest.raises(ModelSourceError, match="unknown tiny model 'tiny:giant'"):
        resolve_model("tiny:giant")


def test_tiny_base_variant(cache):
    resolved = resolve_model("tiny:base")
    assert resolved.variant == "base"
    assert "variant: base" in (Path(resolved.path) / "README.md").read_text()


# ------------------------------------------------------------------------------ local folders
@pytest.mark.parametrize("variant", ["turbo", "base", "omni"])
def test_local_folder_and_variant_inference(checkpoints, variant):
    resolved = resolve_model(str(checkpoints[variant]))
    assert resolved.path == str(checkpoints[variant])
    assert resolved.variant == variant
    assert infer_variant(str(checkpoints[variant]), checkpoints[variant]) == variant


def test_explicit_variant_wins(checkpoints):
    assert resolve_model(str(checkpoints["turbo"]), variant="base").variant == "base"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_weights_are_refused(checkpoints, tmp_path, suffix):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["turbo"], folder)
    (folder / "transformer" / f"diffusion_pytorch_model{suffix}").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelSourceError, match="pickle weights are not loaded"):
        resolve_model(str(folder))


def test_folder_without_model_index_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["turbo"], folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelSourceError, match="model_index.json"):
        resolve_model(str(folder))


def test_checkpoint_of_another_variant_is_refused(checkpoints, tmp_path):
    with pytest.raises(ModelSourceError, match="cannot run variant 'omni'"):
        resolve_model(str(checkpoints["turbo"]), variant="omni")
    with pytest.raises(ModelSourceError, match="cannot run variant 'base'"):
        resolve_model(str(checkpoints["omni"]), variant="base")
    other = tmp_path / "flux"
    shutil.copytree(checkpoints["turbo"], other)
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelSourceError, match="not a Z-Image checkpoint"):
        resolve_model(str(other))


def test_tiny_checkpoints_are_known_to_draw_noise(checkpoints, tmp_path, cache):
    """The report says so for tiny:<variant> and for folders make-tiny-model wrote."""
    assert resolve_model("tiny:turbo").draws_noise
    assert resolve_model(str(checkpoints["omni"])).draws_noise
    real = tmp_path / "real"
    shutil.copytree(checkpoints["turbo"], real)
    (real / "README.md").write_text("variant: turbo\n")
    assert not resolve_model(str(real)).draws_noise


def test_cli_refuses_a_mismatched_model_or_a_dead_cluster_before_writing(tmp_path):
    """Both used to fail late: a variant mismatch once the workers loaded the model (leaving a
    job.json that then refused the corrected job), a dead --address after minutes of retries."""
    import socket

    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), manifest)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
    for extra, message in ((["--variant", "omni"], "cannot run variant 'omni'"),
                           (["--address", dead], f"cannot reach the Ray cluster at {dead}")):
        out = tmp_path / "out" / "deep"
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", str(manifest),
                                 "--output", str(out), "--model", "tiny:turbo", *extra],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
        assert time.monotonic() - started < 60
        assert not (tmp_path / "out").exists(), "nothing may be written, not even the output folder"


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ModelSourceError):
        resolve_model(str(tmp_path / "does-not-exist"))


# ------------------------------------------------------------------------------ s3:// folders
def _upload(folder: Path, bucket: str, prefix: str) -> None:
    client = s3_client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}{path.relative_to(folder).as_posix()}")


def test_s3_folder_matches_local_folder(checkpoints, s3_bucket, cache, monkeypatch):
    local = checkpoints["turbo"]
    _upload(local, s3_bucket, "models/tiny-turbo/")
    uri = f"s3://{s3_bucket}/models/tiny-turbo/"

    resolved = resolve_model(uri)
    path = Path(resolved.path)
    assert resolved.variant == "turbo" and resolved.source == uri
    assert path.is_relative_to(cache)
    for file in local.rglob("*"):
        if file.is_file():
            assert (path / file.relative_to(local)).read_bytes() == file.read_bytes()

    rows = [
        GenerationRequest("a photo of a cat", 7, 64, 64, 4, 0.0),
        GenerationRequest("一只小猫", 8, 96, 64, 4, 0.0),
    ]
    from_s3 = Engine(resolved.path, resolved.variant, device="cpu").generate(rows)
    from_local = Engine(str(local), "turbo", device="cpu").generate(rows)
    for a, b in zip(from_s3, from_local):
        assert np.array_equal(a, b)

    # A second resolve reuses the verified copy: nothing is downloaded again.
    before = _snapshot(path)

    def no_download(self, key, local_path):
        raise AssertionError(f"{key} downloaded again")

    monkeypatch.setattr(S3Storage, "download", no_download)
    again = resolve_model(uri)
    assert again.path == resolved.path
    assert _snapshot(path) == before


def test_s3_omni_variant_and_pickle_refused(checkpoints, s3_bucket, cache):
    _upload(checkpoints["omni"], s3_bucket, "omni/")
    assert resolve_model(f"s3://{s3_bucket}/omni/").variant == "omni"

    _upload(checkpoints["turbo"], s3_bucket, "pickled/")
    s3_client().put_object(Bucket=s3_bucket, Key="pickled/transformer/diffusion_pytorch_model.bin", Body=b"x")
    with pytest.raises(ModelSourceError, match="pickle weights are not loaded"):
        resolve_model(f"s3://{s3_bucket}/pickled/")


def test_variant_guessed_from_an_s3_folder_without_fetching_weights(checkpoints, s3_bucket):
    """The driver's guess (model_index.json and README.md only) agrees with the local folder's."""
    from zimage_batch.model.sources import guess_variant

    for variant, folder in checkpoints.items():
        _upload(folder, s3_bucket, f"guess-{variant}/")
        assert guess_variant(f"s3://{s3_bucket}/guess-{variant}/") == variant
        assert guess_variant(str(folder)) == variant


# ------------------------------------------------------------------------------ hub ids
def test_hub_id_variants_without_download(tmp_path):
    assert variant_for_hub_id("Tongyi-MAI/Z-Image-Turbo") == "turbo"
    assert variant_for_hub_id("tongyi-mai/z-image-turbo") == "turbo"
    assert variant_for_hub_id("Tongyi-MAI/Z-Image") == "base"
    assert variant_for_hub_id("Someone/Else") is None
    # infer_variant trusts the hub id before looking at any file.
    assert infer_variant("Tongyi-MAI/Z-Image-Turbo", tmp_path / "never-read") == "turbo"
    assert infer_variant("Tongyi-MAI/Z-Image", tmp_path / "never-read") == "base"


def test_offline_unknown_hub_id_fails_fast_without_network(tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache: ModelSourceError at once, no socket opened."""
    script = textwrap.dedent(
        """
        import socket, sys, time
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args[:2]))
            raise OSError("network used in offline mode")
        socket.getaddrinfo = socket.create_connection = refuse
        socket.socket.connect = socket.socket.connect_ex = refuse
        from zimage_batch.model.sources import ModelSourceError, resolve_model
        start = time.perf_counter()
        try:
            resolve_model("zimage-batch-tests/no-such-model")
        except ModelSourceError as exc:
            print("ModelSourceError", exc)
        else:
            print("resolved")
        print("seconds", time.perf_counter() - start)
        print("attempts", attempts)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "ModelSourceError" in lines, proc.stdout
    assert "no-such-model" in lines["ModelSourceError"]
    assert float(lines["seconds"]) < 2.0
    assert lines["attempts"] == "[]"
    assert elapsed < 30
