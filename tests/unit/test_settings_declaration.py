"""The generation settings' declaration (zimage_batch/settings.py): what each stage derives from
it, and a throwaway setting added in that one place reaching the job, the manifest checks, the
request, its batch key and the metadata."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa

from zimage_batch import settings as declared
from zimage_batch.generate.requests import ControlRequest, EditRequest, GenerationRequest
from zimage_batch.inputs.columns import ALIASES, EDIT_COLUMNS, PROMPT_COLUMNS
from zimage_batch.inputs.control import CONTROL_FIELDS, ControlJob
from zimage_batch.inputs.mask_spec import MaskJob, derived_mask_columns, masks_used
from zimage_batch.jobspec import JobSpec
from zimage_batch.metadata_schema import METADATA_COLUMNS, control_columns, mask_columns, metadata_columns

ROOT = Path(__file__).resolve().parents[2]


def test_every_declared_job_setting_is_a_jobspec_field_of_its_type_and_default():
    fields = {f.name: f for f in dataclasses.fields(JobSpec)}
    for s in declared.settings():
        assert fields[s.name].default == s.default, s.name
        assert fields[s.name].type == s.annotation(), s.name
    assert fields["width"].type == "int | None" and fields["cfg_truncation"].type == "float"


def test_declared_columns_are_known_to_the_manifest_with_their_type_family():
    for s in declared.select(lambda s: s.column is not None):
        columns = EDIT_COLUMNS if s.manifests == declared.EDIT else PROMPT_COLUMNS
        assert columns[s.name] == s.column, s.name
    assert "canny_low" not in PROMPT_COLUMNS | EDIT_COLUMNS  # a job setting only
    assert ALIASES["controlnet_conditioning_scale"] == "control_scale" and ALIASES["steps"] == "num_inference_steps"


def test_bounds_read_as_the_manifest_refusals_say_them():
    assert declared.setting("num_inference_steps").refusals() == [("le", "must be > 0"), ("gt", "must be <= 1000")]
    assert declared.setting("strength").refusals() == [("in", "must be in (0, 1]")]
    assert declared.setting("cfg_normalization").refusals() == [("lt", "must be >= 0 (0 or false: off)")]
    assert declared.setting("num_images").refusals() == [("lt", "must be >= 1"), ("gt", "must be <= 64 (MAX_NUM_IMAGES)")]
    assert declared.setting("width").refusals() == []  # multiples of 16 within the variant's sides


def test_requests_take_the_declared_optional_fields_and_batch_keys():
    for kind, cls in (("text-to-image", GenerationRequest), ("edit", EditRequest), ("control", ControlRequest)):
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[:6] == ["prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale"]
        for s in declared.request_settings(kind):
            assert s.name in names and names.index(s.name) < names.index("lora"), (kind, s.name)
    assert "control_scale" not in {f.name for f in dataclasses.fields(GenerationRequest)}
    assert declared.batch_key_names("text-to-image") == ("width", "height", "num_inference_steps", "guidance_scale",
                                                        "cfg_truncation", "cfg_normalization")
    control = ControlRequest("p", 1, 64, 64, 4, 0.0, control="canny", control_scale=0.5)
    assert control.batch_key() == ("controlnet", 64, 64, 4, 0.0, 1.0, 0.0, (), "canny", 0.5)


def test_the_control_settings_are_one_list_for_the_job_and_the_worker():
    assert CONTROL_FIELDS == ("controlnet_id", "control_image", "control", "control_scale", "canny_low", "canny_high")
    job = ControlJob.from_mapping(JobSpec(controlnet="tiny:2.1", control="canny", control_scale=0.4).to_dict())
    assert (job.control, job.control_scale, job.canny) == ("canny", 0.4, (100.0, 200.0))
    assert list(control_columns()) == ["control_image", "control", "control_scale", "control_sha256"]


def test_metadata_columns_follow_the_declaration():
    sampler = declared.metadata_settings("sampler")
    assert list(sampler) == ["seed", "width", "height", "num_inference_steps", "guidance_scale", "cfg_truncation",
                             "cfg_normalization", "negative_prompt"]  # negative_prompt: metadata_after
    assert all(METADATA_COLUMNS[name] == t for name, t in sampler.items())


def test_with_settings_puts_declared_fields_where_the_marker_is():
    from typing import ClassVar

    @dataclasses.dataclass
    @declared.with_settings
    class Probe:
        first: int = 0
        here: ClassVar[declared.Here] = declared.Here(lambda: declared.job_settings("images"))
        last: str = "x"

    assert [f.name for f in dataclasses.fields(Probe)] == ["first", "num_images", "last"]
    assert Probe().num_images == 1 and not hasattr(Probe, "here")


MASK_SETTINGS = ["mask", "mask_grow", "mask_blur", "outpaint", "aspect", "anchor", "mask_prompt", "mask_threshold",
                 "mask_invert"]


def test_the_mask_settings_and_lora_are_declared_once():
    names = [s.name for s in declared.settings()]
    assert len(names) == len(set(names))
    assert [s.name for s in declared.job_settings("mask")] == MASK_SETTINGS
    assert [s.name for s in declared.job_settings("lora")] == ["lora"]
    for s in (*declared.job_settings("mask"), declared.setting("lora")):
        assert s.added and s.fingerprint and not s.row_default and not s.request and not s.batch_key, s.name
    assert declared.setting("mask_threshold").annotation() == "float | None"
    assert declared.setting("mask_invert").annotation() == "bool"


def test_mask_settings_and_lora_reach_the_jobspec_in_job_json_order():
    names = [f.name for f in dataclasses.fields(JobSpec)]
    assert names[names.index("loras"):names.index("loras") + 2] == ["loras", "lora"]
    at = names.index("mask")
    assert names[at:at + len(MASK_SETTINGS) + 2] == [*MASK_SETTINGS, "segmenter", "segmenter_id"]
    assert JobSpec(mask_grow=8).mask_grow == 8 and JobSpec().mask_invert is False
    # the workers' MaskJob takes the same declared fields, then the segmenter
    assert [f.name for f in dataclasses.fields(MaskJob)] == [*MASK_SETTINGS, "segmenter", "segmenter_id"]
    job = MaskJob.from_mapping(JobSpec(outpaint="96x96", anchor="top", mask_blur=3).to_dict())
    assert (job.outpaint, job.anchor, job.mask_blur, job.mask_grow) == ("96x96", "top", 3, 0)


def test_mask_settings_and_lora_reach_the_manifest_columns():
    assert {name: EDIT_COLUMNS[name] for name in MASK_SETTINGS} == {
        "mask": "string", "mask_grow": "integer", "mask_blur": "integer", "outpaint": "string", "aspect": "string",
        "anchor": "string", "mask_prompt": "string", "mask_threshold": "number", "mask_invert": "boolean or number"}
    assert not set(MASK_SETTINGS) & set(PROMPT_COLUMNS)
    assert PROMPT_COLUMNS["lora"] == "string" and "lora" not in EDIT_COLUMNS
    assert ALIASES["mask_image"] == "mask"
    assert derived_mask_columns() == tuple(MASK_SETTINGS[1:])  # `mask` alone may be a given file
    assert masks_used(["id", "source", "mask"], MaskJob()) is False
    assert masks_used(["id", "source", "mask_blur"], MaskJob()) is True
    assert MaskJob().refusal_on_prompt_manifest("m.parquet") is None
    assert MaskJob(mask_grow=2).refusal_on_prompt_manifest("m.parquet") == (
        "mask, mask_grow, mask_blur, outpaint, aspect and anchor edit source images, and m.parquet is a prompt "
        "manifest (no source column); leave them unset")


def test_mask_settings_and_lora_reach_the_metadata_schema():
    assert {name: str(t) for name, t in mask_columns().items()} == {
        "mask_sha256": "string", "mask_grow": "int64", "mask_blur": "int64", "outpaint": "string",
        "anchor": "string", "mask_prompt": "string", "mask_threshold": "double", "mask_invert": "bool"}
    edit = list(metadata_columns(True, lora=True, masks=True))
    assert edit[edit.index("mask"):] == ["mask", "lora", *mask_columns()]  # after the lineage and lora
    assert "mask_grow" not in metadata_columns(False, masks=True) and "mask_grow" not in metadata_columns(True)
    assert metadata_columns(False, lora=True)["lora"] == pa.string() and "lora" not in METADATA_COLUMNS


def test_mask_settings_and_lora_are_hashed_only_when_set():
    plain = JobSpec(manifest="/m", output="/o")
    assert "mask_grow" not in plain.output_fields() and "lora" in plain.output_fields()
    for name, value in (("mask_grow", 4), ("mask_prompt", "sky"), ("mask_invert", True), ("anchor", "top")):
        job = JobSpec(manifest="/m", output="/o", **{name: value})
        assert job.fingerprint() != plain.fingerprint(), name
        assert job.output_fields()[-len(MASK_SETTINGS) - 1:] == (*MASK_SETTINGS, "segmenter_id")
    assert JobSpec(manifest="/m", output="/o", mask_prompt="").fingerprint() == plain.fingerprint()
    assert JobSpec(manifest="/m", output="/o", mask_invert=False).fingerprint() == plain.fingerprint()
    assert JobSpec(manifest="/m", output="/o", lora="none").fingerprint() != plain.fingerprint()


THROWAWAY = textwrap.dedent('''
    import json, sys
    import pyarrow as pa, pyarrow.parquet as pq
    from zimage_batch import settings

    # the one place: a new sampler setting, declared
    settings.SETTINGS = settings.SETTINGS + (settings.Setting(
        "sharpness", float, 0.5, minimum=0, column=settings.NUMBER, request=True, batch_key=True,
        metadata=pa.float64(), added=settings.NOT_DEFAULT),)

    from zimage_batch.inputs.manifest import ManifestError, open_manifest
    from zimage_batch.inputs.validation import Limits, validate_manifest
    from zimage_batch.jobspec import load_job
    from zimage_batch.metadata_schema import metadata_columns
    from zimage_batch.model.variants import get_variant
    from zimage_batch.output.metadata import metadata_table
    from zimage_batch.run.preflight import resolve
    from zimage_batch.run.rows import request_for_row, row_record

    folder = sys.argv[1]
    out = {}
    plain = load_job(None, {"manifest": folder + "/m.parquet", "output": folder + "/o", "model": "tiny:turbo"}, [])
    job = load_job(None, {"manifest": folder + "/m.parquet", "output": folder + "/o", "model": "tiny:turbo"},
                   ["sharpness=0.8"])
    out["job_value"] = job.sharpness
    out["plain_fingerprint"] = plain.fingerprint()
    out["fingerprint_differs"] = job.fingerprint() != plain.fingerprint()
    worker = resolve(job).worker_settings("turbo")
    out["default"] = worker.defaults["sharpness"]
    turbo = get_variant("turbo")
    given = request_for_row({"id": "a", "prompt": "p", "sharpness": 0.3}, worker, turbo, edit=False)
    empty = request_for_row({"id": "b", "prompt": "p"}, worker, turbo, edit=False)
    edit = request_for_row({"id": "c", "prompt": "p", "source": "s.png", "sharpness": 0.2}, worker, turbo, edit=True)
    out["requests"] = [given.sharpness, empty.sharpness, edit.sharpness]
    out["keys_differ"] = given.batch_key() != empty.batch_key()
    out["key"] = list(given.batch_key())
    record = row_record({"id": "a"}, given, worker)
    out["record"] = record["sharpness"]
    out["schema"] = [str(metadata_columns(False)["sharpness"]), list(metadata_columns(True)).index("sharpness")]
    rows = pa.table({"id": ["a"]})
    table = metadata_table([record | {"status": "ok"}], rows, pa.schema([]), edit=False)
    out["table"] = table.column("sharpness").to_pylist()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "sharpness": [0.1, -1.0]}), folder + "/m.parquet")
    try:
        validate_manifest(open_manifest(folder + "/m.parquet"), Limits("turbo", 64, 64, 8, 0.0))
    except ManifestError as exc:
        out["refused"] = str(exc)
    print(json.dumps(out))
''')


def test_a_setting_declared_in_one_place_reaches_job_request_batch_key_and_metadata(tmp_path):
    """A throwaway sampler setting, added to the declaration table only (in a fresh interpreter,
    so that every dataclass is built with it), from job file to metadata."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", THROWAWAY, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["job_value"] == 0.8 and out["default"] == 0.8
    assert out["plain_fingerprint"] == "dd5ef26fb7a15be0"  # an added setting at its default: the old fingerprint
    assert out["fingerprint_differs"]
    assert out["requests"] == [0.3, 0.8, 0.2]
    assert out["keys_differ"] and 0.3 in out["key"]
    assert out["record"] == 0.3 and out["table"] == [0.3]
    assert out["schema"][0] == "double"  # and its column comes with the settings, just before `variant`:
    assert out["schema"][1] == list(METADATA_COLUMNS).index("variant")
    assert "column 'sharpness' must be >= 0" in out["refused"] and "id='b'" in out["refused"]


def test_without_the_throwaway_setting_the_schema_has_no_such_column():
    assert "sharpness" not in METADATA_COLUMNS and pa.float64() == declared.setting("cfg_truncation").metadata


def test_every_group_hashes_only_its_fingerprint_settings(monkeypatch):
    """`Setting.fingerprint` decides for every group (settings.fingerprint_fields): a control or
    mask setting declared out of the fingerprint leaves it, and the workers still get it."""
    from zimage_batch.inputs import control, mask_spec

    unhashed = {"canny_high", "mask_blur"}
    monkeypatch.setattr(declared, "SETTINGS", tuple(
        dataclasses.replace(s, fingerprint=False) if s.name in unhashed else s for s in declared.SETTINGS))
    assert "canny_high" not in control.control_fields() and "canny_low" in control.control_fields()
    assert "mask_blur" not in mask_spec.fingerprint_fields() and "mask_grow" in mask_spec.fingerprint_fields()
    job = JobSpec(controlnet="tiny:2.1", canny_high=150.0, mask_blur=3)
    assert ControlJob.from_mapping(job.to_dict()).canny_high == 150.0
    assert MaskJob.from_mapping(job.to_dict()).mask_blur == 3


def test_the_two_added_rules_are_declared_and_decided_in_one_place():
    assert declared.setting("num_images").added == declared.NOT_DEFAULT
    assert {s.added for s in (*declared.job_settings("mask"), declared.setting("lora"))} == {declared.SET}
    assert declared.setting("seed").added == declared.ALWAYS
    # num_images: hashed unless 1; the SET ones unless empty, 0, False or their default
    assert not declared.setting("num_images").hashed(1) and declared.setting("num_images").hashed(2)
    assert not declared.setting("mask_prompt").hashed("") and declared.setting("mask_prompt").hashed("sky")
    assert not declared.hashed(declared.SET, 1, 1) and declared.hashed(declared.SET, 3, 1)  # max_tries
    assert declared.hashed(declared.ALWAYS, None, None)
    try:
        declared.Setting("x", float, 0.5, added=True)  # type: ignore[arg-type]
    except ValueError as exc:
        assert "added must be one of" in str(exc)
    else:
        raise AssertionError("added=True is no rule")
    # the pinned fingerprints hold whichever way a field is hashed (tests/unit/test_settings_pins.py)
    plain = JobSpec(manifest="/m", output="/o")
    assert JobSpec(manifest="/m", output="/o", lora="").fingerprint() == plain.fingerprint()
    assert JobSpec(manifest="/m", output="/o", max_tries=1).fingerprint() == plain.fingerprint()
    assert JobSpec(manifest="/m", output="/o", num_images=2).fingerprint() != plain.fingerprint()


def test_a_bound_refuses_a_value_as_the_manifest_does():
    assert declared.setting("strength").refusal(2.0) == "must be in (0, 1]"
    assert declared.setting("strength").refusal(0.0) == "must be in (0, 1]"
    assert declared.setting("strength").refusal(1.0) is None
    assert declared.setting("num_inference_steps").refusal(0) == "must be > 0"
    assert declared.setting("num_inference_steps").refusal(1001) == "must be <= 1000"
    assert declared.setting("cfg_truncation").refusal(-0.5) == "must be >= 0"
    assert declared.setting("width").refusal(10**6) is None
