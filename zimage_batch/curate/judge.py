"""A shard's curation on the worker: each drawn image scored, kept, redrawn or filtered.

Image k of a row at try t (0-based) is drawn at seed `seed + k + t * num_images`, so every try
of every image is reproducible alone with ZImagePipeline at the seed the metadata records. An
image that passes `keep` (and is not too close to an image of its row already kept, with
`dedup_within_row`) is stored with its scores and `tries`; one that fails its last try becomes
a metadata row with status `filtered`, its scores and no image. One metadata row per image,
whatever the tries, so exactly-once holds as without curation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from zimage_batch.curate.scorers import Scored, Scorers
from zimage_batch.curate.spec import EMBEDDING_COLUMN, FILTERED, TRIES_COLUMN, Curation

SEED_LIMIT = 2**63  # seeds are int64 in the metadata

KEEP, REDRAW, FILTER = "keep", "redraw", "filter"


class ShardJudge:
    """Decides each drawn image of one shard attempt; `extra(i)` is what its metadata row adds."""

    def __init__(self, curation: Curation, scorers: Scorers, images: list[dict[str, Any]],
                 draws_per_row: list[int]) -> None:
        """`images`: one entry per image (the manifest row, with its image_index); `draws_per_row`:
        each image's row's num_images (the seed stride between tries)."""
        self.curation, self.scorers = curation, scorers
        self.rule = curation.rule()
        self.images, self.stride = images, draws_per_row
        self.tries = [0] * len(images)
        self.scored: dict[int, Scored] = {}
        self.kept: dict[str, list[np.ndarray]] = {}  # row id -> embeddings of its kept images

    def decide(self, i: int, scored: Scored) -> str:
        """KEEP, REDRAW (tries are left) or FILTER, for image `i` just drawn and scored."""
        self.tries[i] += 1
        self.scored[i] = scored
        passes = self.rule is None or self.rule.keeps(scored.scores)
        if passes and self.curation.dedup_within_row is not None:
            same_row = self.kept.setdefault(str(self.images[i]["id"]), [])
            passes = not any(float(np.dot(e, scored.embedding)) >= self.curation.dedup_within_row for e in same_row)
            if passes:
                same_row.append(scored.embedding)
        if passes:
            return KEEP
        return REDRAW if self.tries[i] < self.curation.max_tries else FILTER

    def redraw(self, i: int, request: Any) -> Any:
        """Image `i`'s request for its next try: the first try's seed plus tries * num_images."""
        return dataclasses.replace(request, seed=(request.seed + self.stride[i]) % SEED_LIMIT)

    def extra(self, i: int) -> dict[str, Any]:
        """The curation columns of image `i`'s metadata row (and sample JSON)."""
        scored = self.scored.get(i)
        if scored is None:  # an error row: no scores
            return {}
        values: dict[str, Any] = dict(scored.scores)
        if self.curation.judges:
            values[TRIES_COLUMN] = self.tries[i]
        if self.curation.embeddings and scored.embedding is not None:
            values[EMBEDDING_COLUMN] = scored.embedding.astype(np.float16).tolist()
        return values

    def filtered_outcome(self, i: int, duration_ms: float) -> dict[str, Any]:
        """The outcome of an image that failed every try: scores, no image."""
        return {"status": FILTERED, "error": None, "image": None, "sha256": None, "duration_ms": duration_ms,
                **self.extra(i)}
