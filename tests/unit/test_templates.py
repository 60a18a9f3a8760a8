"""Prompt templates (inputs/templates.py): counts, stable ids, slot values as metadata, appended
slot values that only add rows (and leave committed shards alone), refusals in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_in_process import cli_in_process

from zimage_batch.inputs.manifest import ManifestError
from zimage_batch.inputs.templates import TemplateManifest, make_template, row_id
from zimage_batch.jobspec import JobError, load_job
from zimage_batch.run.plan import make_plan
from zimage_batch.run.preflight import check_manifest

TEXT = "a {concept} in the style of {style}"


def _rows(manifest: TemplateManifest) -> dict[str, list[dict]]:
    return {f.name: manifest.read_rows(f, 0, f.num_rows).to_pylist() for f in manifest.files}


def test_a_product_has_every_combination_with_ids_from_the_slot_values():
    t = make_template("cats", TEXT, {"concept": ["cat", "dog"], "style": ["oil", "ink", "pencil"]})
    m = TemplateManifest(t)
    assert m.num_rows == 6 and len(m.files) == 2 and all(f.num_rows == 3 for f in m.files)
    rows = [r for part in _rows(m).values() for r in part]
    assert {(r["concept"], r["style"]) for r in rows} == {(c, s) for c in ("cat", "dog") for s in ("oil", "ink", "pencil")}
    dog_ink = next(r for r in rows if r["concept"] == "dog" and r["style"] == "ink")
    assert dog_ink["prompt"] == "a dog in the style of ink"
    assert dog_ink["id"] == row_id("cats", {"style": "ink", "concept": "dog"}) and dog_ink["id"].startswith("cats-")
    assert len({r["id"] for r in rows}) == 6
    assert m.passthrough.names == ["concept", "style"]  # the slot values are metadata columns
    # the same values in another order: the same ids
    again = TemplateManifest(make_template("cats", TEXT, {"concept": ["dog", "cat"], "style": ["pencil", "oil", "ink"]}))
    assert {r["id"] for part in _rows(again).values() for r in part} == {r["id"] for r in rows}


def test_appended_slot_values_only_append_rows_or_add_files():
    before = TemplateManifest(make_template("t", TEXT, {"concept": ["cat", "dog"], "style": ["oil", "ink"]}))
    after = TemplateManifest(make_template("t", TEXT, {"concept": ["cat", "dog", "fox"], "style": ["oil", "ink", "pencil"]}))
    old, new = _rows(before), _rows(after)
    assert set(old) < set(new) and len(new) == 3
    for name, rows in old.items():
        assert new[name][: len(rows)] == rows  # each committed range reads back unchanged
    assert after.num_rows == 9


def test_a_sample_is_drawn_with_the_job_seed_and_grows_by_appending():
    slots = {"concept": [f"c{i}" for i in range(10)], "style": [f"s{i}" for i in range(10)]}
    five = _rows(TemplateManifest(make_template("t", TEXT, slots, "sample", 5, seed=1)))
    (name, rows), = five.items()
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    assert _rows(TemplateManifest(make_template("t", TEXT, slots, "sample", 5, seed=1))) == five
    eight = _rows(TemplateManifest(make_template("t", TEXT, slots, "sample", 8, seed=1)))[name]
    assert eight[:5] == rows
    other = _rows(TemplateManifest(make_template("t", TEXT, slots, "sample", 5, seed=2)))[name]
    assert {r["id"] for r in other} != {r["id"] for r in rows}


def test_a_plan_over_a_grown_template_keeps_the_committed_shards(tmp_path):
    from zimage_batch.inputs.identity import rows_digest
    from zimage_batch.output.ledger import CommitMarker

    before = TemplateManifest(make_template("t", TEXT, {"concept": ["cat", "dog"], "style": ["oil", "ink"]}))
    committed = {}
    for s in make_plan(before, {}, 10).todo:
        table = before.read_rows(next(f for f in before.files if f.name == s.file), s.start, s.end)
        committed[s.name] = CommitMarker(shard=s.name, file=s.file, start=s.start, end=s.end, rows=table.num_rows,
                                         ok=table.num_rows, error=0, digest=rows_digest(table), fingerprint="f",
                                         format="files")
    after = TemplateManifest(make_template("t", TEXT, {"concept": ["cat", "dog", "fox"], "style": ["oil", "ink", "pencil"]}))
    todo = make_plan(after, committed, 10).todo
    assert sum(s.num_rows for s in todo) == 5 and not set(committed) & {s.name for s in todo}
    changed = TemplateManifest(make_template("t", "a {concept} painted in {style}", {"concept": ["cat", "dog"],
                                                                                     "style": ["oil", "ink"]}))
    with pytest.raises(Exception, match="changed since shard"):
        make_plan(changed, committed, 10)


@pytest.mark.parametrize("settings, message", [
    ({"template": "a {animal} at dusk", "slots": {"concept": ["cat"]}},
     "template names slot(s) animal that 'slots' does not declare"),
    ({"template": "a {concept}", "slots": {"concept": []}}, "slot 'concept' has no values"),
    ({"template": "a cat at dusk", "slots": {"concept": ["cat"]}}, "has no {slot} placeholder"),
    ({"template": "a {concept}", "slots": {"concept": ["cat"], "mood": ["calm"]}}, "mood are not in the template"),
    ({"template": "a {concept}", "slots": {"concept": ["cat", "cat"]}}, "repeats value(s) 'cat'"),
    ({"template": "a {concept:>9}", "slots": {"concept": ["cat"]}}, "is not a slot"),
    ({"template": "a {seed}", "slots": {"seed": ["1"]}}, "the pipeline's own"),
    ({"template": "a {concept}", "slots": {"concept": ["cat"]}, "expand": "sample"}, "needs samples: N"),
    ({"template": "a {concept}", "slots": {"concept": ["cat"]}, "expand": "sample", "samples": 2}, "more than the 1"),
    ({"template": "a {concept}", "slots": {"concept": "missing.txt"}}, "slot 'concept': cannot read"),
])
def test_bad_templates_are_refused_in_one_line(tmp_path, settings, message):
    job = load_job(None, {"output": str(tmp_path / "o"), "model": "tiny:turbo"},
                   [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    with pytest.raises(ManifestError) as caught:
        check_manifest(job)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_set_takes_a_template_as_written():
    job = load_job(None, {"output": "o"}, ["template={concept}, {style}", "slots.concept=[cat]", "slots.style=[ink]"])
    assert job.template == "{concept}, {style}"
    with pytest.raises(JobError, match="--set width: cannot read"):
        load_job(None, {"output": "o", "manifest": "m"}, ["width={a"])


def test_a_template_and_a_manifest_together_are_refused(tmp_path):
    with pytest.raises(JobError, match="a manifest or a template, not both"):
        load_job(None, {"output": "o", "manifest": "m.parquet"}, ["template=a {x}", "slots.x=[a]"])


def _job_file(tmp_path, concepts: list[str], styles: list[str], **more) -> str:
    (tmp_path / "styles.txt").write_text("\n".join(styles) + "\n")
    job = {"output": str(tmp_path / "out"), "model": "tiny:turbo", "template": TEXT, "template_name": "night",
           "slots": {"concept": concepts, "style": "styles.txt"}, "num_inference_steps": 2, "shard_size": 10,
           "report": False, "workers": 1, **more}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_validate_prints_the_expanded_count_and_the_cost_line(tmp_path):
    result = cli_in_process("validate", "--job", _job_file(tmp_path, ["cat", "dog"], ["oil", "ink", "pencil"]),
                            "--set", "num_images=4")
    assert result.returncode == 0, result.stderr
    assert "ok: 6 rows expanded from template 'night' (2 concept x 3 style, product) in 2 parts" in result.stdout
    assert "cost: 6 rows, 24 images" in result.stdout


def test_the_readme_recipe_validates_as_it_says():
    """jobs/concepts-x-styles.yaml: 20 concepts x 30 styles x 4 seeds, expanded, as a WebDataset."""
    recipe = str(Path(__file__).resolve().parents[2] / "jobs" / "concepts-x-styles.yaml")
    result = cli_in_process("validate", "--job", recipe)
    assert result.returncode == 0, result.stderr
    assert "ok: 600 rows expanded from template 'concepts' (20 concept x 30 style, product) in 20 parts" in result.stdout
    assert "cost: 600 rows, 2,400 images" in result.stdout
    job = load_job(recipe, {}, [])
    assert job.format == "webdataset" and job.prompt_expansion == "Qwen/Qwen3-4B-Instruct-2507"


def test_run_refuses_a_bad_template_in_one_line_before_writing(tmp_path):
    result = cli_in_process("run", "--output", str(tmp_path / "out"), "--model", "tiny:turbo",
                            "--set", "template=a {animal} at dusk", "--set", "slots.concept=[cat]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: template names slot(s) animal that 'slots' does not declare (declared: concept)"]
    assert not (tmp_path / "out" / "job.json").exists()
