"""What a newcomer meets first: a misspelled manifest column is named with the column it likely
means (warned, or refused with strict_columns), a hub model that cannot be had says what to do
instead, a cluster that refuses the token says which address and where the token is, and the
command line says "1 shard", not "1 shards"."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process, ray_not_started

from zimage_batch import api
from zimage_batch.inputs.columns import KNOWN_COLUMNS, distance, misspelled
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.run.cluster import auth_hint, is_auth_error
from zimage_batch.text import plural


def test_misspelled_columns_name_the_known_one():
    assert distance("widht", "width") == 1 and distance("negtive_prompt", "negative_prompt") == 1
    found = dict(misspelled(["id", "prompt", "widht", "heigth", "negtive_prompt", "Seed", "steps", "cfg",
                             "init_image", "category", "score", "caption", "x", "ab", "date"], KNOWN_COLUMNS))
    assert found == {"widht": "width", "heigth": "height", "negtive_prompt": "negative_prompt", "Seed": "seed",
                     "steps": "num_inference_steps", "cfg": "guidance_scale", "init_image": "source"}


def _manifest(path, **extra):
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"], **extra}), path)
    return str(path)


def test_validate_and_run_warn_about_a_typo_and_strict_columns_refuses_it(tmp_path):
    manifest = _manifest(tmp_path / "m.parquet", widht=[64, 64], category=["x", "y"])
    checked = cli_in_process("validate", manifest)
    assert checked.returncode == 0, checked.stderr
    assert "warning: column 'widht' is passed through; did you mean 'width'?" in checked.stderr
    assert "category" not in checked.stderr
    assert "ok: 2 rows in 1 file, prompt manifest" in checked.stdout
    assert api.validate(manifest).warnings == ("warning: column 'widht' is passed through; did you mean 'width'?",)

    refused = cli_in_process("validate", manifest, "--set", "strict_columns=true")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "column 'widht' is passed through; did you mean 'width'?" in refused.stderr
    assert "strict_columns" in refused.stderr
    with ray_not_started():
        run = cli_in_process("run", "--manifest", manifest, "--output", str(tmp_path / "out"), "--model",
                             "tiny:turbo", "--set", "strict_columns=true")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "did you mean 'width'?" in run.stderr and not (tmp_path / "out").exists()


def test_a_hub_model_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from zimage_batch.model.sources import _hub_failure, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelSourceError) as caught:
        resolve_model("Tongyi-MAI/Z-Image-Turbo")
    line = str(caught.value)
    assert "\n" not in line and "HF_HUB_OFFLINE is set" in line and str(tmp_path / "hub") in line
    assert "local diffusers folder" in line and "s3://" in line and "tiny:turbo" in line
    online = _hub_failure("Org/Missing", OSError("name resolution failed"), False, "cache")
    assert online.startswith("cannot fetch 'Org/Missing' from the hub (OSError: name resolution failed)")
    assert "HF_HUB_OFFLINE=1" in online and "s3://" in online and "tiny:turbo" in online


def test_the_token_hint_names_what_was_sent_and_where_the_token_is(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    hint = auth_hint("10.0.0.5:6379", found_by="auto")
    assert hint.startswith("the Ray cluster at 10.0.0.5:6379 (found by --address auto) refused the connection: "
                           "no token was sent (RAY_AUTH_MODE=token is not set here)")
    assert "RAY_AUTH_TOKEN" in hint and "~/.ray/auth_token" in hint and "ray get-auth-token" in hint
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "no token was found here" in auth_hint("h:1")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x")
    assert "the token in ~/.ray/auth_token is not the cluster's" in auth_hint("h:1")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "y")
    assert "RAY_AUTH_TOKEN is not the cluster's token" in auth_hint("h:1")
    try:
        try:
            raise PermissionError("Authentication token is missing or incorrect")
        except PermissionError as inner:
            raise ConnectionError("Failed to connect") from inner
    except ConnectionError as exc:
        assert is_auth_error(exc)
    assert not is_auth_error(ConnectionError("Failed to connect"))


def test_plurals():
    assert [plural(n, "shard") for n in (0, 1, 2, 1000)] == ["0 shards", "1 shard", "2 shards", "1,000 shards"]


def test_the_report_of_an_edit_job_shows_each_source_beside_its_output(tmp_path):
    """Before and after, with the mode, strength and mask; a source that is gone shows as such."""
    import io

    from PIL import Image

    from zimage_batch.output.report import _gallery_section, source_thumbnails

    Image.new("RGB", (96, 64), "red").save(tmp_path / "sku.png")
    Image.new("L", (96, 64), 255).save(tmp_path / "mask.png")
    out = io.BytesIO()
    Image.new("RGB", (96, 64), "blue").save(out, "PNG")
    rows = [
        {"id": "sku", "image": "images/s/sku.png", "prompt": "on marble", "seed": 1, "width": 96, "height": 64,
         "source": str(tmp_path / "sku.png"), "mode": "inpaint", "strength": 0.6, "mask": str(tmp_path / "mask.png")},
        {"id": "gone", "image": "images/s/gone.png", "prompt": "on marble", "seed": 2, "width": 96, "height": 64,
         "source": str(tmp_path / "missing.png"), "mode": "img2img", "strength": 0.7, "mask": None},
        {"id": "plain", "image": "images/s/plain.png", "prompt": "a cat", "seed": 3, "width": 64, "height": 64},
    ]
    thumbs = source_thumbnails(rows)
    assert set(thumbs) == {str(tmp_path / "sku.png"), str(tmp_path / "mask.png")}
    thumbs["images/s/sku.png"] = thumbs["images/s/plain.png"] = "data:image/jpeg;base64,AAAA"
    page = _gallery_section(rows, thumbs, "All 3 images.")
    edit, gone, plain = page.split("<figure")[1:]
    assert "before" in edit and "after" in edit and edit.count("<img") == 3  # source, output, mask
    assert "mode <b>inpaint</b>" in edit and "strength 0.6" in edit and str(tmp_path / "sku.png") in edit
    assert "source not readable" in gone and "mode <b>img2img</b>" in gone and "mask" not in gone
    assert "before" not in plain and "mode" not in plain
    assert "1 could not be read" in page  # the output image of 'gone'


def test_every_node_installs_the_torch_the_readme_installs():
    """cluster/Dockerfile pins the PyTorch version the README (and so the test suite) installs."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = set(re.findall(r"torch==([\w.+]+)", (root / "README.md").read_text(encoding="utf-8")))
    dockerfile = (root / "cluster" / "Dockerfile").read_text(encoding="utf-8")
    docker = re.findall(r"pip install [^\n]*?\btorch(==[\w.+]+)?\s", dockerfile)
    assert len(readme) == 1 and docker and all(pin == f"=={next(iter(readme))}" for pin in docker), (readme, docker)


def test_a_misspelled_job_setting_names_the_one_it_likely_means():
    from zimage_batch.jobspec import JobError, load_job

    with pytest.raises(JobError) as caught:
        load_job(None, {"manifest": "m.parquet", "output": "out"}, ["widht=64", "zzz=1"])
    assert str(caught.value) == "unknown job setting(s): widht (did you mean 'width'?), zzz"
