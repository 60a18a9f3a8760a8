"""End to end: manifest -> Ray workers -> writers -> ledger, on local disk and on a real S3 server."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_in_process import cli_in_process
from output_check import check_exactly_once, load_json, pixels, read_images, read_metadata
from PIL import Image

from zimage_batch.jobspec import JobSpec
from zimage_batch.storage import open_storage

PROMPTS = ["a cat on a sofa", "一只可爱的小猫坐在窗台上", "un chat noir la nuit", "a red car", "夕阳下的古城"]


def make_manifest(path: Path, n: int, start: int = 0) -> list[str]:
    ids = [f"row-{i:05d}" for i in range(start, start + n)]
    table = pa.table(
        {
            "id": ids,
            "prompt": [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(start, start + n)],
            "seed": pa.array([None if i % 3 == 0 else i * 7 for i in range(start, start + n)], pa.int64()),
            "width": pa.array([96 if i % 10 == 0 else None for i in range(start, start + n)], pa.int64()),
            "category": [f"c{i % 4}" for i in range(start, start + n)],
            "score": [i / 10 for i in range(start, start + n)],
        }
    )
    pq.write_table(table, path, row_group_size=64)
    return ids


def reference_pixels(model_path: str, row: dict) -> np.ndarray:
    """The same row through diffusers' own ZImagePipeline."""
    pipe = _pipeline(model_path)
    out = pipe(
        prompt=row["prompt"],
        width=row["width"],
        height=row["height"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(row["seed"]),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


_PIPES: dict = {}


def _pipeline(model_path: str):
    from diffusers import ZImagePipeline

    if model_path not in _PIPES:
        _PIPES[model_path] = ZImagePipeline.from_pretrained(model_path)
        _PIPES[model_path].set_progress_bar_config(disable=True)
    return _PIPES[model_path]


# Each format once, two of them on S3 (webdataset on S3: test_num_images.py through faults, and
# test_status_report.py; files and parquet on local disk: most CLI drills and test_num_images.py).
@pytest.mark.parametrize("fmt, where", [("files", "s3"), ("webdataset", "local"), ("parquet", "s3")])
def test_run_every_format(tmp_path, ray_local, s3_bucket, fmt, where):
    from zimage_batch.model.sources import resolve_model
    from zimage_batch.run.driver import run_job
    from zimage_batch.run.preflight import resolve

    manifest = tmp_path / "manifest.parquet"
    ids = make_manifest(manifest, 210)
    output = str(tmp_path / "out") if where == "local" else f"s3://{s3_bucket}/runs/{fmt}"
    job = JobSpec(manifest=str(manifest), output=output, model="tiny:turbo", format=fmt,
                  workers=2 if fmt == "files" else 1, shard_size=50, batch_size=8)
    summary = run_job(job, echo=lambda line: None)
    assert summary.exit_code == 0 and summary.rows_ok == 210 and summary.shards_committed == 5
    rows = check_exactly_once(output, ids)
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["row-00010"]["width"] == 96 and by_id["row-00011"]["width"] == 64
    assert by_id["row-00007"]["category"] == "c3" and by_id["row-00007"]["score"] == pytest.approx(0.7)
    assert by_id["row-00001"]["seed"] == 7
    record = load_json(output, "job.json")
    assert record["fingerprint"] == resolve(job).fingerprint and record["job"]["format"] == fmt
    if fmt == "webdataset":  # each sample's .json carries what made its image, like the metadata
        import json
        import tarfile

        row = by_id["row-00010"]
        tar_key, member = row["image"].split("#", 1)
        with tarfile.open(fileobj=io.BytesIO(open_storage(output).get_bytes(tar_key))) as tar:
            sample = json.loads(tar.extractfile(member.rsplit(".", 1)[0] + ".json").read())
        for name in ("id", "prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale",
                     "cfg_truncation", "cfg_normalization", "sha256", "model", "variant", "category"):
            assert sample[name] == row[name], name
        assert sample["duration_ms"] > 0
        with tarfile.open(fileobj=io.BytesIO(open_storage(output).get_bytes(tar_key))) as tar:
            assert tar.extractfile(member.rsplit(".", 1)[0] + ".txt").read().decode("utf-8") == row["prompt"]
    if fmt == "parquet":  # each data row carries the image beside the prompt, settings and pass-through columns
        data_key = by_id["row-00007"]["image"].split("#", 1)[0]
        table = pq.read_table(io.BytesIO(open_storage(output).get_bytes(data_key)))
        sample = next(r for r in table.to_pylist() if r["id"] == "row-00007")
        assert sample["prompt"] == by_id["row-00007"]["prompt"] and sample["category"] == "c3"
        assert sample["seed"] == by_id["row-00007"]["seed"] and sample["image"]["path"].endswith(".png")
    # pixels equal diffusers' reference pipeline for the same rows
    images = read_images(output, [by_id[i] for i in ("row-00000", "row-00001", "row-00010")])
    model_path = resolve_model("tiny:turbo").path
    for row_id, data in images.items():
        diff = np.abs(pixels(data).astype(int) - reference_pixels(model_path, by_id[row_id]).astype(int)).max()
        assert diff <= 1, f"{row_id}: max pixel difference {diff}"


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The real command in a subprocess (it starts its own local cluster)."""
    return subprocess.run([sys.executable, "-m", "zimage_batch.cli", *args], capture_output=True, text=True, **kwargs)


def test_different_job_or_changed_rows_refused_then_overwritten(tmp_path, ray_local):
    manifest = tmp_path / "m.parquet"
    ids = make_manifest(manifest, 50)
    out = tmp_path / "out"
    base = ["run", "--manifest", str(manifest), "--output", str(out), "--model", "tiny:turbo", "--shard-size", "20"]
    first = cli_in_process(*base)
    assert first.returncode == 0, first.stderr
    assert len(list((out / "_commits").glob("*.json"))) == 3

    refused = cli_in_process(*base, "--set", "guidance_scale=1.5")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "different job" in refused.stderr and "guidance_scale" in refused.stderr

    grown = pq.read_table(manifest)  # appended rows: drills/test_readers_see_committed.py (a kill, then a resume)
    changed = grown.set_column(1, "prompt", pa.array(["changed"] * grown.num_rows))
    pq.write_table(changed, manifest)
    refused = cli_in_process(*base)
    assert refused.returncode != 0 and "changed since shard" in refused.stderr

    overwrite = cli_in_process(*base, "--set", "guidance_scale=1.5", "--overwrite")
    assert overwrite.returncode == 0, overwrite.stderr
    rows = check_exactly_once(str(out), ids)
    assert {r["guidance_scale"] for r in rows} == {1.5} and {r["prompt"] for r in rows} == {"changed"}


def test_quickstart_job_file(tmp_path):
    root = Path(__file__).resolve().parents[2]
    result = _cli("run", str(root / "jobs" / "quickstart.yaml"), "--output", str(tmp_path / "qs"))
    assert result.returncode == 0, result.stderr
    assert "done: 16 ok" in result.stdout
    # Ray's own warning lines (token authentication enabled, ...) stay out of the terminal unless --verbose
    assert "Token authentication" not in result.stderr and "WARNING" not in result.stderr, result.stderr
    rows = read_metadata(str(tmp_path / "qs"))
    assert len(rows) == 16 and {r["topic"] for r in rows} >= {"animal", "city"}
    assert open_storage(str(tmp_path / "qs")).exists("job.json")


def test_low_vram_profile_through_the_cli(tmp_path, ray_local):
    """`--set low_vram=on`: the workers encode each shard's prompts ahead, then denoise from the
    cache; every row exactly once, pixels as diffusers draws them. A bad value is refused."""
    from zimage_batch.model.sources import resolve_model

    manifest = tmp_path / "m.parquet"
    ids = make_manifest(manifest, 30)
    out = tmp_path / "out"
    result = cli_in_process("run", "--manifest", str(manifest), "--output", str(out), "--model", "tiny:turbo",
                            "--shard-size", "10", "--set", "low_vram=on", "--set", "report=false")
    assert result.returncode == 0, result.stderr
    assert load_json(str(out), "job.json")["job"]["low_vram"] == "on"
    by_id = {r["id"]: r for r in check_exactly_once(str(out), ids)}
    model_path = resolve_model("tiny:turbo").path
    for row_id, data in read_images(str(out), [by_id[i] for i in ("row-00001", "row-00010", "row-00025")]).items():
        diff = np.abs(pixels(data).astype(int) - reference_pixels(model_path, by_id[row_id]).astype(int)).max()
        assert diff <= 1, f"{row_id}: max pixel difference {diff}"
    refused = cli_in_process("run", "--manifest", str(manifest), "--output", str(tmp_path / "bad"), "--model", "tiny:turbo",
                             "--set", "low_vram=sometimes")
    assert refused.returncode != 0 and "low_vram must be on, off or auto" in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_hive_partitioned_folder(tmp_path, ray_local):
    """A folder written by Spark's partitionBy: the key=value folder names are columns of the
    rows under them (strings, URL-decoded, Hive's null marker as null), passed through into the
    metadata; a `variant=` folder picks the rows' variant like a column would."""
    folder = tmp_path / "manifest"
    for sub, ids in (("date=2026-11-26/variant=turbo", ["a", "b"]), ("date=2026-11-27/variant=base", ["c"]),
                     ("date=__HIVE_DEFAULT_PARTITION__/variant=turbo", ["d"]), ("date=2026-11-27%2F28/variant=turbo", ["e"])):
        (folder / sub).mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "prompt": [f"a photo {i}" for i in ids]}),
                       folder / sub / "part-00000-abc.snappy.parquet")
    (folder / "_SUCCESS").write_text("")
    assert cli_in_process("validate", str(folder)).returncode == 0
    out = tmp_path / "out"
    run = cli_in_process("run", "--manifest", str(folder), "--output", str(out), "--model", "tiny:turbo",
                         "--set", "report=false")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["id"]: r for r in check_exactly_once(str(out), ["a", "b", "c", "d", "e"])}
    assert {i: (r["date"], r["variant"], r["status"]) for i, r in rows.items()} == {
        "a": ("2026-11-26", "turbo", "ok"), "b": ("2026-11-26", "turbo", "ok"), "c": ("2026-11-27", "base", "ok"),
        "d": (None, "turbo", "ok"), "e": ("2026-11-27/28", "turbo", "ok")}
    rerun = cli_in_process("run", "--manifest", str(folder), "--output", str(out), "--model", "tiny:turbo",
                           "--set", "report=false")
    assert rerun.returncode == 0 and "0 to run" in rerun.stdout, rerun.stdout  # the plan's digests agree


def test_folder_of_files_with_different_types_and_columns(tmp_path, ray_local):
    """Files written by different tools: a categorical prompt, an int guidance in one file and a
    float in the other, a pass-through column that widens (int32, int64), one only the second
    file has, a variant column only the second file has, and width and seed as whole floats with
    a null (pandas' int column with a gap). All run, each row on its variant,
    and the metadata folder reads back as one table."""
    folder = tmp_path / "manifest"
    folder.mkdir()
    pq.write_table(pa.table({
        "id": ["a0", "a1"],
        "prompt": pa.array(["a cat", "一只猫"]).dictionary_encode(),
        "guidance_scale": pa.array([0, 0], pa.int64()),
        "score": pa.array([1, 2], pa.int32()),
    }), folder / "part-0.parquet")
    pq.write_table(pa.table({
        "id": ["b0", "b1"],
        "prompt": ["a dog", "a fox"],
        "guidance_scale": [0.0, 3.5],
        "score": pa.array([2**40, 3], pa.int64()),
        "tag": ["x", None],
        "variant": [None, "base"],
        # pandas writes an int column with a null as float64
        "width": [128.0, None],
        "seed": [7.0, None],
    }), folder / "part-1.parquet")
    assert cli_in_process("validate", str(folder)).returncode == 0
    out = tmp_path / "out"
    run = cli_in_process("run", "--manifest", str(folder), "--output", str(out), "--model", "tiny:turbo",
                         "--set", "report=false")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["id"]: r for r in check_exactly_once(str(out), ["a0", "a1", "b0", "b1"])}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert [rows[i]["variant"] for i in ("a0", "a1", "b0", "b1")] == ["turbo", "turbo", "turbo", "base"]
    assert rows["b1"]["guidance_scale"] == 3.5 and rows["a1"]["prompt"] == "一只猫"
    assert (rows["b0"]["width"], rows["b0"]["seed"], rows["b1"]["width"]) == (128, 7, 64)
    assert Image.open(out / rows["b0"]["image"]).size == (128, 64)
    table = pq.read_table(out / "metadata")  # one dataset: every shard has the same columns and types
    assert table.schema.field("score").type == pa.int64() and table.schema.field("tag").type == pa.string()
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert [by_id[i]["score"] for i in ("a0", "a1", "b0", "b1")] == [1, 2, 2**40, 3]
    assert [by_id[i]["tag"] for i in ("a0", "a1", "b0", "b1")] == [None, None, "x", None]
