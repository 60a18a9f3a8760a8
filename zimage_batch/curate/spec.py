"""What a curated job asks for: which scores, from which checkpoints, what it keeps, how many
draws an image may take, whether embeddings are stored. Typed once here; the job file, the
checks before any work, the worker and the metadata columns all read it.

    scores: [clip, aesthetic, nsfw]     # metadata columns clip_score, aesthetic_score, nsfw_score
    scorers: {clip: SOURCE, ...}         # else the documented defaults on the hub
    keep: "clip_score >= 0.28"           # images failing it are redrawn, or become `filtered` rows
    max_tries: 3                         # draws per image (1: no redraw)
    embeddings: true                     # the CLIP image embedding as a float16 list column
    dedup_within_row: 0.95               # redraw an image this close to a kept image of its row
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from zimage_batch.curate.keep import KeepError, KeepRule
from zimage_batch.source import Source

#: score name -> its metadata column
SCORE_COLUMNS = {"clip": "clip_score", "aesthetic": "aesthetic_score", "nsfw": "nsfw_score"}
#: the checkpoints each score needs: `clip` (a transformers CLIPModel folder), `aesthetic` (the
#: LAION improved aesthetic predictor head, one safetensors file, over CLIP image embeddings),
#: `nsfw` (a transformers image-classification folder with a label named nsfw)
NEEDS = {"clip": ("clip",), "aesthetic": ("clip", "aesthetic"), "nsfw": ("nsfw",)}
#: where each scorer comes from when the job names no source (hub ids; an org/repo/file for the head)
DEFAULT_SOURCES = {
    "clip": "openai/clip-vit-large-patch14",
    "aesthetic": "ttj/sac-logos-ava1-l14-linearMSE/model.safetensors",
    "nsfw": "Falconsai/nsfw_image_detection",
}
EMBEDDING_COLUMN = "clip_embedding"
TRIES_COLUMN = "tries"
FILTERED = "filtered"  # the metadata status of an image that failed `keep` on every try
MAX_TRIES = 64


class CurationError(ValueError):
    """The curation settings cannot be used; the message is one line."""


@dataclass(frozen=True)
class Curation:
    """A job's curation settings, checked; crosses Ray inside the worker settings."""

    scores: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)  # checkpoint name -> source, for those needed
    ids: Mapping[str, str] = field(default_factory=dict)  # checkpoint name -> identity, as the driver resolved it
    keep: str | None = None
    max_tries: int = 1
    embeddings: bool = False
    dedup_within_row: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.scores or self.embeddings or self.dedup_within_row)

    @property
    def judges(self) -> bool:
        """Whether images can fail (a keep rule or a within-row duplicate check): a `tries` column."""
        return bool(self.keep or self.dedup_within_row)

    @property
    def checkpoints(self) -> tuple[str, ...]:
        """The checkpoints this job loads, in a fixed order."""
        needed = {n for s in self.scores for n in NEEDS[s]}
        if self.embeddings or self.dedup_within_row:
            needed.add("clip")
        return tuple(n for n in ("clip", "aesthetic", "nsfw") if n in needed)

    def rule(self) -> KeepRule | None:
        return KeepRule.parse(self.keep, self.columns()) if self.keep else None

    def columns(self) -> tuple[str, ...]:
        return tuple(SCORE_COLUMNS[s] for s in self.scores)

    def metadata_columns(self) -> dict[str, pa.DataType]:
        """The metadata columns a curated job adds: scores, tries, the embedding."""
        columns: dict[str, pa.DataType] = {c: pa.float64() for c in self.columns()}
        if self.judges:
            columns[TRIES_COLUMN] = pa.int64()
        if self.embeddings:
            columns[EMBEDDING_COLUMN] = pa.list_(pa.float16())
        return columns


def curation_of(settings: Mapping[str, Any]) -> Curation:
    """The curation settings of a job (its settings as a mapping), checked; CurationError names
    the first problem in one line. Sources are not fetched here (see `resolve_scorers`)."""
    scores = parse_scores(settings.get("scores"))
    sources = settings.get("scorers") or {}
    if not isinstance(sources, Mapping) or not all(isinstance(v, str) and v.strip() for v in sources.values()):
        raise CurationError(f"scorers maps scorer names ({', '.join(DEFAULT_SOURCES)}) to sources, got {sources!r}")
    tiny = sorted(k for k, v in sources.items() if (source := Source.try_parse(v)) is not None and source.kind == "tiny")
    if tiny:
        raise CurationError(f"scorers.{tiny[0]}: write a tiny scorer with make-tiny-model DIR --scorer "
                            f"{tiny[0]} and give DIR (scorers take a local path, s3:// or a hub id)")
    unknown = sorted(set(sources) - set(DEFAULT_SOURCES))
    if unknown:
        raise CurationError(f"unknown scorer {', '.join(unknown)} under scorers (known: {', '.join(DEFAULT_SOURCES)})")
    max_tries = settings.get("max_tries", 1)
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or not 1 <= max_tries <= MAX_TRIES:
        raise CurationError(f"max_tries must be an integer in 1..{MAX_TRIES}, got {max_tries!r}")
    within = settings.get("dedup_within_row")
    if within is not None and (isinstance(within, bool) or not isinstance(within, (int, float))
                               or not (math.isfinite(within) and -1 < within < 1)):
        raise CurationError(f"dedup_within_row is a cosine similarity in (-1, 1), got {within!r}")
    curation = Curation(scores=scores, keep=settings.get("keep") or None, max_tries=max_tries,
                        embeddings=bool(settings.get("embeddings")),
                        dedup_within_row=None if within is None else float(within))
    try:
        curation.rule()
    except KeepError as exc:
        raise CurationError(str(exc)) from None
    if max_tries > 1 and not curation.judges:
        raise CurationError("max_tries redraws images that fail keep (or dedup_within_row); set keep too")
    needed = curation.checkpoints
    chosen = {n: str(sources.get(n) or DEFAULT_SOURCES[n]).strip() for n in needed}
    return dataclasses.replace(curation, sources=chosen)


def parse_scores(value: Any) -> tuple[str, ...]:
    """`[clip, nsfw]`, `clip,nsfw` (from --set) or empty -> the scores, in a fixed order."""
    if value is None or value == "":
        return ()
    names: Sequence[Any] = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise CurationError(f"scores is a list of scorers ({', '.join(SCORE_COLUMNS)}), got {value!r}")
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = sorted(set(names) - set(SCORE_COLUMNS))
    if unknown:
        raise CurationError(f"unknown scorer {', '.join(unknown)} in scores (known: {', '.join(SCORE_COLUMNS)})")
    return tuple(s for s in SCORE_COLUMNS if s in names)
