"""Curation settings without a model or Ray (issue 27): the keep expression (safe, checked
against the scores computed), the job's curation settings and their refusals, the fingerprint
(jobs without curation keep theirs), the redraw seeds, and the exact near-duplicate search."""

from __future__ import annotations

import numpy as np
import pytest

from zimage_batch.curate.judge import FILTER, KEEP, REDRAW, ShardJudge
from zimage_batch.curate.keep import KeepError, KeepRule
from zimage_batch.curate.scorers import Scored
from zimage_batch.curate.sources import chain_widths
from zimage_batch.curate.spec import CurationError, curation_of
from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.jobspec import JobError, JobSpec, load_job
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.output.dedup import near_pairs

COLUMNS = ("clip_score", "aesthetic_score", "nsfw_score")


@pytest.mark.parametrize("text, scores, kept", [
    ("clip_score >= 0.28 and nsfw_score < 0.2", {"clip_score": 0.3, "nsfw_score": 0.1}, True),
    ("clip_score >= 0.28 and nsfw_score < 0.2", {"clip_score": 0.3, "nsfw_score": 0.5}, False),
    ("not (aesthetic_score < 5) or clip_score > .5", {"aesthetic_score": 4.0, "clip_score": 0.6}, True),
    ("0.1 < clip_score <= 0.3", {"clip_score": 0.35}, False),
    ("clip_score > -0.5", {"clip_score": float("nan")}, False),
    ("clip_score != 1", {"clip_score": 0.5}, True),
])
def test_keep_rules_evaluate_comparisons_and_boolean_logic(text, scores, kept):
    assert KeepRule.parse(text, COLUMNS).keeps(scores) is kept


@pytest.mark.parametrize("text, problem", [
    ("__import__('os').system('x')", "a call"),
    ("clip_score.real > 0", "an attribute"),
    ("clip_score + 1 > 0", "arithmetic"),
    ("clip_score > 'a'", "the constant 'a'"),
    ("clip_score", "a condition on scores"),
    ("clip_score in [1]", "compares with <"),
    ("clip_score > ", "does not parse"),
    ("clip_score > 1e999", "finite"),
    ("lambda: 1", "not a lambda"),
    ("score > 1", "names score, not a score this job computes"),
    ("", "empty"),
])
def test_keep_refuses_anything_but_comparisons_of_computed_scores(text, problem):
    with pytest.raises(KeepError, match=problem.replace("(", r"\(")):
        KeepRule.parse(text, COLUMNS)


def test_keep_naming_a_score_the_job_does_not_compute_is_refused():
    with pytest.raises(CurationError, match="keep names nsfw_score, not a score this job computes .clip_score."):
        curation_of({"scores": ["clip"], "keep": "nsfw_score < 0.2"})


@pytest.mark.parametrize("settings, problem", [
    ({"scores": ["clip", "beauty"]}, "unknown scorer beauty in scores"),
    ({"scores": "clip", "scorers": {"beauty": "x"}}, "unknown scorer beauty under scorers"),
    ({"scores": "clip", "keep": "clip_score > 0", "max_tries": 0}, "max_tries must be an integer in 1..64"),
    ({"scores": "clip", "max_tries": 2}, "set keep too"),
    ({"scores": "clip", "scorers": {"clip": "tiny:clip"}}, "make-tiny-model DIR --scorer clip"),
    ({"embeddings": True, "dedup_within_row": 1.5}, "dedup_within_row is a cosine similarity"),
])
def test_bad_curation_settings_are_refused_in_one_line(settings, problem):
    with pytest.raises(CurationError, match=problem) as info:
        curation_of(settings)
    assert "\n" not in str(info.value)


def test_scores_from_the_command_line_and_the_checkpoints_they_need():
    job = load_job(None, {"manifest": "m", "output": "o"}, ["scores=nsfw,clip", "scorers.clip=/some/clip",
                                                             "keep=clip_score > 0.2", "max_tries=3"])
    assert job.scores == ["clip", "nsfw"] and job.max_tries == 3
    curation = job.curation()
    assert curation.checkpoints == ("clip", "nsfw")
    assert curation.sources == {"clip": "/some/clip", "nsfw": "Falconsai/nsfw_image_detection"}
    assert list(curation.metadata_columns()) == ["clip_score", "nsfw_score", "tries"]
    assert curation_of({"scores": ["aesthetic"]}).checkpoints == ("clip", "aesthetic")  # the head reads CLIP embeddings
    assert list(curation_of({"embeddings": True}).metadata_columns()) == ["clip_embedding"]
    with pytest.raises(JobError, match="max_tries must be"):
        load_job(None, {"manifest": "m", "output": "o"}, ["max_tries=0"])
    with pytest.raises(JobError, match="scorer_ids is worked out by the run"):
        load_job(None, {"manifest": "m", "output": "o"}, ["scorer_ids={}"])


def test_jobs_without_curation_keep_their_fingerprint_and_curation_settings_change_it():
    plain = JobSpec(manifest="m", output="o")
    assert plain.fingerprint() == "db8cc1aefb5b583c"  # as before curation existed
    assert JobSpec(manifest="m", output="o", max_tries=1, scores=[], embeddings=False).fingerprint() == plain.fingerprint()
    curated = JobSpec(manifest="m", output="o", scores=["clip"], keep="clip_score > 0.2", max_tries=2,
                      scorer_ids={"clip": "sha256:1"})
    changes = [{"scores": ["clip", "nsfw"]}, {"keep": "clip_score > 0.3"}, {"max_tries": 3}, {"embeddings": True},
               {"scorer_ids": {"clip": "sha256:2"}}, {"dedup_within_row": 0.9}]
    for change in changes:
        assert JobSpec(**{**curated.to_dict(), **change}).fingerprint() != curated.fingerprint(), change


def _judge(keep: str | None, max_tries: int, within: float | None = None) -> ShardJudge:
    settings = {"scores": ["clip"], "keep": keep, "max_tries": max_tries, "dedup_within_row": within}
    images = [{"id": "a", "image_index": k} for k in range(3)]
    return ShardJudge(curation_of(settings), None, images, [3, 3, 3])


def test_a_failing_image_is_redrawn_at_seed_plus_tries_times_num_images_then_filtered():
    judge = _judge("clip_score > 0.5", max_tries=3)
    request = GenerationRequest("p", 11, 64, 64, 2, 0.0)  # image 1 of a row with seed 10 and num_images 3
    low, high = Scored({"clip_score": 0.1}, np.ones(4)), Scored({"clip_score": 0.9}, np.ones(4))
    assert judge.decide(1, low) == REDRAW
    request = judge.redraw(1, request)
    assert request.seed == 14  # 10 + 1 + 1 * 3
    assert judge.decide(1, low) == REDRAW
    assert judge.redraw(1, request).seed == 17
    assert judge.decide(1, low) == FILTER
    assert judge.filtered_outcome(1, 5.0) == {"status": "filtered", "error": None, "image": None, "sha256": None,
                                              "duration_ms": 5.0, "clip_score": 0.1, "tries": 3}
    assert judge.decide(2, high) == KEEP and judge.extra(2) == {"clip_score": 0.9, "tries": 1}


def test_dedup_within_row_turns_down_an_image_too_close_to_a_kept_one_of_its_row():
    judge = _judge(None, max_tries=2, within=0.9)
    e = np.array([1.0, 0.0]), np.array([0.99, 0.141]), np.array([0.0, 1.0])
    assert judge.decide(0, Scored({"clip_score": 0.0}, e[0])) == KEEP
    assert judge.decide(1, Scored({"clip_score": 0.0}, e[1])) == REDRAW  # cosine 0.99 with image 0
    assert judge.decide(1, Scored({"clip_score": 0.0}, e[2])) == KEEP
    assert judge.extra(1)["tries"] == 2


def test_near_pairs_is_exact_across_blocks():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 8)).astype(np.float32)
    e[17], e[42], e[3] = e[5], e[5] * 2, -e[5]  # planted duplicates of row 5 (and its opposite)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sims = e @ e.T
    expected = {(i, j) for i in range(50) for j in range(i + 1, 50) if sims[i, j] >= 0.6}
    for block in (1, 7, 64):
        found = {(i, j): c for i, j, c in near_pairs(e, 0.6, block=block)}
        assert set(found) == expected
    assert {(5, 17), (5, 42), (17, 42)} <= expected and (3, 5) not in expected


def test_an_aesthetic_head_must_chain_from_the_clip_dim_to_one_score():
    shapes = {"layers.0.weight": [32, 16], "layers.0.bias": [32], "layers.2.weight": [1, 32], "layers.2.bias": [1]}
    assert chain_widths(shapes, "h", 16) == [16, 32, 1]
    with pytest.raises(CurationError, match="reads 16-dim embeddings; the CLIP scorer makes 768-dim ones"):
        chain_widths(shapes, "h", 768)
    with pytest.raises(ModelSourceError, match="not in the LAION aesthetic predictor layout"):
        chain_widths({**shapes, "head.weight": [1, 1]}, "h", 16)
    with pytest.raises(ModelSourceError, match="does not follow"):
        chain_widths({**shapes, "layers.2.weight": [1, 31]}, "h", 16)
