"""Pins what earlier versions wrote, so that no refactoring of the settings changes it: job
fingerprints (an OUTPUT written before must resume), job.json's keys and defaults, and the
metadata schema of prompt and edit jobs (names, order, Arrow types). The literals were computed
on the code before the settings were declared in one place (zimage_batch/settings.py)."""

from __future__ import annotations

import pytest

from zimage_batch.generate.requests import EditRequest, GenerationRequest
from zimage_batch.jobspec import JobSpec
from zimage_batch.metadata_schema import metadata_columns
from zimage_batch.run.preflight import job_record, resolve
from zimage_batch.run.rows import row_record

BASE = dict(manifest="/m.parquet", output="/o", model="tiny:turbo")
JOBS = {
    "plain_turbo": {},
    "base_cfg": dict(model="tiny:base", variant="base", guidance_scale=4.0, cfg_truncation=0.9,
                     cfg_normalization=1.0, num_inference_steps=30, negative_prompt="blurry", width=512, height=768),
    "loras": dict(loras={"style": "/a.safetensors", "ink": "/b.safetensors"}, lora="ink:0.5,style"),
    "controlnet": dict(controlnet="tiny:2.1", controlnet_id="abc123", control="canny", control_scale=0.6,
                       canny_low=50.0),
    "masks": dict(mask="alpha", mask_grow=8, mask_blur=4, outpaint="128x128"),
    "num_images": dict(num_images=3, seed=7),
    "curation": dict(scores=["clip", "aesthetic"], scorer_ids={"clip": "c1", "aesthetic": "a1"},
                     keep="clip_score >= 0.2", max_tries=3, embeddings=True),
    "expansion": dict(prompt_expansion="tiny:prompt", prompt_expansion_id="p1",
                      prompt_expansion_instructions="Rewrite.", max_new_tokens=64, caption="original"),
    "webdataset_jpeg": dict(format="webdataset", image_format="jpeg", quality=90, strength=0.5),
}
# job -> (JobSpec.fingerprint() as given, the resolved job's fingerprint)
FINGERPRINTS = {
    "plain_turbo": ("dd5ef26fb7a15be0", "5f42864ecf8adf1b"),
    "base_cfg": ("2b685b9ca0065b3e", "2b685b9ca0065b3e"),
    "loras": ("e24371a922a35d4b", "e166b13f843cce3a"),
    "controlnet": ("96a2b67f5b7e6a0d", "226b3c8f4c1df2a7"),
    "masks": ("2baea0fb039f5b2e", "14b32e99c1429a4d"),
    "num_images": ("669ca1559c931a69", "f04ecc447a37a51f"),
    "curation": ("aa5968de5cec73dd", "d4ce76363e524fbf"),
    "expansion": ("2e006ef9e68e6e2f", "1483177c962220c2"),
    "webdataset_jpeg": ("5e9eaf5e5802de0d", "26cd178c89cea2a8"),
}


def job(name: str) -> JobSpec:
    return JobSpec(**{**BASE, **JOBS[name]})


@pytest.mark.parametrize("name", sorted(JOBS))
def test_fingerprints_of_jobs_written_by_earlier_versions_stay_the_same(name):
    spec = job(name)
    assert (spec.fingerprint(), resolve(spec).fingerprint) == FINGERPRINTS[name]


JOB_KEYS = [
    "manifest", "output", "model", "variant", "models", "format", "image_format", "quality", "seed", "width",
    "height", "num_inference_steps", "guidance_scale", "negative_prompt", "cfg_truncation", "cfg_normalization",
    "strength", "loras", "lora", "controlnet", "control_image", "control", "control_scale", "canny_low",
    "canny_high", "controlnet_id", "num_images", "scores", "scorers", "keep", "max_tries", "embeddings",
    "dedup_within_row", "scorer_ids", "template", "template_name", "slots", "expand", "samples",
    "prompt_expansion", "prompt_expansion_id", "prompt_expansion_instructions", "max_new_tokens", "caption", "mask",
    "mask_grow", "mask_blur", "outpaint", "aspect", "anchor", "mask_prompt", "mask_threshold", "mask_invert",
    "segmenter", "segmenter_id", "max_source_pixels", "workers", "batch_size", "shard_size", "address", "device",
    "attention_backend", "compile", "low_vram", "max_attempts", "grace_period", "speculate", "lease_ttl",
    "lease_renew_interval", "wait", "stall_timeout", "progress_interval", "report", "strict_columns",
    "gpu_seconds_per_image", "overwrite", "unsafe_allow_overwriting_commits", "runtime_env",
]
OUTPUT_FIELDS = [
    "model", "variant", "models", "format", "image_format", "quality", "seed", "width", "height",
    "num_inference_steps", "guidance_scale", "negative_prompt", "cfg_truncation", "cfg_normalization", "strength",
    "lora", "loras", "num_images", "scores", "scorer_ids", "keep", "max_tries", "embeddings", "dedup_within_row",
]
MORE_OUTPUT_FIELDS = {
    "controlnet": ["controlnet_id", "control_image", "control", "control_scale", "canny_low", "canny_high"],
    "masks": ["mask", "mask_grow", "mask_blur", "outpaint", "aspect", "anchor", "mask_prompt", "mask_threshold",
              "mask_invert", "segmenter_id"],
    "expansion": ["prompt_expansion_id", "prompt_expansion_instructions", "max_new_tokens", "caption"],
    "base_cfg": [],
}


def test_job_json_keeps_its_keys_defaults_and_output_fields():
    record = job_record(resolve(job("plain_turbo")))
    assert list(record) == ["fingerprint", "job", "defaults", "output_fields", "model_draws_noise"]
    assert list(record["job"]) == JOB_KEYS
    assert list(JobSpec().to_dict()) == JOB_KEYS
    assert record["defaults"] == {"width": 64, "height": 64, "num_inference_steps": 8, "guidance_scale": 0.0,
                                  "negative_prompt": None, "cfg_truncation": 1.0, "cfg_normalization": 0.0,
                                  "strength": 0.6, "num_images": 1}
    assert list(record["defaults"]) == ["width", "height", "num_inference_steps", "guidance_scale", "negative_prompt",
                                        "cfg_truncation", "cfg_normalization", "strength", "num_images"]
    assert record["output_fields"] == OUTPUT_FIELDS
    for name, more in MORE_OUTPUT_FIELDS.items():
        assert job_record(resolve(job(name)))["output_fields"] == OUTPUT_FIELDS + more, name
    assert job_record(resolve(job("base_cfg")))["defaults"] == {
        "width": 512, "height": 768, "num_inference_steps": 30, "guidance_scale": 4.0, "negative_prompt": "blurry",
        "cfg_truncation": 0.9, "cfg_normalization": 1.0, "strength": 0.6, "num_images": 1}


def test_defaults_per_variant_stay_the_same():
    spec = resolve(JobSpec(**{**BASE, "model": "Tongyi-MAI/Z-Image-Turbo"})).spec
    assert spec.defaults("turbo") == {"width": 1024, "height": 1024, "num_inference_steps": 8, "guidance_scale": 0.0,
                                      "negative_prompt": None, "cfg_truncation": 1.0, "cfg_normalization": 0.0,
                                      "strength": 0.6, "num_images": 1}
    base = spec.defaults("base")
    assert (base["num_inference_steps"], base["guidance_scale"]) == (50, 4.0)


PROMPT_SCHEMA = [
    ("id", "string"), ("status", "string"), ("error", "string"), ("image", "string"), ("sha256", "string"),
    ("seed", "int64"), ("width", "int64"), ("height", "int64"), ("num_inference_steps", "int64"),
    ("guidance_scale", "double"), ("cfg_truncation", "double"), ("cfg_normalization", "double"),
    ("negative_prompt", "string"), ("variant", "string"), ("model", "string"), ("prompt", "string"),
    ("duration_ms", "double"),
]
PROMPT_SCHEMA_ALL = [
    ("id", "string"), ("image_index", "int64"), ("status", "string"), ("error", "string"), ("image", "string"),
    ("sha256", "string"), ("seed", "int64"), ("width", "int64"), ("height", "int64"),
    ("num_inference_steps", "int64"), ("guidance_scale", "double"), ("cfg_truncation", "double"),
    ("cfg_normalization", "double"), ("negative_prompt", "string"), ("variant", "string"), ("model", "string"),
    ("prompt", "string"), ("prompt_original", "string"), ("duration_ms", "double"), ("lora", "string"),
    ("control_image", "string"), ("control", "string"), ("control_scale", "double"), ("control_sha256", "string"),
]
EDIT_LINEAGE = [
    ("source", "string"), ("source_sha256", "string"), ("source_width", "int64"), ("source_height", "int64"),
    ("mode", "string"), ("strength", "double"), ("mask", "string"),
]
EDIT_SCHEMA_ALL = [
    *PROMPT_SCHEMA_ALL[:17], ("duration_ms", "double"), *EDIT_LINEAGE, ("lora", "string"),
    ("control_image", "string"), ("control", "string"), ("control_scale", "double"), ("control_sha256", "string"),
    ("mask_sha256", "string"), ("mask_grow", "int64"), ("mask_blur", "int64"), ("outpaint", "string"),
    ("anchor", "string"), ("mask_prompt", "string"), ("mask_threshold", "double"), ("mask_invert", "bool"),
]


def _pairs(columns) -> list[tuple[str, str]]:
    return [(name, str(t)) for name, t in columns.items()]


def test_metadata_schema_of_prompt_and_edit_jobs_stays_the_same():
    assert _pairs(metadata_columns(False)) == PROMPT_SCHEMA
    assert _pairs(metadata_columns(False, True, True, True, None, True, False)) == PROMPT_SCHEMA_ALL
    assert _pairs(metadata_columns(True)) == PROMPT_SCHEMA + EDIT_LINEAGE
    assert _pairs(metadata_columns(True, True, True, True, None, False, True)) == EDIT_SCHEMA_ALL


def test_row_records_keep_their_keys():
    """(Their order shows nowhere: the metadata follows its schema, the sample JSON sorts its keys.)"""
    settings = resolve(job("loras")).worker_settings("turbo")
    request = GenerationRequest("a fox", 5, 64, 64, 8, 0.0, lora=(("ink", 0.5),))
    record = row_record({"id": "r1", "image_index": 0, "prompt_original": "fox"}, request, settings)
    assert sorted(record) == sorted(["id", "image_index", "prompt", "prompt_original", "negative_prompt", "seed",
                                     "width", "height", "num_inference_steps", "guidance_scale", "cfg_truncation",
                                     "cfg_normalization", "variant", "model", "lora"])
    assert record["lora"] == "ink:0.5" and record["model"] == "tiny:turbo"
    edit = EditRequest("make it red", 5, 64, 64, 8, 0.0, mode="img2img")
    plain = resolve(job("plain_turbo")).worker_settings("turbo")
    assert sorted(row_record({"id": "r2"}, edit, plain)) == sorted([
        "id", "prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale",
        "cfg_truncation", "cfg_normalization", "variant", "model"])


def test_batch_keys_stay_the_same():
    request = GenerationRequest("a", 1, 64, 96, 8, 0.0, None, 0.9, 1.0, (("ink", 0.5),))
    assert request.batch_key() == ("text-to-image", 64, 96, 8, 0.0, 0.9, 1.0, (("ink", 0.5),))
    edit = EditRequest("b", 1, 64, 64, 8, 1.5, mode="img2img", strength=0.4)
    assert edit.batch_key() == ("img2img", 64, 64, 8, 1.5, 1.0, 0.0, (), 0.4)
    assert EditRequest("b", 1, 64, 64, 8, 1.5, mode="edit").batch_key()[-1] == -1.0
