"""The job (jobspec.py): settings load from the job file, then flags, then `--set` (later wins);
a bad setting is refused in one line naming it; the fingerprint of a fixed job never changes."""

from __future__ import annotations

import os

import pytest
import yaml

from zimage_batch.jobspec import JobError, load_job

BASE = {"manifest": "s3://b/m.parquet", "output": "s3://b/out"}


def _job_file(tmp_path, settings: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_the_job_file_then_flags_then_set_later_wins(tmp_path):
    job_file = _job_file(tmp_path, {**BASE, "seed": 1, "width": 128, "shard_size": 10, "defaults": {"seed": 0, "height": 256}})
    job = load_job(job_file, {"seed": 2, "shard_size": None}, [])
    assert (job.seed, job.width, job.height, job.shard_size) == (2, 128, 256, 10)  # a flag left out keeps the file's
    job = load_job(job_file, {"seed": 2, "width": 64}, ["seed=3", "defaults.height=512", "seed=4"])
    assert (job.seed, job.width, job.height) == (4, 64, 512)


def test_local_paths_in_a_job_file_are_relative_to_its_folder(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = load_job(_job_file(tmp_path / "jobs", {"manifest": "m.parquet", "output": "../out", "model": "tiny:turbo"}), {}, [])
    assert job.manifest == os.path.join(tmp_path, "jobs", "m.parquet") and job.output == os.path.join(tmp_path, "out")
    assert job.model == "tiny:turbo"
    assert load_job(None, {"manifest": "m.parquet", "output": "out"}, []).manifest == "m.parquet"  # flags: as given


@pytest.mark.parametrize("settings, message", [
    (["widht=64"], "unknown job setting(s): widht (did you mean 'width'?)"),
    (["width=17"], "width must be a multiple of 16, got 17"),
    (["width=abc"], "width: cannot use 'abc' (int | None)"),
    (["format=tiff"], "format must be one of files|webdataset|parquet, got 'tiff'"),
    (["image_format=gif"], "image_format must be one of png|jpeg|webp, got 'gif'"),
    (["seed"], "--set takes key=value, got 'seed'"),
    (["seed=-1"], "seed must be in 0..2**63-1, got -1"),
    (["shard_size=0"], "shard_size must be >= 1"),
    (["controlnet_id=x"], "controlnet_id is worked out by the run, not a job setting"),
    (["template=a {x}", "slots.x=[a]"], "a job takes a manifest or a template, not both"),
])
def test_a_bad_setting_is_refused_in_one_line_naming_it(settings, message):
    with pytest.raises(JobError) as refused:
        load_job(None, BASE, settings)
    assert str(refused.value) == message and "\n" not in str(refused.value)


def test_a_bad_job_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("seed: [1\n")
    for name, message in (("list.yaml", "a job file is a mapping of settings"), ("broken.yaml", "cannot read job file"),
                          ("missing.yaml", "cannot read job file")):
        with pytest.raises(JobError, match=rf"^{tmp_path / name}: {message}") as refused:
            load_job(str(tmp_path / name), BASE, [])
        assert "\n" not in str(refused.value)


#: Fingerprints main computed for these jobs (job.json of every OUTPUT holds one): a change to
#: how a fingerprint is computed makes every earlier OUTPUT "a different job".
PINNED = [
    ({}, "db8cc1aefb5b583c"),
    ({"model": "tiny:turbo"}, "dd5ef26fb7a15be0"),
    ({"model": "tiny:turbo", "width": 512, "height": 768, "guidance_scale": 3.5, "num_images": 2,
      "format": "webdataset", "image_format": "jpeg", "seed": 7}, "0e54803cb125b72a"),
]


@pytest.mark.parametrize("settings, fingerprint", PINNED)
def test_the_fingerprint_of_a_fixed_job_is_stable(settings, fingerprint):
    assert load_job(None, {**BASE, **settings}, []).fingerprint() == fingerprint
    as_set = [f"{k}={v}" for k, v in reversed(settings.items())]  # however the settings were given
    assert load_job(None, BASE, as_set).fingerprint() == fingerprint


def test_settings_that_do_not_decide_the_pixels_leave_the_fingerprint_alone():
    tiny = {**BASE, "model": "tiny:turbo"}
    operational = ["workers=3", "shard_size=50", "batch_size=4", "report=false", "max_attempts=5", "lease_ttl=90",
                   "output=s3://other/place", "manifest=s3://other/m.parquet"]
    assert load_job(None, tiny, operational).fingerprint() == "dd5ef26fb7a15be0"
    assert load_job(None, tiny, ["seed=1"]).fingerprint() != "dd5ef26fb7a15be0"


@pytest.mark.parametrize("settings, message", [
    (["strength=2"], "strength must be in (0, 1], got 2.0"),
    (["strength=0"], "strength must be in (0, 1], got 0.0"),
    (["num_inference_steps=2000"], "num_inference_steps must be <= 1000, got 2000"),
])
def test_the_declared_bounds_apply_to_the_job_value_as_to_a_column(settings, message):
    """The bounds a manifest's column is refused by (settings.Setting.refusals) refuse the job's
    value too, in one line naming the setting."""
    with pytest.raises(JobError) as refused:
        load_job(None, BASE, settings)
    assert str(refused.value) == message


def test_values_on_the_declared_bounds_are_taken():
    job = load_job(None, BASE, ["strength=1", "num_inference_steps=1000", "num_images=64", "cfg_normalization=0"])
    assert (job.strength, job.num_inference_steps, job.num_images) == (1.0, 1000, 64)
    assert load_job(None, BASE, ["strength=0.01", "num_inference_steps=1"]).strength == 0.01


def test_local_weights_are_made_absolute_and_others_kept_as_written(tmp_path, monkeypatch):
    """controlnet and segmenter read as sources (zimage_batch.source): a local path that exists
    made absolute, hub ids, s3:// and tiny: as written."""
    (tmp_path / "net").mkdir()
    (tmp_path / "seg").mkdir()
    monkeypatch.chdir(tmp_path)
    job = load_job(None, BASE, ["controlnet=net", "segmenter=./seg", "mask_prompt=sky"])
    assert (job.controlnet, job.segmenter) == (str(tmp_path / "net"), str(tmp_path / "seg"))
    job = load_job(None, BASE, ["controlnet=org/net", "segmenter=CIDAS/clipseg-rd64-refined"])
    assert (job.controlnet, job.segmenter) == ("org/net", "CIDAS/clipseg-rd64-refined")
    assert load_job(None, BASE, ["controlnet=tiny:2.1", "control=tile"]).controlnet == "tiny:2.1"


def test_control_names_its_choices_when_refused():
    with pytest.raises(JobError, match=r"^control must be canny, tile or none, got 'blur'$"):
        load_job(None, BASE, ["controlnet=tiny:2.1", "control=blur"])
