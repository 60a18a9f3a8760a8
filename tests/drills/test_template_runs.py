"""Two nightly runs of a template job on Ray: appended slot values only add rows, committed shards stay as they were."""

from __future__ import annotations

import yaml
from cli_in_process import cli_in_process
from output_check import check_exactly_once

from zimage_batch.inputs.templates import TemplateManifest, make_template, row_id

TEXT = "a {concept} in the style of {style}"


def _rows(manifest: TemplateManifest) -> dict[str, list[dict]]:
    return {f.name: manifest.read_rows(f, 0, f.num_rows).to_pylist() for f in manifest.files}


def _job_file(tmp_path, concepts: list[str], styles: list[str], **more) -> str:
    (tmp_path / "styles.txt").write_text("\n".join(styles) + "\n")
    job = {"output": str(tmp_path / "out"), "model": "tiny:turbo", "template": TEXT, "template_name": "night",
           "slots": {"concept": concepts, "style": "styles.txt"}, "num_inference_steps": 2, "shard_size": 10,
           "report": False, "workers": 1, **more}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_two_nightly_runs_appended_slot_values_only_add_rows(tmp_path, ray_local):
    """With each prompt expanded by the tiny LM (tiny:prompt) on the workers, as the README's recipe does."""
    lm = {"prompt_expansion": "tiny:prompt", "max_new_tokens": 6}
    first = cli_in_process("run", _job_file(tmp_path, ["cat", "dog"], ["oil", "ink"], **lm))
    assert first.returncode == 0, first.stderr[-2000:]
    commits = {p.name: p.read_bytes() for p in (tmp_path / "out" / "_commits").glob("*.json")}
    assert len(commits) == 2
    second = cli_in_process("run", _job_file(tmp_path, ["cat", "dog", "fox"], ["oil", "ink", "pencil"], **lm))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 shards already committed, 3 to run" in second.stdout
    for name, data in commits.items():  # committed shards untouched
        assert (tmp_path / "out" / "_commits" / name).read_bytes() == data
    manifest = TemplateManifest(make_template("night", TEXT, {"concept": ["cat", "dog", "fox"],
                                                               "style": ["oil", "ink", "pencil"]}))
    ids = [r["id"] for part in _rows(manifest).values() for r in part]
    rows = check_exactly_once(str(tmp_path / "out"), ids)
    fox = next(r for r in rows if r["concept"] == "fox" and r["style"] == "pencil")
    assert fox["prompt_original"] == "a fox in the style of pencil" and fox["prompt"] != fox["prompt_original"]
    assert fox["id"] == row_id("night", {"concept": "fox", "style": "pencil"})
