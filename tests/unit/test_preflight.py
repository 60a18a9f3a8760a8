"""Preflight resolves the job once and leaves it as it was given; job.json stays what earlier runs wrote;
one environment policy for workers and submitted jobs."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from zimage_batch.jobspec import JobSpec, load_job
from zimage_batch.run.cluster import forwarded_env
from zimage_batch.run.preflight import check_manifest, job_record, prepare, resolve, scratch_needed

# job.json of these settings as the driver wrote it before preflight existed (less the dead
# `dtype` setting, plus the settings added since: `unsafe_allow_overwriting_commits`, `lora`,
# `loras`, the ControlNet's, `num_images`, `gpu_seconds_per_image`, `strict_columns`, `stall_timeout`,
# `speculate`, the template's and prompt expansion's): an OUTPUT written then must resume, so the fingerprint stays put.
EARLIER_RECORD = {
    "defaults": {"cfg_normalization": 0.0, "cfg_truncation": 1.0, "guidance_scale": 4.0, "height": 768,
                 "negative_prompt": "blurry", "num_images": 1, "num_inference_steps": 50, "strength": 0.6,
                 "width": 512},
    "fingerprint": "be33fc809334206a",
    "job": {"address": None, "attention_backend": None, "batch_size": None, "canny_high": 200.0, "canny_low": 100.0,
            "cfg_normalization": 0.0, "cfg_truncation": 1.0, "compile": False, "control": None, "control_image": None,
            "control_scale": 0.75, "controlnet": None, "controlnet_id": None, "device": None, "format": "webdataset",
            "gpu_seconds_per_image": None, "grace_period": 60.0, "lease_ttl": 120.0, "lease_renew_interval": 20.0,
            "wait": False, "scores": [], "scorers": {}, "keep": None, "max_tries": 1, "embeddings": False,
            "dedup_within_row": None, "scorer_ids": {}, "guidance_scale": None, "height": 768,
            "image_format": "jpeg", "lora": None, "loras": {}, "low_vram": "auto",
            "anchor": None, "aspect": None, "mask": None, "mask_blur": 0, "mask_grow": 0, "mask_invert": False,
            "mask_prompt": None, "mask_threshold": None, "outpaint": None, "segmenter": None, "segmenter_id": None,
            "manifest": "/data/prompts", "max_attempts": 3, "max_source_pixels": 64000000, "model": "tiny:base",
            "models": {"turbo": "tiny:turbo"}, "negative_prompt": "blurry", "num_images": 1, "num_inference_steps": None,
            "output": "s3://bucket/out", "overwrite": False, "progress_interval": 10.0, "quality": 90,
            "report": True, "runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "<set>"}}, "seed": 7,
            "shard_size": 1000, "speculate": True, "stall_timeout": None, "strength": 0.6, "strict_columns": False,
            "unsafe_allow_overwriting_commits": False,
            "variant": "base", "width": 512, "workers": 4,
            "template": None, "template_name": "template", "slots": {}, "expand": "product", "samples": None,
            "prompt_expansion": None, "prompt_expansion_id": None, "prompt_expansion_instructions": None,
            "max_new_tokens": 256, "caption": "expanded"},
    "model_draws_noise": False,
    "output_fields": ["model", "variant", "models", "format", "image_format", "quality", "seed", "width", "height",
                      "num_inference_steps", "guidance_scale", "negative_prompt", "cfg_truncation",
                      "cfg_normalization", "strength", "lora", "loras", "num_images",
                      "scores", "scorer_ids", "keep", "max_tries", "embeddings", "dedup_within_row"],
}


def test_job_record_and_fingerprint_are_those_earlier_runs_wrote():
    job = JobSpec(manifest="/data/prompts/", output="s3://bucket/out", model="tiny:base", format="webdataset",
                  image_format="jpeg", quality=90, seed=7, width=512, height=768, negative_prompt="blurry",
                  models={"turbo": "tiny:turbo"}, workers=4, runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}})
    job.validate()
    assert job_record(resolve(job)) == EARLIER_RECORD


def _manifest(path) -> None:
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"],
                             "variant": ["turbo", "base"]}), path)


def test_checks_leave_the_job_as_given_and_resolve_it_once(tmp_path, monkeypatch):
    _manifest(tmp_path / "m.parquet")
    monkeypatch.chdir(tmp_path)
    job = load_job(None, {"manifest": "m.parquet", "output": "out", "model": "tiny:turbo"}, [])
    before = job.to_dict()
    calls = {"fingerprint": 0, "defaults": 0}
    for name in calls:
        real = getattr(JobSpec, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(JobSpec, name, counting)
    prepared = prepare(job)
    resolved = prepared.job
    job_record(resolved, prepared.model)
    resolved.worker_settings("turbo")
    resolved.worker_settings("base")
    scratch_needed(resolved)
    assert job.to_dict() == before, "a check changed the job it was given"
    assert calls == {"fingerprint": 1, "defaults": 2}  # once, and once per variant the rows use
    assert resolved.variant == "turbo" and set(resolved.defaults) == {"turbo", "base"}
    assert resolved.defaults["base"]["num_inference_steps"] == 50 and resolved.defaults["turbo"]["num_inference_steps"] == 8
    # local paths absolute, for workers that run in another folder; the record says the same
    assert resolved.spec.manifest == str(tmp_path / "m.parquet") and resolved.spec.output == str(tmp_path / "out")
    assert job_record(resolved)["job"]["manifest"] == str(tmp_path / "m.parquet")


def test_local_model_folders_reach_workers_as_absolute_paths_with_the_same_fingerprint(tmp_path, monkeypatch):
    for folder in ("mine", "mine-base"):
        (tmp_path / "models" / folder).mkdir(parents=True)  # a folder is enough: nothing loads it here
    _manifest(tmp_path / "m.parquet")
    monkeypatch.chdir(tmp_path)
    job = load_job(None, {"manifest": "m.parquet", "output": "out", "model": "models/mine"},
                   ["models.base=models/mine-base"])
    _, resolved = check_manifest(job)
    turbo, base = resolved.worker_settings("turbo"), resolved.worker_settings("base")
    assert turbo.model == str(tmp_path / "models" / "mine") and base.model == str(tmp_path / "models" / "mine-base")
    assert turbo.job.manifest == str(tmp_path / "m.parquet") and turbo.job.output == str(tmp_path / "out")
    assert turbo.fingerprint == base.fingerprint == resolved.fingerprint == resolve(job).fingerprint
    assert base.defaults == resolved.defaults["base"] and base.job_variant == "turbo"
    record = job_record(resolved)["job"]
    assert (record["model"], record["models"]) == ("models/mine", {"base": "models/mine-base"})  # as typed: as fingerprinted


def test_one_environment_policy_forwards_settings_not_secrets_nor_this_machines_paths():
    environ = {
        "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_RETRY_MODE": "adaptive",
        "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "https://hf-mirror", "ZIMAGE_BATCH_FAULT_CRASH_SHARDS": "x",
        # credentials
        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "HF_TOKEN": "hf_x",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.2/creds", "ZIMAGE_BATCH_PASSWORD": "p",
        # things on this machine
        "AWS_PROFILE": "laptop", "AWS_CONFIG_FILE": "/home/me/.aws/config", "AWS_SHARED_CREDENTIALS_FILE": "/x",
        "AWS_CA_BUNDLE": "/etc/ca.pem", "HF_HOME": "/home/me/hf", "HF_HUB_CACHE": "/x", "ZIMAGE_BATCH_CACHE": "/x",
        # not ours
        "PATH": "/usr/bin", "RAY_ADDRESS": "auto", "AWSOME": "1",
    }
    assert forwarded_env(environ) == {
        "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_RETRY_MODE": "adaptive",
        "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "https://hf-mirror", "ZIMAGE_BATCH_FAULT_CRASH_SHARDS": "x",
    }
    assert forwarded_env() == forwarded_env(dict(os.environ))


def test_submit_and_the_driver_share_the_policy():
    import zimage_batch.run.cluster as cluster
    import zimage_batch.submit as submit

    assert submit.forwarded_env is cluster.forwarded_env
    assert not hasattr(submit, "FORWARDED_ENV")
