"""ControlNet jobs end to end through the CLI and Ray (issue 18).

A catalogue re-shot with canny control (jobs/catalogue-controlnet.yaml on tiny models and local
files): sources of every kind the edit tests use give ok rows, a ControlNet-inpaint row and a row
opting out of the condition run beside them, a corrupt source or condition image is an `error`
row naming the URI. A prompt job with condition images on S3 at three scales, with rows without
a condition, matches diffusers' pipelines across batches and after a resume, and a resume with
other ControlNet weights is refused. The prefetch benchmark runs with condition images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from cli_in_process import cli_in_process
from output_check import check_exactly_once, pixels, read_images
from PIL import Image
from source_images import encode, gray_png, pattern

from zimage_batch.inputs import images
from zimage_batch.inputs.conditions import derive, fit
from zimage_batch.model.addons import resolve_addon
from zimage_batch.model.controlnet import load_controlnet
from zimage_batch.model.sources import resolve_model
from zimage_batch.model.variants import get_variant
from zimage_batch.output.keys import safe_key
from zimage_batch.storage import open_storage

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _pipelines(controlnet: str = "tiny:2.1") -> dict:
    """diffusers' own pipelines on the tiny turbo model and ControlNet the jobs ran."""
    import diffusers

    base = diffusers.ZImagePipeline.from_pretrained(resolve_model("tiny:turbo").path)
    net = load_controlnet(resolve_addon(controlnet).path, base.transformer, torch.float32)
    pipes = {
        "text-to-image": base,
        "controlnet": diffusers.ZImageControlNetPipeline(**base.components, controlnet=net),
        "controlnet-inpaint": diffusers.ZImageControlNetInpaintPipeline(**base.components, controlnet=net),
        "img2img": diffusers.ZImageImg2ImgPipeline(**base.components),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _reference(pipe, row: dict, **images_in) -> np.ndarray:
    out = pipe(prompt=row["prompt"], width=row["width"], height=row["height"], num_inference_steps=row["num_inference_steps"],
               guidance_scale=row["guidance_scale"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
               output_type="np", **images_in).images[0]
    return (out * 255).round().astype(np.uint8)


def _close(stored: bytes, want: np.ndarray) -> int:
    return int(np.abs(pixels(stored).astype(int) - want.astype(int)).max())


# ---------------------------------------------------------------------- the catalogue job
def _catalogue_inputs(folder: Path) -> tuple[Path, pa.Table]:
    """jobs/catalogue_controlnet_inputs.py's catalogue, plus rows that must fail or differ."""
    spec = importlib.util.spec_from_file_location("catalogue_inputs", ROOT / "jobs" / "catalogue_controlnet_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manifest = module.build(folder)
    (folder / "photos" / "P-9001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # corrupt
    (folder / "photos" / "P-2001.png").write_bytes(gray_png())
    (folder / "conditions").mkdir()
    (folder / "conditions" / "pose.png").write_bytes(encode(Image.fromarray(pattern(50, 70)), "PNG"))
    (folder / "conditions" / "broken.png").write_bytes(encode(Image.fromarray(pattern(50, 70)), "PNG")[:80])
    extra = pa.table({
        "id": ["P-9001", "P-9002", "P-9003", "P-2001", "P-3001"],
        "source": ["photos/P-9001.png"] + ["photos/P-1001.jpg"] * 2 + ["photos/P-2001.png", "photos/P-1005.png"],
        "prompt": ["broken photo", "broken condition", "missing condition", "own condition", "plain img2img"],
        "mask": pa.nulls(5, pa.string()),
        "sku_group": ["x"] * 5,
        "control_image": [None, "conditions/broken.png", "conditions/gone.png", "conditions/pose.png", None],
        "control": [None, None, None, None, "none"],  # P-3001 opts out of the job's canny
    })
    table = pq.read_table(manifest)
    table = pa.concat_tables([table, extra], promote_options="default")
    pq.write_table(table, manifest)
    return manifest, table


def test_catalogue_reshot_with_canny_control(tmp_path, ray_local):
    """jobs/catalogue-controlnet.yaml on tiny models and local files, as its header documents."""
    manifest, table = _catalogue_inputs(tmp_path / "catalogue")
    output = tmp_path / "reshot"
    result = cli_in_process("run", str(ROOT / "jobs" / "catalogue-controlnet.yaml"), "--manifest", str(manifest),
                            "--output", str(output), "--model", "tiny:turbo", "--set", "controlnet=tiny:2.1",
                            "--set", f"num_inference_steps={STEPS}", "--workers", "1", "--batch-size", "4",
                            "--set", "report=false",
                            "--set", "image_format=png")  # lossless, for the pixel comparison (the job file says webp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 ok, 3 error of 11 rows" in result.stdout, result.stdout[-2000:]
    ids = table.column("id").to_pylist()
    by_id = {r["id"]: r for r in check_exactly_once(str(output), ids)}
    photos = tmp_path / "catalogue" / "photos"
    for row_id in ["P-1001", "P-1002", "P-1003", "P-1004", "P-1005", "P-1006"]:  # JPEG, EXIF, CMYK, RGBA, palette, 16-bit
        r = by_id[row_id]
        assert r["status"] == "ok" and r["image"].endswith(f"/{safe_key(row_id)}.png"), (row_id, r["error"])
        assert (r["control"], r["control_scale"], r["control_image"]) == ("canny", 0.75, None)
        source = next(photos.glob(f"{row_id}.*"))
        upright = images.decode(source.read_bytes(), str(source))
        assert (r["source_width"], r["source_height"]) == upright.size
        assert (r["width"], r["height"]) == images.output_size(*upright.size, get_variant("turbo"))  # follows the source
        canny = derive("canny", upright, r["width"], r["height"], (100, 200))
        assert r["control_sha256"] == hashlib.sha256(np.asarray(canny).tobytes()).hexdigest()
    assert by_id["P-1001"]["mode"] == "controlnet-inpaint" and by_id["P-1001"]["mask"].endswith("P-1001-background.png")
    assert {by_id[i]["mode"] for i in ("P-1002", "P-1006", "P-2001")} == {"controlnet"}
    pose = tmp_path / "catalogue/conditions/pose.png"
    assert by_id["P-2001"]["control"] is None and by_id["P-2001"]["control_image"] == str(pose)
    assert by_id["P-2001"]["control_sha256"] == hashlib.sha256(pose.read_bytes()).hexdigest()
    assert (by_id["P-3001"]["mode"], by_id["P-3001"]["control"], by_id["P-3001"]["control_sha256"]) == ("img2img", None, None)
    assert by_id["P-1003"]["sku_group"] == "jars"  # passed through
    reasons = {
        "P-9001": f"source is corrupt or truncated: {photos / 'P-9001.png'}",
        "P-9002": f"control image is corrupt or truncated: {tmp_path / 'catalogue/conditions/broken.png'}",
        "P-9003": f"control image not found: {tmp_path / 'catalogue/conditions/gone.png'}",
    }
    for row_id, reason in reasons.items():
        assert by_id[row_id]["status"] == "error" and by_id[row_id]["error"].startswith(reason), by_id[row_id]["error"]

    # pixels: a canny row, the ControlNet-inpaint row and the row without a condition, as diffusers draws them
    pipes = _pipelines()
    stored = read_images(str(output), [by_id[i] for i in ("P-1003", "P-1001", "P-3001", "P-2001")])
    for row_id in ("P-1003", "P-1001", "P-3001", "P-2001"):
        r = by_id[row_id]
        upright = images.decode(Path(r["source"]).read_bytes(), r["source"])
        if row_id == "P-3001":
            # the img2img pipeline takes its source at the output size (it does not resize; the worker does)
            want = _reference(pipes["img2img"], r, image=fit(upright, r["width"], r["height"]), strength=r["strength"])
        elif row_id == "P-2001":
            pose = images.decode((tmp_path / "catalogue/conditions/pose.png").read_bytes(), "pose.png")
            want = _reference(pipes["controlnet"], r, control_image=pose)
        else:
            canny = derive("canny", upright, r["width"], r["height"], (100, 200))
            inpaint = {"image": upright, "mask_image": Image.open(tmp_path / "catalogue/masks/P-1001-background.png")}
            want = _reference(pipes[r["mode"]], r, control_image=canny, **(inpaint if row_id == "P-1001" else {}))
        assert _close(stored[row_id], want) <= 1, row_id


# ---------------------------------------------------------------------- a prompt job on S3, resumed
def _condition(i: int) -> bytes:
    edges = np.zeros((48, 64), np.uint8)
    edges[8 + i : 40 - i, 10 + 3 * i] = edges[8 + i, 10 + 3 * i : 54 - i] = 255
    return encode(Image.fromarray(edges, "L"), "PNG")


def _prompt_rows(start: int, n: int, bucket: str) -> pa.Table:
    scales = [0.4, 0.75, 1.0, None]
    rows = range(start, start + n)
    return pa.table({
        "id": [f"row-{i:02d}" for i in rows],
        "prompt": [f"a chair, take {i}" for i in rows],
        "seed": pa.array([100 + i for i in rows], pa.int64()),
        "control_image": [None if i % 5 == 4 else f"s3://{bucket}/conditions/{i % 3}.png" for i in rows],
        "control_scale": pa.array([scales[i % 4] for i in rows], pa.float64()),
    })


def test_prompt_job_with_control_images_matches_diffusers_across_batches_and_a_resume(tmp_path, s3_bucket, ray_local):
    store = open_storage(f"s3://{s3_bucket}")
    for i in range(3):
        store.put_bytes(f"conditions/{i}.png", _condition(i))
    manifest = f"s3://{s3_bucket}/prompts/"
    first = _prompt_rows(0, 8, s3_bucket)
    buffer = io.BytesIO()
    pq.write_table(first, buffer)
    store.put_bytes("prompts/part-0.parquet", buffer.getvalue())
    output = f"s3://{s3_bucket}/out"
    args = ["run", "--manifest", manifest, "--output", output, "--model", "tiny:turbo", "--set", "controlnet=tiny:2.1",
            "--set", f"num_inference_steps={STEPS}", "--shard-size", "4", "--batch-size", "2", "--workers", "1",
            "--set", "report=false"]
    result = cli_in_process(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 ok, 0 error" in result.stdout, result.stdout[-2000:]

    second = _prompt_rows(8, 6, s3_bucket)  # appended rows: the next run resumes with them
    buffer = io.BytesIO()
    pq.write_table(second, buffer)
    store.put_bytes("prompts/part-1.parquet", buffer.getvalue())
    result = cli_in_process(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 shards already committed, 2 to run" in result.stdout and "14 ok, 0 error" in result.stdout, result.stdout[-2000:]

    refused = cli_in_process(*[a if a != "controlnet=tiny:2.1" else "controlnet=tiny:2.0" for a in args])
    assert refused.returncode != 0 and re.search(r"differs in: controlnet_id", refused.stderr), refused.stderr[-2000:]

    ids = first.column("id").to_pylist() + second.column("id").to_pylist()
    rows = check_exactly_once(output, ids)
    stored = read_images(output, rows)
    pipes = _pipelines()
    for r in sorted(rows, key=lambda r: r["id"]):
        i = int(r["id"].split("-")[1])
        assert r["status"] == "ok", r["error"]
        if i % 5 == 4:  # no condition: as without a ControlNet
            assert (r["control_image"], r["control_scale"], r["control_sha256"]) == (None, None, None)
            want = _reference(pipes["text-to-image"], r)
        else:
            data = _condition(i % 3)
            assert r["control_image"] == f"s3://{s3_bucket}/conditions/{i % 3}.png"
            assert r["control_scale"] == [0.4, 0.75, 1.0, 0.75][i % 4] and r["control"] is None
            assert r["control_sha256"] == hashlib.sha256(data).hexdigest()
            condition = images.decode(data, "condition.png")
            want = _reference(pipes["controlnet"], r, control_image=condition, controlnet_conditioning_scale=r["control_scale"])
        assert _close(stored[r["id"]], want) <= 1, r["id"]


# ---------------------------------------------------------------------- prefetch
def test_prefetch_benchmark_runs_with_condition_images():
    """benchmarks/edit_prefetch.py --control on a handful of rows (its figures come from full runs)."""
    result = subprocess.run([sys.executable, "benchmarks/edit_prefetch.py", "--control", "--rows", "8", "--repeats", "1",
                             "--shard-size", "4", "--batch-size", "4", "--delay", "0.05"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ControlNet (tiny:2.1) rows with 512x384 PNG condition images" in result.stdout
    assert re.search(r"delayed / instant = \d\.\d{3}", result.stdout), result.stdout


