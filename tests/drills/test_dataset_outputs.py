"""Outputs that training tools load as they are: WebDataset and Parquet runs read back with
Hugging Face `datasets`, `webdataset` and DuckDB, the dataset card, one throughput figure, the cost
line, and the default model that never draws noise silently."""

from __future__ import annotations

import hashlib
import html
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from zimage_batch.cli import main
from zimage_batch.jobspec import JobSpec
from zimage_batch.output.keys import safe_key
from zimage_batch.output.report import render
from zimage_batch.output.status import load_output, status
from zimage_batch.run.estimate import estimate, rate_from_runs, run_key
from zimage_batch.storage import open_storage

datasets = pytest.importorskip("datasets")
ROWS = 12
SHARD = 6  # the first shard's rows have no negative prompt, the second's have one


def _manifest(path: Path) -> list[dict]:
    rows = [{"id": f"img/{i:02d}", "prompt": ("一只猫坐在窗台上" if i % 3 == 0 else f"a lighthouse, view {i}"),
             "negative_prompt": None if i < SHARD else "blurry", "seed": 100 + i, "topic": f"t{i % 2}",
             "score": i} for i in range(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.int64()),
        ("topic", pa.string()), ("score", pa.int32())])), path)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One WebDataset and one Parquet run of the same manifest, on one fresh local Ray cluster."""
    import ray

    from zimage_batch.run.driver import run_job

    tmp = tmp_path_factory.mktemp("dataset-outputs")
    rows = _manifest(tmp / "m.parquet")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    out = {}
    try:
        for fmt in ("webdataset", "parquet"):
            job = JobSpec(manifest=str(tmp / "m.parquet"), output=str(tmp / fmt), model="tiny:turbo", format=fmt,
                          workers=1, shard_size=SHARD, batch_size=4)
            lines: list[str] = []
            summary = run_job(job, echo=lines.append)
            assert summary.exit_code == 0 and summary.rows_ok == ROWS, lines
            assert summary.finish.card == str(tmp / fmt / "README.md")  # run_job writes the card as it ends
            out[fmt] = {"dir": tmp / fmt, "summary": summary, "lines": lines, "job": job}
    finally:
        ray.shutdown()
    return {"rows": {r["id"]: r for r in rows}, **out}


def _load(*args, tmp: Path, **kwargs):
    return datasets.load_dataset(*args, split="train", cache_dir=str(tmp / "hf-cache"), **kwargs)


def _card(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_webdataset_output_loads_from_its_folder_with_the_prompt_as_caption(runs, tmp_path):
    """load_dataset(OUTPUT): the card's features, not the first shard, decide the types, so a
    negative prompt that is null in the first shard and text in the second loads."""
    ds = _load(str(runs["webdataset"]["dir"]), tmp=tmp_path)
    assert len(ds) == ROWS and set(ds.features) == {"__key__", "png", "txt", "json"}
    for sample in ds:
        row = runs["rows"][sample["json"]["id"]]
        assert isinstance(sample["png"], Image.Image) and sample["png"].size == (64, 64)
        assert sample["txt"] == row["prompt"] and sample["__key__"] == safe_key(row["id"])
        assert sample["json"]["negative_prompt"] == row["negative_prompt"]
        assert sample["json"]["seed"] == row["seed"] and sample["json"]["topic"] == row["topic"]
        assert sample["json"]["score"] == row["score"] and sample["json"]["model"] == "tiny:turbo"


def test_webdataset_shards_load_by_data_files_and_with_webdataset(runs, tmp_path):
    import webdataset as wds

    shards = sorted(str(p) for p in (runs["webdataset"]["dir"] / "shards").glob("*.tar"))
    ds = _load("webdataset", data_files=shards[1:], tmp=tmp_path)  # a shard whose values all have one type
    assert {"png", "txt", "json"} <= set(ds.features) and len(ds) == ROWS - SHARD
    assert isinstance(ds[0]["png"], Image.Image) and ds[0]["txt"] == runs["rows"][ds[0]["json"]["id"]]["prompt"]
    # every shard, with the features the card declares
    features = datasets.Features._from_yaml_list(_card(runs["webdataset"]["dir"])["dataset_info"][0]["features"])
    assert len(_load("webdataset", data_files=shards, features=features, tmp=tmp_path)) == ROWS
    pairs = list(wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("png;jpg;webp", "txt", "json"))
    assert sorted(txt for _, txt, _ in pairs) == sorted(r["prompt"] for r in runs["rows"].values())
    assert all(isinstance(img, Image.Image) and meta["prompt"] == txt for img, txt, meta in pairs)


def test_a_parquet_output_loads_with_images_prompts_and_settings(runs, tmp_path):
    folder = runs["parquet"]["dir"]
    by_data_files = _load("parquet", data_files=sorted(str(p) for p in (folder / "data").glob("*.parquet")), tmp=tmp_path)
    by_folder = _load(str(folder), tmp=tmp_path)
    metadata = {r["id"]: r for r in pq.read_table(folder / "metadata").to_pylist()}
    for ds in (by_data_files, by_folder):
        assert len(ds) == ROWS and isinstance(ds.features["image"], datasets.Image)
        for sample in ds:
            row, meta = runs["rows"][sample["id"]], metadata[sample["id"]]
            assert isinstance(sample["image"], Image.Image)
            assert sample["prompt"] == row["prompt"] and sample["negative_prompt"] == row["negative_prompt"]
            assert sample["seed"] == row["seed"] and sample["topic"] == row["topic"] and sample["score"] == row["score"]
            assert sample["sha256"] == meta["sha256"] and sample["num_inference_steps"] == 8
    raw = pq.read_table(folder / "data").to_pylist()
    assert all(hashlib.sha256(r["image"]["bytes"]).hexdigest() == r["sha256"] for r in raw)


def test_duckdb_reads_the_metadata_as_one_table(runs):
    duckdb = pytest.importorskip("duckdb")
    for fmt in ("webdataset", "parquet"):
        pattern = str(runs[fmt]["dir"] / "metadata" / "*.parquet")
        (count, ok, ids), = duckdb.sql(
            f"SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(DISTINCT id) FROM '{pattern}'").fetchall()
        assert (count, ok, ids) == (ROWS, ROWS, ROWS)


def test_the_dataset_card_lists_the_files_counts_model_and_warns_of_noise(runs):
    for fmt, files in (("webdataset", "shards/*.tar"), ("parquet", "data/*.parquet")):
        card = _card(runs[fmt]["dir"])
        assert card["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]
        names = [f["name"] for f in card["dataset_info"][0]["features"]]
        assert ("png" in names and "txt" in names) if fmt == "webdataset" else ("image" in names and "prompt" in names)
        text = (runs[fmt]["dir"] / "README.md").read_text(encoding="utf-8")
        assert "| images | 12 |" in text and "tiny random-init checkpoint" in text and "`tiny:turbo`" in text


def test_the_last_line_status_and_report_show_one_throughput(runs):
    run = runs["webdataset"]
    text = run["summary"].throughput.text()
    assert "img/s over the run's wall time" in text and "img/s over generation time" in text
    assert run["summary"].throughput.images == ROWS
    figures = status(str(run["dir"]))
    assert figures["throughput_text"] == text
    assert figures["throughput"]["images_per_s_wall"] == pytest.approx(ROWS / run["summary"].elapsed_s)
    assert html.escape(text, quote=True) in render(load_output(str(run["dir"])))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_the_report_shows_every_image_read_from_the_containers(runs, fmt):
    """The report's gallery reads images back out of tars and out of Parquet `image` cells."""
    page = render(load_output(str(runs[fmt]["dir"])))
    assert page.count('src="data:image/jpeg;base64,') == ROWS and f"All {ROWS} images." in page


def test_the_run_says_at_the_start_that_a_tiny_model_draws_noise_and_what_it_costs(runs):
    lines = runs["webdataset"]["lines"]
    assert "images will be noise" in lines[0]
    cost = next(line for line in lines if line.startswith("cost:"))
    assert cost.startswith(f"cost: {ROWS} rows, {ROWS} images; no time estimate: give --set gpu_seconds_per_image=")
    # the next run of this job estimates from this one's record
    job = runs["webdataset"]["job"]
    rate = rate_from_runs(open_storage(job.output), run_key(job.model, job.defaults()))
    t = runs["webdataset"]["summary"].throughput
    assert rate is not None and rate.seconds_per_image == pytest.approx(t.generation_s / t.images)
    again = estimate(ROWS, ROWS, 6, None, open_storage(job.output), run_key(job.model, job.defaults())).line()
    assert "(6 to generate); about" in again and "CPU-hours" in again and "measured by the run of" in again


def test_validate_prints_the_cost_with_a_given_rate(tmp_path):
    _manifest(tmp_path / "m.parquet")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "m.parquet"), "--set", "gpu_seconds_per_image=900"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (f"cost: {ROWS} rows, {ROWS} images; about 3.00 GPU-hours at 900 s/image "
                                              "(gpu_seconds_per_image)")


def test_without_model_the_default_is_turbo_and_offline_without_weights_fails_in_one_line(tmp_path):
    assert JobSpec().model == "Tongyi-MAI/Z-Image-Turbo"
    _manifest(tmp_path / "m.parquet")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", str(tmp_path / "m.parquet"),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'Tongyi-MAI/Z-Image-Turbo'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert str(tmp_path / "empty-hf-home") in result.stderr  # the cache it looked in
    assert not (tmp_path / "out").exists()


def test_pixels_in_the_parquet_output_are_the_webdataset_ones(runs):
    """The same rows, two formats: byte-identical images (so each format's reader sees the same data)."""
    tars = {}
    import tarfile

    for path in (runs["webdataset"]["dir"] / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            tars |= {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")}
    for r in pq.read_table(runs["parquet"]["dir"] / "data").to_pylist():
        assert tars[f"{r['__key__']}.png"] == r["image"]["bytes"]
        assert np.asarray(Image.open(io.BytesIO(r["image"]["bytes"]))).shape == (64, 64, 3)


PASS_THROUGH_TYPES = pa.schema([
    ("i8", pa.int8()), ("u32", pa.uint32()), ("f32", pa.float32()), ("flag", pa.bool_()), ("big", pa.large_string()),
    ("raw", pa.binary()), ("day", pa.date32()), ("at", pa.timestamp("us", tz="UTC")), ("naive", pa.timestamp("ms")),
    ("price", pa.decimal128(10, 2)), ("tags", pa.list_(pa.string())), ("boxes", pa.list_(pa.list_(pa.float64()))),
    ("spec", pa.struct([("k", pa.string()), ("v", pa.list_(pa.int64()))])),
    ("parts", pa.list_(pa.struct([("a", pa.int32())]))), ("nothing", pa.null()),
])


def test_features_are_what_datasets_itself_makes_of_each_arrow_type():
    """The schema metadata and the card's YAML, written without importing `datasets`, read back in
    `datasets` as exactly the features it derives from the Arrow types (images as Image)."""
    from zimage_batch.output.features import IMAGE_STRUCT, json_type, schema_features, with_features, yaml_features

    schema = PASS_THROUGH_TYPES.insert(0, pa.field("image", IMAGE_STRUCT))
    expected = datasets.Features({"image": datasets.Image(),
                                  **datasets.Features.from_arrow_schema(PASS_THROUGH_TYPES)})
    assert datasets.Features.from_dict(schema_features(schema, images={"image"})) == expected
    assert datasets.Features.from_arrow_schema(with_features(schema, images={"image"})) == expected
    assert datasets.Features._from_yaml_list(yaml_features(schema, images={"image"})) == expected
    # what each type becomes in a sample's JSON
    as_json = {f.name: json_type(f.type) for f in PASS_THROUGH_TYPES}
    assert as_json["i8"] == as_json["u32"] == pa.int64() and as_json["f32"] == pa.float64()
    assert as_json["raw"] == as_json["day"] == as_json["at"] == as_json["price"] == pa.string()
    assert as_json["spec"] == pa.struct([("k", pa.string()), ("v", pa.list_(pa.int64()))])
