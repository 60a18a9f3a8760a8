"""ControlNet inputs (issue 18): where the weights come from and what names them, the rows'
conditions (given or derived on the CPU), and what is refused before any work."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process
from PIL import Image
from test_edit_e2e import cmyk_jpeg, encode, exif_rotated_jpeg, palette_png, pattern, png16, rgba_png

from zimage_batch.generate.requests import ControlRequest
from zimage_batch.inputs import images
from zimage_batch.inputs.conditions import derive, fit
from zimage_batch.inputs.control import ControlJob, row_control
from zimage_batch.inputs.manifest import ManifestError
from zimage_batch.jobspec import JobError, JobSpec, load_job
from zimage_batch.model.addons import resolve_addon, resolve_pinned
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.model.tiny_controlnet import make_tiny_controlnet
from zimage_batch.model.variants import get_variant
from zimage_batch.run.driver import prepare
from zimage_batch.run.loading import load_control_row
from zimage_batch.storage import open_storage


# ---------------------------------------------------------------------- weights and identity
def test_controlnet_sources_and_their_identity(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("ZIMAGE_BATCH_CACHE", str(tmp_path / "cache"))
    single = make_tiny_controlnet(tmp_path / "net.safetensors", "2.1")
    folder = make_tiny_controlnet(tmp_path / "net-folder", "2.0", folder=True)
    local = resolve_addon(str(single))
    assert local.single_file and local.identity == "sha256:" + hashlib.sha256(single.read_bytes()).hexdigest()
    assert resolve_addon(str(single)).identity == local.identity  # remembered, same answer
    assert not resolve_addon(str(folder)).single_file and resolve_addon(str(folder)).identity.startswith("sha256:")

    store = open_storage(f"s3://{s3_bucket}/nets")
    store.put_bytes("union/net.safetensors", single.read_bytes())
    store.put_bytes("union/net.safetensors.bak", b"not looked at")  # a neighbour with the same prefix
    for path in folder.iterdir():
        store.put_bytes(f"folder/{path.name}", path.read_bytes())
    on_s3 = resolve_addon(f"s3://{s3_bucket}/nets/union/net.safetensors")
    assert on_s3.identity.startswith("s3:") and open(on_s3.path, "rb").read() == single.read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache" / "s3").glob("*/*") if not p.name.startswith(".")) == ["net.safetensors"]
    modified = (tmp_path / "cache" / "s3").stat().st_mtime_ns
    assert resolve_addon(f"s3://{s3_bucket}/nets/union/net.safetensors") == on_s3  # copied once
    assert (tmp_path / "cache" / "s3").stat().st_mtime_ns == modified
    store.put_bytes("union/net.safetensors", make_tiny_controlnet(tmp_path / "other.safetensors", "1.0").read_bytes())
    changed = resolve_addon(f"s3://{s3_bucket}/nets/union/net.safetensors")  # a new version: a new identity
    assert changed.identity != on_s3.identity and changed.path != on_s3.path
    with pytest.raises(ModelSourceError, match="changed since the run started"):
        resolve_pinned(f"s3://{s3_bucket}/nets/union/net.safetensors", on_s3.identity)
    s3_folder = resolve_addon(f"s3://{s3_bucket}/nets/folder/")
    assert json.loads(open(f"{s3_folder.path}/config.json").read())["control_in_dim"] == 33


@pytest.mark.parametrize("name, data, problem", [
    ("net.bin", b"\x80\x02", "pickle weights are not loaded"),
    ("net.ckpt", b"\x80\x02", "pickle weights are not loaded"),
    ("net.gguf", b"GGUF", "is not a .safetensors file"),
    ("net.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}    ", "is not a readable safetensors file"),
])
def test_unsafe_or_unreadable_weights_are_refused(tmp_path, name, data, problem):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ModelSourceError, match=problem):
        resolve_addon(str(path))


def test_a_folder_with_pickles_and_an_unknown_hub_file_are_refused(tmp_path, s3_bucket, monkeypatch):
    folder = make_tiny_controlnet(tmp_path / "net", "2.1", folder=True)
    (folder / "extra.pt").write_bytes(b"\x80\x02")
    with pytest.raises(ModelSourceError, match=r"pickle weights .*extra\.pt"):
        resolve_addon(str(folder))
    open_storage(f"s3://{s3_bucket}/bad").put_bytes("model.pth", b"\x80\x02")
    with pytest.raises(ModelSourceError, match="pickle weights"):
        resolve_addon(f"s3://{s3_bucket}/bad/")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when called, not the env
    with pytest.raises(ModelSourceError, match="cannot fetch controlnet 'nobody/nothing/net.safetensors' from the hub"):
        resolve_addon("nobody/nothing/net.safetensors")


def test_the_fingerprint_covers_the_controlnet_and_leaves_other_jobs_alone():
    plain = JobSpec(manifest="m", output="o")
    # without a ControlNet the control settings are not hashed: jobs from before keep their fingerprint
    assert JobSpec(manifest="m", output="o", control_scale=0.5, canny_low=5.0).fingerprint() == plain.fingerprint()
    assert "controlnet_id" not in plain.output_fields()
    job = JobSpec(manifest="m", output="o", controlnet="tiny:2.1", controlnet_id="sha256:aa")
    assert job.fingerprint() != plain.fingerprint() and "controlnet_id" in job.output_fields()
    for change in ({"controlnet_id": "sha256:bb"}, {"control_scale": 0.5}, {"control": "canny"},
                   {"canny_low": 50.0}, {"control_image": "c.png"}):
        other = JobSpec(**{**job.to_dict(), **change})
        assert other.fingerprint() != job.fingerprint(), change
    assert JobSpec(**{**job.to_dict(), "batch_size": 3}).fingerprint() == job.fingerprint()


# ---------------------------------------------------------------------- conditions
def test_conditions_follow_row_then_job():
    job = ControlJob("tiny:2.1", control="canny", control_scale=0.5)
    assert row_control({}, job).kind == "canny" and row_control({}, job).scale == 0.5
    assert row_control({"control": "none"}, job) is None
    given = row_control({"control_image": "c.png", "control_scale": 1.0}, job)
    assert (given.kind, given.uri, given.scale) == ("image", "c.png", 1.0)
    assert row_control({}, ControlJob("tiny:2.1")) is None
    assert row_control({}, ControlJob("tiny:2.1", control_image="all.png")).uri == "all.png"
    assert ControlJob.from_mapping({"controlnet": None}) is None
    assert ControlJob.from_mapping(JobSpec(manifest="m", output="o", controlnet="x", canny_low=7).to_dict()).canny == (7.0, 200.0)


def test_canny_and_tile_are_derived_at_the_output_size():
    import cv2

    source = Image.fromarray(pattern(100, 70))
    canny = derive("canny", source, 96, 64, (100, 200))
    sized = source.resize((96, 64), Image.Resampling.LANCZOS)
    edges = cv2.Canny(np.asarray(sized), 100.0, 200.0)
    assert canny.mode == "RGB" and canny.size == (96, 64) and set(np.unique(np.asarray(canny))) <= {0, 255}
    assert np.array_equal(np.asarray(canny)[..., 1], edges) and edges.any()
    assert np.array_equal(np.asarray(derive("tile", source, 96, 64, (0, 0))), np.asarray(sized))
    assert derive("canny", source, 96, 64, (10, 20)) != canny  # the thresholds matter


@pytest.mark.parametrize("make", [exif_rotated_jpeg, palette_png, cmyk_jpeg, png16, rgba_png])
def test_a_canny_row_loads_from_every_kind_of_source(tmp_path, make):
    source = tmp_path / "source.img"
    source.write_bytes(make())
    template = ControlRequest("p", 1, None, None, 4, 0.0, control="canny")
    loaded = load_control_row(template, str(source), None, get_variant("turbo"))
    assert loaded.error is None, loaded.error
    upright = images.decode(source.read_bytes(), "s")
    r = loaded.request
    assert (r.width, r.height) == images.output_size(*upright.size, get_variant("turbo"))  # follows the source
    want = derive("canny", upright, r.width, r.height, (100, 200))
    assert np.array_equal(np.asarray(r.control_image), np.asarray(want))
    assert loaded.lineage["control_sha256"] == hashlib.sha256(np.asarray(want).tobytes()).hexdigest()
    assert (loaded.lineage["control"], loaded.lineage["mode"], loaded.lineage["strength"]) == ("canny", "controlnet", None)


def test_a_given_condition_is_fitted_and_bad_ones_are_the_rows_errors(tmp_path):
    good = tmp_path / "pose.png"
    good.write_bytes(encode(Image.fromarray(pattern(50, 40)), "PNG"))
    template = ControlRequest("p", 1, 64, 48, 4, 0.0, control_uri=str(good))
    loaded = load_control_row(template, None, None, get_variant("turbo"))
    assert loaded.request.control_image.size == (64, 48) and "source" not in loaded.lineage
    assert np.array_equal(np.asarray(loaded.request.control_image), np.asarray(fit(Image.open(good).convert("RGB"), 64, 48)))
    assert loaded.lineage["control_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])
    for uri, reason in ((str(corrupt), f"control image is corrupt or truncated: {corrupt}"),
                        (str(tmp_path / "gone.png"), f"control image not found: {tmp_path / 'gone.png'}")):
        failed = load_control_row(ControlRequest("p", 1, 64, 48, 4, 0.0, control_uri=uri), None, None, get_variant("turbo"))
        assert failed.request is None and failed.error.startswith(reason), failed.error


# ---------------------------------------------------------------------- refused before any work
def _manifest(tmp_path, columns: dict) -> str:
    path = tmp_path / "m.parquet"
    base = {"id": ["a", "b", "c"], "prompt": ["x", "y", "z"]}
    pq.write_table(pa.table(base | columns), path)
    return str(path)


EDIT = {"source": ["s.png"] * 3}


@pytest.mark.parametrize("columns, settings, problem", [
    ({"control_image": [None, "c.png", None]}, {}, "column 'control_image' needs a ControlNet: add 'controlnet: SOURCE'"),
    ({**EDIT, "control": [None, "canny", None]}, {}, "column 'control' needs a ControlNet"),
    ({"control_scale": [None, 0.5, None]}, {}, "column 'control_scale' needs a ControlNet"),
    ({**EDIT, "control": ["canny", "sobel", "none"]}, {"controlnet": "tiny:2.1"},
     "column 'control' must be one of canny|tile|none"),
    ({"control_image": ["c.png"] * 3, "control_scale": [0.4, -0.5, 1.0]}, {"controlnet": "tiny:2.1"},
     "column 'control_scale' must be >= 0"),
    ({"control_image": ["c.png"] * 3, "control_scale": [0.4, math.nan, 1.0]}, {"controlnet": "tiny:2.1"},
     "column 'control_scale' must be a finite number"),
    ({"control_image": ["c.png"] * 3, "control_scale": [0.4, math.inf, 1.0]}, {"controlnet": "tiny:2.1"},
     "column 'control_scale' must be a finite number"),
    ({**EDIT, "control": [None, "canny", None], "control_image": [None, "c.png", None]}, {"controlnet": "tiny:2.1"},
     "column 'control_image' is given on rows whose 'control' also derives a condition"),
    ({**EDIT, "mode": [None, "img2img", None]}, {"controlnet": "tiny:2.1", "control": "canny"},
     "column 'mode' asks for img2img or edit on rows with a control condition"),
    ({"control_image": [None, "https://example.com/c.png", None]}, {"controlnet": "tiny:2.1"},
     "column 'control_image' must be a local path, a file:// URI or an s3:// URI"),
    ({"control_image": [None, "c.png", None]}, {"controlnet": "tiny:2.1", "model": "tiny:omni"},
     "column 'control_image' has rows with a control condition on a variant without ControlNet support (omni)"),
])
def test_bad_control_input_is_refused_naming_column_and_rows(tmp_path, columns, settings, problem):
    job = JobSpec(manifest=_manifest(tmp_path, columns), output=str(tmp_path / "out"), **settings)
    job.validate()
    with pytest.raises(ManifestError, match=re.escape(problem)) as refused:
        prepare(job)
    assert "row 1 (id='b')" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, problem", [
    (["control=canny"], "control and control_image need a ControlNet"),
    (["controlnet=tiny:2.1", "control=sobel"], "control must be canny, tile or none"),
    (["controlnet=tiny:2.1", "control_scale=-1"], "control_scale must be a finite number >= 0"),
    (["controlnet=tiny:2.1", "canny_low=250"], "canny_low (250.0) must not exceed canny_high (200.0)"),
    (["controlnet=tiny:2.1", "control=canny", "control_image=c.png"], "control_image and control both name"),
    (["controlnet_id=sha256:00"], "controlnet_id is worked out by the run, not a job setting"),
])
def test_bad_control_settings_are_refused(settings, problem):
    with pytest.raises(JobError, match=re.escape(problem)):
        load_job(None, {"manifest": "m", "output": "o"}, settings)


def test_a_derived_condition_needs_an_edit_manifest(tmp_path):
    job = JobSpec(manifest=_manifest(tmp_path, {}), output=str(tmp_path / "out"), controlnet="tiny:2.1", control="canny")
    with pytest.raises(JobError, match="control: canny derives each row's condition from its source image"):
        prepare(job)
    job = JobSpec(manifest=_manifest(tmp_path, {"control": ["canny", None, None]}), output=str(tmp_path / "out"),
                  controlnet="tiny:2.1")
    with pytest.raises(ManifestError, match="column 'control' belongs to edit manifests"):
        prepare(job)
    assert not (tmp_path / "out").exists()


def test_validate_refuses_in_one_line(tmp_path):
    manifest = _manifest(tmp_path, {**EDIT, "control": ["canny", "tile", "hed"]})
    result = cli_in_process("validate", manifest, "--set", "controlnet=tiny:2.1")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "column 'control' must be one of canny|tile|none: row 2 (id='c')" in result.stderr


def test_make_tiny_model_writes_tiny_controlnets(tmp_path):
    from zimage_batch.model.controlnet import single_file_config

    for target, version in (("net-2.0.safetensors", "2.0"), ("net-1.0", "1.0")):
        result = cli_in_process("make-tiny-model", str(tmp_path / target), "--controlnet", version)
        assert result.returncode == 0, result.stderr
        assert f"tiny ControlNet {version}" in result.stdout
    tiny = dict(n_layers=2, n_refiner_layers=1, dim=32, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                all_patch_size=[2], all_f_patch_size=[1])
    config = single_file_config(resolve_addon(str(tmp_path / "net-2.0.safetensors")).path, tiny)
    assert (config["control_in_dim"], config["add_control_noise_refiner"]) == (33, "control_layers")
    folder = json.loads((tmp_path / "net-1.0" / "config.json").read_text())
    assert (folder["control_in_dim"], folder["add_control_noise_refiner"]) == (16, None)
