"""Curation refusals through the CLI (issue 27): an unknown scorer, a missing or pickle source, a
head that does not fit the CLIP scorer, a classifier without an nsfw label, a bad keep
expression or one naming a score not computed, max_tries < 1, redraws on an edit manifest.
Each is one `error:` line, exit status 2, before Ray starts or a model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process, ray_not_started

from zimage_batch.curate.tiny import make_tiny_scorer


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("curation-refusals")
    found = {"clip": make_tiny_scorer(d / "clip", "clip"), "nsfw": make_tiny_scorer(d / "nsfw", "nsfw"),
             "aesthetic": make_tiny_scorer(d, "aesthetic"), "dir": d}
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"]}), d / "m.parquet")
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a cat"], "source": ["x.png"]}), d / "edit.parquet")
    (d / "clip.bin").write_bytes(b"pickle")
    wide = make_tiny_scorer(d / "wide", "clip")  # a CLIP whose projection dim the tiny head does not read
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "projection_dim": 24}))
    plain = make_tiny_scorer(d / "plain", "nsfw")  # a classifier without a label named nsfw
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "id2label": {"0": "cat", "1": "dog"}}))
    return found


CASES = {
    "unknown_scorer": (["scores=clip,beauty"], "unknown scorer beauty in scores"),
    "unknown_source": (["scores=clip", "scorers.beauty=x"], "unknown scorer beauty under scorers"),
    "bad_keep": (["scores=clip", "keep=__import__('os').system('ls') > 0"], "keep compares score names with numbers, not a call"),
    "keep_not_computed": (["scores=clip", "keep=nsfw_score < 0.2"], "keep names nsfw_score, not a score this job"),
    "max_tries": (["scores=clip", "keep=clip_score > 0", "max_tries=0"], "max_tries must be an integer in 1..64"),
    "missing": (["scores=clip", "scorers.clip=./no/such/clip"], "scorers.clip source './no/such/clip' is not"),
    "pickle": (["scores=clip", "scorers.clip={dir}/clip.bin"], "refusing scorers.clip"),
    "head_misfit": (["scores=aesthetic", "scorers.clip={dir}/wide", "scorers.aesthetic={dir}/aesthetic.safetensors"],
                    "reads 16-dim embeddings; the CLIP scorer makes 24-dim ones"),
    "no_nsfw_label": (["scores=nsfw", "scorers.nsfw={dir}/plain"], "has no label named nsfw"),
    "edit_redraw": (["scores=clip", "scorers.clip={dir}/clip", "keep=clip_score > 0", "max_tries=2"],
                    "max_tries > 1 redraws text-to-image rows only"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_curation_input_is_one_line_before_any_work(scorers, name, tmp_path):
    settings, expected = CASES[name]
    d = scorers["dir"]
    manifest = d / ("edit.parquet" if name == "edit_redraw" else "m.parquet")
    args = ["run", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--model", "tiny:turbo"]
    for setting in settings:
        args += ["--set", setting.format(dir=d)]
    with ray_not_started():
        result = cli_in_process(*args, env={"RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out" / "job.json").exists()
