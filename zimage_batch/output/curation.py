"""The curation part of `report.html` and of the dataset card: for each score column, a histogram
of its values over every committed image (stored or filtered), the best and worst stored images
by that score, and how many images the keep rule filtered.
"""

from __future__ import annotations

import heapq
import html
import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from zimage_batch.curate.spec import FILTERED, SCORE_COLUMNS, TRIES_COLUMN
from zimage_batch.output import layout
from zimage_batch.storage import Storage

BINS = 20
EXTREMES = 4  # best and worst images shown per score
READERS = 16  # metadata files read at once
ROW_COLUMNS = ["id", "image_index", "status", "image", "prompt", "seed", "width", "height"]


@dataclass
class ScoreSpread:
    """One score column over the committed images."""

    column: str
    values: list[np.ndarray] = field(default_factory=list)
    best: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # min-heaps of (score, n, row)
    worst: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)

    def add(self, rows: list[dict[str, Any]], n: int) -> int:
        self.values.append(np.array([r[self.column] for r in rows if r[self.column] is not None], np.float64))
        for row in rows:
            score = row[self.column]
            if score is None or row["status"] != "ok":
                continue
            n += 1
            for heap, key in ((self.best, score), (self.worst, -score)):
                (heapq.heappush if len(heap) < EXTREMES else heapq.heappushpop)(heap, (key, n, row))
        return n

    def all_values(self) -> np.ndarray:
        return np.concatenate(self.values) if self.values else np.zeros(0)


def score_spreads(storage: Storage, shards: Sequence[str], columns: Sequence[str]) -> tuple[list[ScoreSpread], int, int]:
    """Each score column's spread over the committed shards, the filtered count and the images
    that took more than one try."""
    spreads = [ScoreSpread(c) for c in columns]
    filtered = redrawn = n = 0

    def read(shard: str) -> tuple[list[str], list[dict[str, Any]]]:
        pf = pq.ParquetFile(io.BytesIO(storage.get_bytes(layout.metadata_key(shard))))
        names = pf.schema_arrow.names
        return names, pf.read(columns=[c for c in [*ROW_COLUMNS, *columns, TRIES_COLUMN] if c in names]).to_pylist()

    with ThreadPoolExecutor(max_workers=READERS) as pool:  # small objects: many in flight on S3
        tables = list(pool.map(read, shards))
    for names, rows in tables:
        filtered += sum(1 for r in rows if r["status"] == FILTERED)
        redrawn += sum(1 for r in rows if (r.get(TRIES_COLUMN) or 1) > 1)
        for spread in spreads:
            if spread.column in names:
                n = spread.add(rows, n)
    return spreads, filtered, redrawn


def histogram_svg(values: np.ndarray, width: int = 360, height: int = 120) -> str:
    """Inline SVG bars of `values` in BINS bins, with the range under them."""
    if values.size == 0:
        return "<p class=muted>no values</p>"
    low, high = float(values.min()), float(values.max())
    counts, _ = np.histogram(values, bins=BINS, range=(low, high if high > low else low + 1e-9))
    bar = width / BINS
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 16 - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="#4a78b5">'
        f"<title>{c}</title></rect>"
        for i, c in enumerate(counts) for h in [(height - 20) * c / max(counts.max(), 1)])
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">{bars}'
            f'<text x="0" y="{height - 2}" font-size="11">{low:.4g}</text>'
            f'<text x="{width}" y="{height - 2}" font-size="11" text-anchor="end">{high:.4g}</text></svg>')


def curation_section(storage: Storage, shards: Sequence[str], job: dict[str, Any],
                     thumbnails: Callable[[Storage, list[dict[str, Any]]], dict[str, str]]) -> str:
    """The report's Curation section ('' for a job without scores)."""
    columns = [SCORE_COLUMNS[s] for s in job.get("scores") or [] if s in SCORE_COLUMNS]
    if not columns:
        return ""
    spreads, filtered, redrawn = score_spreads(storage, shards, columns)
    keep = job.get("keep")
    parts = [f"<section><h2>Curation</h2><p class=muted>keep: <code>{html.escape(str(keep or 'every image'))}</code>"
             f" &middot; max_tries {html.escape(str(job.get('max_tries', 1)))} &middot; {filtered} image(s) filtered "
             f"&middot; {redrawn} kept or filtered after more than one try</p>"]
    for spread in spreads:
        values = spread.all_values()
        best = [row for _, _, row in sorted(spread.best, reverse=True)]
        worst = [row for _, _, row in sorted(spread.worst, reverse=True)]
        thumbs = thumbnails(storage, best + worst)
        mean = f", mean {values.mean():.4g}" if values.size else ""
        parts.append(f"<h3>{spread.column}</h3><p class=muted>{values.size} image(s){mean}</p>{histogram_svg(values)}"
                     f"{_strip('best', best, spread.column, thumbs)}{_strip('worst', worst, spread.column, thumbs)}")
    return "".join(parts) + "</section>"


def _strip(title: str, rows: list[dict[str, Any]], column: str, thumbs: dict[str, str]) -> str:
    cells = []
    for row in rows:
        uri = thumbs.get(row["image"])
        img = f'<img src="{uri}" alt="{html.escape(str(row["id"]))}" width="96">' if uri else ""
        cells.append(f"<figure>{img}<figcaption>{row[column]:.4g} &middot; <code>{html.escape(str(row['id']))}</code>"
                     f"</figcaption></figure>")
    return f"<p>{title}:</p><div class=gallery>{''.join(cells)}</div>" if cells else ""


def card_lines(job: dict[str, Any], filtered: int) -> list[str]:
    """The dataset card's Curation section (none for a job without curation)."""
    columns = [SCORE_COLUMNS[s] for s in job.get("scores") or [] if s in SCORE_COLUMNS]
    if not columns and not job.get("embeddings"):
        return []
    lines = ["", "## Curation"]
    if columns:
        lines.append(f"Scored on the generating worker from the decoded image: {', '.join(f'`{c}`' for c in columns)} "
                     "(float64; `clip_score` is the raw cosine of CLIP's text and image embeddings).")
    if job.get("keep"):
        lines.append(f"Kept: `{job['keep']}`, at most {job.get('max_tries', 1)} draw(s) per image (`tries`; image k "
                     f"of a row at try t uses seed + k + t * num_images). {filtered} image(s) failed every try: their "
                     f"rows have status `{FILTERED}`, their scores and no image.")
    if job.get("embeddings"):
        lines.append("`clip_embedding`: the CLIP image embedding, L2-normalised, as a float16 list.")
    return [line for text in lines for line in (text, "")][:-1]  # paragraphs
