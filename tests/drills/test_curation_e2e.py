"""Curation through real runs (issue 27) on tiny:turbo at 64x64 with tiny random scorers written
by `make-tiny-model --scorer`, on one local Ray cluster:

* scores: every score equals transformers' own classes run on the stored PNG read back (<= 1e-3),
  and the stored float16 embedding equals CLIP's image embedding;
* keep + max_tries: every image's outcome (kept at try 0, kept at try 1, filtered) is the one its
  scores at seed + k + t * num_images predict, and an image kept at try 1 is ZImagePipeline at
  that seed (<= 1/255);
* filtered rows: status filtered, scores, no image; the run exits 0 and counts them;
* dedup: a row repeating another's prompt and seed is found as near-duplicates;
* resume: a curated job with rows appended runs only the new shard, each image exactly once.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_in_process import cli_in_process, local_ray
from output_check import check_exactly_once, load_json, pixels, read_images, read_metadata
from PIL import Image

PROMPTS = {"r0": ("a red apple on a wooden table", 10), "r1": ("一只猫坐在屋顶上", 20),
           "dup": ("a red apple on a wooden table", 10)}  # dup: r0's prompt and seed, a planted duplicate


def _manifest(path: Path, ids: list[str]) -> str:
    """Rows of `ids`; the planted duplicate draws one image (num_images column), the others the job's."""
    rows = [{"id": i, "prompt": PROMPTS.get(i, (f"a lighthouse {i}", 30))[0], "seed": PROMPTS.get(i, ("", 30))[1]}
            | ({"num_images": 1 if i == "dup" else None} if "dup" in ids else {}) for i in ids]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _run(manifest: str, output: Path, *settings: str, fmt: str = "files") -> str:
    result = cli_in_process("run", "--manifest", manifest, "--output", str(output), "--model", "tiny:turbo",
                            "--format", fmt, "--workers", "1", "--shard-size", "1", "--set", "report=false",
                            *[arg for s in settings for arg in ("--set", s)])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("curation")
    for kind in ("clip", "nsfw", "aesthetic"):
        result = cli_in_process("make-tiny-model", str(d / "scorers" / kind), "--scorer", kind)
        assert result.returncode == 0 and f"tiny {kind} scorer written" in result.stdout, result.stderr
    scorers = {"clip": d / "scorers/clip", "nsfw": d / "scorers/nsfw",
               "aesthetic": d / "scorers/aesthetic/aesthetic.safetensors"}
    sources = [f"scorers.{k}={v}" for k, v in scorers.items()]
    out = {"dir": d, "scorers": scorers, "sources": sources}
    with local_ray():
        # scores of four draws per row (seeds s..s+3), the embeddings, and a planted duplicate
        _run(_manifest(d / "a.parquet", ["r0", "r1", "dup"]), d / "scored", "scores=clip,aesthetic,nsfw",
             "embeddings=true", "num_images=4", *sources)
        scored = {(m["id"], m["image_index"]): m for m in read_metadata(str(d / "scored"))}
        keep, expected = _keep_rule(scored)
        out |= {"scored": scored, "keep": keep, "expected": expected}
        curated = ["scores=clip", f"keep={keep}", "max_tries=2", "num_images=2", "embeddings=true", *sources]
        out["curated_settings"] = curated
        out["curated_stdout"] = _run(_manifest(d / "b.parquet", ["r0", "r1"]), d / "curated", *curated, fmt="parquet")
        out["markers_before"] = _markers(d / "curated")
        out["resumed_stdout"] = _run(_manifest(d / "b.parquet", ["r0", "r1", "r2"]), d / "curated", *curated,
                                     fmt="parquet")
        out["filtered_stdout"] = _run(_manifest(d / "c.parquet", ["r0"]), d / "filtered", "scores=clip,nsfw",
                                      "keep=clip_score > 1", "max_tries=2", *sources)
    return out


def _markers(output: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (output / "_commits").iterdir()}


def _keep_rule(scored: dict) -> tuple[str, dict]:
    """A threshold on clip_score that fails r0's image 0 at try 0 (seed 10) and keeps it at try 1
    (seed 12), and what it predicts for every image of rows r0 and r1 with num_images 2, max_tries 2."""
    first, second = scored[("r0", 0)]["clip_score"], scored[("r0", 2)]["clip_score"]
    op = ">=" if second > first else "<="
    low, high = sorted((first, second))
    values = sorted(v for (i, _), m in scored.items() if i in ("r0", "r1") for v in [m["clip_score"]])
    gaps = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:]) if low <= a and b <= high]
    width, threshold = max(gaps)
    assert width > 2e-4, f"scores too close to choose a threshold: {values}"
    passes = (lambda v: v >= threshold) if op == ">=" else (lambda v: v <= threshold)  # noqa: E731
    expected = {}
    for row in ("r0", "r1"):
        for k in range(2):
            tries = [scored[(row, k + t * 2)] for t in range(2)]
            kept = next((t for t, m in enumerate(tries) if passes(m["clip_score"])), None)
            expected[(row, k)] = ("ok", kept + 1, tries[kept]["seed"]) if kept is not None else (
                "filtered", 2, tries[1]["seed"])
    assert expected[("r0", 0)] == ("ok", 2, 12)
    return f"clip_score {op} {threshold!r}", expected


def test_every_score_equals_transformers_on_the_stored_png(runs):
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoProcessor, CLIPModel

    output = str(runs["dir"] / "scored")
    rows = check_exactly_once(output, ["r0", "r1", "dup"], {"r0": 4, "r1": 4, "dup": 1})
    images = read_images(output, rows)
    s = runs["scorers"]
    clip, processor = CLIPModel.from_pretrained(s["clip"]).eval(), AutoProcessor.from_pretrained(s["clip"])
    nsfw = AutoModelForImageClassification.from_pretrained(s["nsfw"]).eval()
    nsfw_processor = AutoImageProcessor.from_pretrained(s["nsfw"])
    head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 16),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.1),
                               torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)).eval()  # the LAION layout, tiny
    head.load_state_dict({k.removeprefix("layers."): v for k, v in load_file(s["aesthetic"]).items()})
    for meta in rows:
        picture = Image.open(io.BytesIO(images[(meta["id"], meta["image_index"])])).convert("RGB")
        with torch.no_grad():
            out = clip(**processor(text=[meta["prompt"]], images=[picture], return_tensors="pt", padding=True,
                                   truncation=True))
            probabilities = nsfw(**nsfw_processor(images=[picture], return_tensors="pt")).logits.softmax(-1)[0]
            embedding = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            aesthetic = head(embedding)[0, 0]
        assert abs(meta["clip_score"] - float((out.text_embeds * out.image_embeds).sum())) <= 1e-3
        assert abs(meta["aesthetic_score"] - float(aesthetic)) <= 1e-3
        assert abs(meta["nsfw_score"] - float(probabilities[nsfw.config.label2id["nsfw"]])) <= 1e-3
        assert np.abs(np.array(meta["clip_embedding"]) - out.image_embeds[0].numpy()).max() <= 1e-3
    schema = pq.read_schema(next((runs["dir"] / "scored" / "metadata").iterdir()))
    assert schema.field("clip_embedding").type == pa.list_(pa.float16())
    assert "tries" not in schema.names  # no keep rule: every image is drawn once


def test_kept_and_filtered_images_follow_their_scores_at_seed_plus_k_plus_t_times_num_images(runs):
    output = str(runs["dir"] / "curated")
    rows = check_exactly_once(output, ["r0", "r1", "r2"], 2)
    outcomes = {(m["id"], m["image_index"]): (m["status"], m["tries"], m["seed"]) for m in rows if m["id"] != "r2"}
    assert outcomes == runs["expected"]
    for meta in rows:
        assert (meta["image"] is None) == (meta["status"] == "filtered") and meta["clip_score"] is not None
    images = read_images(output, rows)
    kept_late = next(m for m in rows if m["id"] == "r0" and m["image_index"] == 0)
    assert kept_late["seed"] == 12 and kept_late["tries"] == 2
    again = pixels(images[("r0", 0)])
    scored = read_images(str(runs["dir"] / "scored"), list(runs["scored"].values()))
    assert np.abs(again.astype(int) - pixels(scored[("r0", 2)]).astype(int)).max() <= 1  # the same seed, drawn before
    assert np.abs(again.astype(int) - _reference(kept_late["prompt"], 12).astype(int)).max() <= 1
    data = pq.read_table(Path(output) / "data").to_pylist()  # the parquet format carries the scores and embedding
    assert {(d["id"], d["image_index"]) for d in data} == {k for k, v in outcomes.items() if v[0] == "ok"} | {
        ("r2", 0), ("r2", 1)} - {k for k, v in outcomes.items() if v[0] != "ok"}
    assert all(len(d["clip_embedding"]) == 16 and d["tries"] >= 1 for d in data)
    assert pq.read_schema(next((Path(output) / "data").iterdir())).field("clip_embedding").type == pa.list_(pa.float16())


def _reference(prompt: str, seed: int) -> np.ndarray:
    from diffusers import ZImagePipeline

    from zimage_batch.model.sources import resolve_model

    pipe = ZImagePipeline.from_pretrained(resolve_model("tiny:turbo").path)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, width=64, height=64, num_inference_steps=8, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


def test_an_image_failing_every_try_is_a_filtered_row_and_the_run_is_done(runs):
    output = str(runs["dir"] / "filtered")
    rows = check_exactly_once(output, ["r0"])
    assert [(r["status"], r["tries"], r["image"], r["seed"]) for r in rows] == [("filtered", 2, None, 11)]
    assert rows[0]["clip_score"] is not None and rows[0]["nsfw_score"] is not None
    assert "done: 0 ok, 0 error, 1 filtered of 1 rows" in runs["filtered_stdout"]
    status = cli_in_process("status", output)
    assert status.returncode == 0 and "1 filtered" in status.stdout, status.stdout
    marker = load_json(output, next(iter(_markers(Path(output)))).join(("_commits/", "")))
    assert (marker["ok"], marker["error"], marker["filtered"]) == (0, 0, 1)


def test_the_report_and_the_card_show_the_scores(runs):
    output = runs["dir"] / "curated"
    result = cli_in_process("report", str(output))
    assert result.returncode == 0, result.stderr
    page = (output / "report.html").read_text()
    section = page[page.index("<h2>Curation</h2>"):]
    assert "<h3>clip_score</h3>" in section and "<svg" in section and "best:" in section and "worst:" in section
    filtered = sum(1 for v in runs["expected"].values() if v[0] == "filtered")
    assert f"{filtered} image(s) filtered" in section
    card = (output / "README.md").read_text()
    assert "## Curation" in card and "| `clip_embedding` | list<element: halffloat> |" in card
    assert "name: clip_score" in card and "| `tries` | int64 |" in card


def test_dedup_finds_a_row_repeating_another_rows_prompt_and_seed(runs):
    output = runs["dir"] / "scored"
    result = cli_in_process("dedup", str(output), "--threshold", "0.9999")
    assert result.returncode == 0 and "1 pair(s)" in result.stdout and "among 9 images" in result.stdout, result.stdout
    pairs = pq.read_table(output / "duplicates.parquet").to_pylist()
    assert {frozenset({(p["id_a"], p["image_index_a"]), (p["id_b"], p["image_index_b"])}) for p in pairs} == {
        frozenset({("dup", 0), ("r0", 0)})}
    assert all(p["cosine"] >= 0.9999 for p in pairs)
    assert _markers(output)  # committed shards untouched: dedup only writes duplicates.parquet
    missing = cli_in_process("dedup", str(runs["dir"] / "filtered"))
    assert missing.returncode != 0 and "no clip_embedding column" in missing.stderr


def test_a_resumed_curated_job_runs_only_the_new_rows(runs):
    assert "plan: 3 rows in 3 shards; 2 shards already committed, 1 to run" in runs["resumed_stdout"]
    after = _markers(runs["dir"] / "curated")
    assert {k: after[k] for k in runs["markers_before"]} == runs["markers_before"]
    job = load_json(str(runs["dir"] / "curated"), "job.json")
    assert set(job["job"]["scorer_ids"]) == {"clip"} and job["job"]["scorer_ids"]["clip"].startswith("sha256:")
