"""LoRA settings without a model (issue 17): the `lora` spec grammar, the job's `loras` / `lora`
settings and their fingerprint, job.json's per-adapter sha256 on resume, and adapter sources
(local file or folder, S3 with the verified cache)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from zimage_batch.inputs.lora_spec import LoraSpecError, format_lora, parse_lora, resolve_lora
from zimage_batch.jobspec import JobError, JobSpec, load_job
from zimage_batch.model.adapters import adapter_files, file_sha256, resolve_adapter
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.output.ledger import JobMismatch, Ledger
from zimage_batch.storage import open_storage


# ---------------------------------------------------------------------- the spec
@pytest.mark.parametrize("spec, expected", [
    ("style", (("style", 1.0),)),
    (" style : 0.8 ", (("style", 0.8),)),
    ("style:0.8,detail:1", (("detail", 1.0), ("style", 0.8))),
    ("detail,style:0.8", (("detail", 1.0), ("style", 0.8))),
    ("slider:-1.5", (("slider", -1.5),)),
    ("none", ()),
    ("NONE", ()),
    ("", None),
    ("   ", None),
    (None, None),
])
def test_specs_resolve_to_canonical_sets(spec, expected):
    assert parse_lora(spec) == expected


@pytest.mark.parametrize("spec", ["style:", ":0.5", "style,,detail", "style,", "style:x", "style:nan", "style:inf",
                                  "style:10.5", "style:-11", "style:0.5,style:0.6"])
def test_malformed_specs_and_bad_scales_are_refused(spec):
    with pytest.raises(LoraSpecError):
        parse_lora(spec)


def test_metadata_value_and_job_default():
    assert format_lora(parse_lora("style:0.8,detail")) == "detail:1.0,style:0.8"
    assert format_lora(()) is None
    assert resolve_lora(None, "style:0.5") == (("style", 0.5),)
    assert resolve_lora("none", "style:0.5") == ()
    assert resolve_lora("detail", "style:0.5") == (("detail", 1.0),)
    assert resolve_lora(None, None) == ()


# ---------------------------------------------------------------------- the job
def _job(*settings: str) -> JobSpec:
    return load_job(None, {"manifest": "m.parquet", "output": "out"}, list(settings))


def test_loras_are_declared_with_set_and_the_default_is_canonical(tmp_path):
    style = tmp_path / "style.safetensors"
    style.write_bytes(b"x")
    job = _job(f"loras.style={style}", "loras.detail=s3://bucket/loras/detail.safetensors", "lora=style:0.80,detail")
    assert job.loras == {"style": str(style), "detail": "s3://bucket/loras/detail.safetensors"}
    assert job.lora == "detail:1.0,style:0.8"
    assert _job(f"loras.style={style}", "lora=none").lora == "none"
    with pytest.raises(JobError, match=r"does not declare \(ink\)"):
        _job(f"loras.style={style}", "lora=ink")
    with pytest.raises(JobError, match="adapter name"):
        _job("loras.none=x.safetensors")


def test_job_file_adapter_paths_are_relative_to_the_job_file(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"x")
    job_file = tmp_path / "job.yaml"
    job_file.write_text("manifest: m.parquet\noutput: out\nloras:\n  style: loras/style.safetensors\n"
                        "  hub: some-org/some-repo/file.safetensors\nlora: style\n")
    job = load_job(str(job_file), {}, [])
    assert job.loras == {"style": str(tmp_path / "loras" / "style.safetensors"), "hub": "some-org/some-repo/file.safetensors"}


def test_fingerprint_of_a_job_without_adapters_is_unchanged():
    """OUTPUTs written before adapters existed must still resume: the same hash as then."""
    job = JobSpec(manifest="m", output="o")
    before = ("model", "variant", "models", "format", "image_format", "quality", "seed", "width", "height",
              "num_inference_steps", "guidance_scale", "negative_prompt", "cfg_truncation", "cfg_normalization", "strength")
    payload = {name: getattr(job, name) for name in before}
    assert job.fingerprint() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_fingerprint_covers_the_default_and_whether_adapters_are_used_not_which():
    plain = JobSpec(manifest="m", output="o")
    one = JobSpec(manifest="m", output="o", loras={"style": "a.safetensors"})
    two = JobSpec(manifest="m", output="o", loras={"style": "b.safetensors", "detail": "c.safetensors"})
    default = JobSpec(manifest="m", output="o", loras={"style": "a.safetensors"}, lora="style:1.0")
    assert plain.fingerprint() != one.fingerprint() == two.fingerprint() != default.fingerprint()


# ---------------------------------------------------------------------- job.json
def _record(job: JobSpec, adapters: dict) -> dict:
    return {"fingerprint": job.fingerprint(), "job": job.to_dict(), "output_fields": list(JobSpec.OUTPUT_FIELDS),
            "adapters": adapters}


def test_resume_keeps_earlier_adapters_and_refuses_a_changed_file(tmp_path):
    ledger = Ledger(open_storage(str(tmp_path / "out")))
    job = JobSpec(manifest="m", output="o", loras={"style": "s.safetensors"})
    style = {"source": "s.safetensors", "sha256": "a" * 64, "file": "s.safetensors"}
    ledger.claim_output(_record(job, {"style": style}), overwrite=False)
    ink = {"source": "i.safetensors", "sha256": "b" * 64, "file": "i.safetensors"}
    ledger.claim_output(_record(job, {"ink": ink}), overwrite=False)  # a new adapter, for new rows
    assert ledger.read_job()["adapters"] == {"style": style, "ink": ink}
    with pytest.raises(JobMismatch, match="LoRA adapter 'style' was another file"):
        ledger.claim_output(_record(job, {"style": {**style, "sha256": "c" * 64}}), overwrite=False)
    ledger.claim_output(_record(job, {"style": {**style, "sha256": "c" * 64}}), overwrite=True)
    assert ledger.read_job()["adapters"] == {"style": {**style, "sha256": "c" * 64}}


def test_first_adapter_is_another_job_and_says_so(tmp_path):
    ledger = Ledger(open_storage(str(tmp_path / "out")))
    plain = JobSpec(manifest="m", output="o")
    ledger.claim_output({"fingerprint": plain.fingerprint(), "job": plain.to_dict(),
                         "output_fields": list(JobSpec.OUTPUT_FIELDS)}, overwrite=False)
    with pytest.raises(JobMismatch, match=r"differs in: loras\)"):
        ledger.claim_output(_record(JobSpec(manifest="m", output="o", loras={"a": "a.safetensors"}), {}), overwrite=False)


# ---------------------------------------------------------------------- sources
def test_local_file_and_folder_sources(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "style.safetensors").write_bytes(b"weights")
    (tmp_path / "one" / "README.md").write_text("an adapter")
    by_file = resolve_adapter("style", str(tmp_path / "one" / "style.safetensors"))
    by_folder = resolve_adapter("style", str(tmp_path / "one"))
    assert by_file.path == by_folder.path and by_file.sha256 == hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "one" / "pytorch_lora_weights.safetensors").write_bytes(b"diffusers")
    assert resolve_adapter("style", str(tmp_path / "one")).path.endswith("pytorch_lora_weights.safetensors")
    (tmp_path / "one" / "old.bin").write_bytes(b"pickle")
    with pytest.raises(ModelSourceError, match="pickle"):
        resolve_adapter("style", str(tmp_path / "one"))
    (tmp_path / "weights.pt2").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="only .safetensors"):
        resolve_adapter("style", str(tmp_path / "weights.pt2"))


def test_s3_file_is_cached_once_and_verified(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("ZIMAGE_BATCH_CACHE", str(tmp_path / "cache"))
    loras = open_storage(f"s3://{s3_bucket}/loras")
    loras.put_bytes("style.safetensors", b"style weights")
    loras.put_bytes("style.safetensors.bak", b"another file beside it")
    loras.put_bytes("folder/ink.safetensors", b"ink weights")
    first = resolve_adapter("style", f"s3://{s3_bucket}/loras/style.safetensors")
    assert open(first.path, "rb").read() == b"style weights" and first.sha256 == file_sha256(first.path)
    downloaded = os.stat(first.path).st_mtime_ns
    again = resolve_adapter("style", f"s3://{s3_bucket}/loras/style.safetensors")
    assert again == first and os.stat(first.path).st_mtime_ns == downloaded  # not downloaded again
    assert len(list((tmp_path / "cache" / "s3").iterdir())) == 2  # the entry and its lock file
    folder = resolve_adapter("ink", f"s3://{s3_bucket}/loras/folder/")
    assert open(folder.path, "rb").read() == b"ink weights"
    loras.put_bytes("style.safetensors", b"retrained style")  # a new ETag: a new entry, a new sha256
    changed = resolve_adapter("style", f"s3://{s3_bucket}/loras/style.safetensors")
    assert changed.sha256 == hashlib.sha256(b"retrained style").hexdigest() != first.sha256
    with pytest.raises(ModelSourceError, match="no object"):
        resolve_adapter("gone", f"s3://{s3_bucket}/loras/gone.safetensors")


def test_a_worker_refuses_an_adapter_that_changed_since_the_job_began(tmp_path):
    style = tmp_path / "style.safetensors"
    style.write_bytes(b"v1")
    out = open_storage(str(tmp_path / "out"))
    out.put_bytes("job.json", json.dumps({"adapters": {"style": {"sha256": file_sha256(style)}}}).encode())
    recorded = Ledger(out).recorded_adapters()
    assert adapter_files({"style": str(style)}, recorded) == {"style": str(style)}
    style.write_bytes(b"v2, retrained")
    with pytest.raises(ModelSourceError, match="changed while the job ran"):
        adapter_files({"style": str(style)}, recorded)
    assert Ledger(open_storage(str(tmp_path / "empty"))).recorded_adapters() == {}
