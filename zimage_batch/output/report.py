"""`zimage-batch report OUTPUT`: one self-contained HTML page, `OUTPUT/report.html`.

The page makes no requests: thumbnails are embedded as JPEG data URIs and the chart is inline
SVG, so it opens from a laptop even when OUTPUT is on S3. It holds the job's figures (as
`status` reports them), a gallery (prompt, seed, id), the error rows, throughput over time,
each worker's busy fraction and the job settings; for edit jobs that keep masks, source | mask
| output side by side, most repainted first (review.py). All text from the job is escaped.

Large jobs are sampled: at most MAX_THUMBNAILS images, evenly spaced over at most
MAX_SAMPLE_SHARDS committed shards spread across the job (the same sample every time).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq

from zimage_batch.inputs.mask_spec import ALPHA, OUTPAINT, WORDS
from zimage_batch.output import formats, layout
from zimage_batch.output.curation import curation_section
from zimage_batch.output.ledger import CommitMarker
from zimage_batch.output.review import review_section
from zimage_batch.output.status import OutputState, load_output, summarize
from zimage_batch.redact import redact_env_vars
from zimage_batch.storage import Storage, open_storage
from zimage_batch.text import plural

REPORT_KEY = layout.REPORT
MAX_THUMBNAILS = 200
MAX_SAMPLE_SHARDS = 20
MAX_ERRORS = 500
THUMB_PX = 256
PROMPT_CHARS = 300
SAMPLE_COLUMNS = ["id", "image_index", "status", "error", "image", "prompt", "seed", "width", "height",
                  "source", "mode", "strength", "mask"]  # the last four: edit jobs (before and after)


def write_report(output: str | Storage | OutputState) -> str:
    """Render the report of OUTPUT (or of OUTPUT as already read) and store it as
    OUTPUT/report.html; returns its location."""
    state = output if isinstance(output, OutputState) else load_output(output)
    page = render(state)
    state.storage.put_bytes(REPORT_KEY, page.encode("utf-8"))
    return state.storage.url(REPORT_KEY)


def render(state: OutputState) -> str:
    """The whole page for one OUTPUT."""
    figures = summarize(state)
    sample, sample_note = gallery_sample(state)
    thumbs = thumbnails(state.storage, sample)
    thumbs |= source_thumbnails(sample)
    errors, errors_total = error_rows(state)
    model = str(state.job.get("job", {}).get("model", ""))
    body = [
        f"<h1>zimage-batch report</h1><p class=muted>{_e(state.storage.uri)} &middot; generated "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}</p>",
    ]
    if state.model_draws_noise:
        body.append(f"<p class=note>Model {_e(model)} is a tiny random-init checkpoint: its images are noise.</p>")
    body += [
        _figures_section(figures),
        _chart_section(state.markers),
        _workers_section(state.runs),
        _errors_section(errors, errors_total, failed_shards(state, figures)),
        _gallery_section(sample, thumbs, sample_note),
        curation_section(state.storage, [m.shard for m in state.markers], state.job.get("job", {}), thumbnails),
        review_section(state, read_images, _thumbnail, _e),  # edit jobs that keep masks: before and after
        _settings_section(state.job),
    ]
    return PAGE.format(title=_e(f"zimage-batch report: {state.storage.uri}"), body="\n".join(body))


# ---------------------------------------------------------------------- data
def _read_metadata(storage: Storage, shard: str, columns: list[str]) -> list[dict[str, Any]]:
    pf = pq.ParquetFile(io.BytesIO(storage.get_bytes(layout.metadata_key(shard))))
    return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names]).to_pylist()


def _spread(items: list, k: int) -> list:
    """k items evenly spaced over `items` (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    return [items[math.floor(i * len(items) / k)] for i in range(k)]


def gallery_sample(state: OutputState) -> tuple[list[dict[str, Any]], str]:
    """The ok rows shown in the gallery, and a sentence saying how they were chosen."""
    shards = [m for m in state.markers if m.ok]
    total_ok = sum(m.ok for m in shards)
    if total_ok <= MAX_THUMBNAILS:
        chosen, per_shard = shards, MAX_THUMBNAILS
    else:
        chosen = _spread(shards, MAX_SAMPLE_SHARDS)
        per_shard = math.ceil(MAX_THUMBNAILS / len(chosen))
    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = list(pool.map(lambda m: _read_metadata(state.storage, m.shard, SAMPLE_COLUMNS), chosen))
    sample: list[dict[str, Any]] = []
    for rows in tables:
        sample += _spread([r for r in rows if r["status"] == "ok"], per_shard)
    sample = sample[:MAX_THUMBNAILS]
    if len(sample) == total_ok:
        note = f"All {total_ok} images."
    else:
        note = (f"A sample of {len(sample)} of {total_ok} images, evenly spaced over {len(chosen)} of "
                f"{plural(len(shards), 'committed shard')} (the same sample every time).")
    return sample, note


def thumbnails(storage: Storage, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Data URIs of JPEG thumbnails by image location (a row's `image`: one per image, also when
    a row drew several); rows whose image cannot be read are left out."""
    images = read_images(storage, rows, key="image")
    with ThreadPoolExecutor(max_workers=4) as pool:
        uris = pool.map(_thumbnail, images.values())
        return {location: uri for location, uri in zip(images, uris) if uri}


#: What the metadata's `mask` column says of a mask derived on the worker (not a file to show).
DERIVED_MASKS = (ALPHA, WORDS, OUTPAINT)


def source_thumbnails(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Data URIs of JPEG thumbnails of edit rows' sources and masks, by their URI (local paths
    or s3://, as the metadata records them); what cannot be read is left out."""
    uris = sorted({row[c] for row in rows for c in ("source", "mask") if row.get(c) and row[c] not in DERIVED_MASKS})

    def one(uri: str) -> str | None:
        parent, _, name = uri.rstrip("/").rpartition("/")
        try:
            return _thumbnail(open_storage(parent or ".").get_bytes(name))
        except Exception:  # noqa: BLE001 - moved, deleted or not ours to read: shown as missing
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return {uri: thumb for uri, thumb in zip(uris, pool.map(one, uris)) if thumb}


def _thumbnail(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image shows as missing, not as a failed report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_images(storage: Storage, rows: list[dict[str, Any]], key: str = "id", column: str = "image") -> dict[str, bytes]:
    """Image bytes by each row's `key` column (id, or image for one entry per image), following
    each row's `image` location through its output format's reader (`output.formats`: an object
    of its own, a tar member, a Parquet `column` cell); containers are read in place (seeks, not
    whole downloads). Images that cannot be read are left out."""
    found = formats.read_images(storage, [row["image"] for row in rows], column)
    return {row[key]: found[row["image"]] for row in rows if row["image"] in found}


def error_rows(state: OutputState) -> tuple[list[dict[str, Any]], int]:
    """Up to MAX_ERRORS error rows (id, shard, error) and how many there are in all."""
    with_errors = [m for m in state.markers if m.error]
    total = sum(m.error for m in with_errors)
    rows: list[dict[str, Any]] = []
    for marker in with_errors:
        if len(rows) >= MAX_ERRORS:
            break
        for row in _read_metadata(state.storage, marker.shard, ["id", "status", "error"]):
            if row["status"] != "ok":
                rows.append({"id": row["id"], "shard": marker.shard, "error": row["error"]})
    return rows[:MAX_ERRORS], total


# ---------------------------------------------------------------------- sections
def _e(value: Any) -> str:
    """Text from the job as HTML: escaped, control characters shown as escapes (\\x00)."""
    text = "" if value is None else str(value)
    text = "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" and c not in "\t\n" else c for c in text)
    return html.escape(text, quote=True)


def _num(value: Any, fmt: str = "{}") -> str:
    return "?" if value is None else fmt.format(value)


def _figures_section(f: dict[str, Any]) -> str:
    items = [
        ("state", f["state"]),
        ("rows done", f"{f['rows_done']} of {_num(f['total_rows'])}"),
        ("rows ok", f["rows_ok"]),
        ("rows failed", f["rows_failed"]),
        ("rows left", _num(f["rows_left"])),
        ("shards done", f"{f['shards_done']} of {_num(f['total_shards'])}"),
        ("shards failed", len(f["shards_failed"])),
        ("img/s over the run's wall time", f"{f['throughput']['images_per_s_wall']:.2f}"),
        ("img/s over generation time", f"{f['throughput']['images_per_s_generation']:.2f}"),
        ("elapsed", _num(f["elapsed_s"], "{:.1f} s")),
        ("model", f["model"]),
        ("format", f["format"]),
        ("runs ended", f["runs"]),
    ]
    cells = "".join(f"<div class=fig><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in items)
    return (f"<section><h2>Figures</h2><div class=figs>{cells}</div>"
            f"<p class=muted>Latest run: {_e(f['throughput_text'])}.</p></section>")


def _image_index(row: dict[str, Any]) -> str:
    """' image 2' for image 2 of a row that drew several."""
    return f" image {_e(row['image_index'])}" if row.get("image_index") is not None else ""


def _gallery_section(sample: list[dict[str, Any]], thumbs: dict[str, str], note: str) -> str:
    """Each image with its prompt, id and seed; an edit row's source beside it (before / after),
    with its mode, strength and mask."""
    cards = []
    for row in sample:
        prompt = row["prompt"] or ""
        short = prompt if len(prompt) <= PROMPT_CHARS else prompt[:PROMPT_CHARS] + "…"
        img = _picture(thumbs.get(row["image"]), row["id"], row["width"], row["height"])
        if row.get("source"):
            before = _picture(thumbs.get(row["source"]), f"source of {row['id']}", None, None, "source not readable")
            img = (f"<div class=pair><div><span class=muted>before</span>{before}</div>"
                   f"<div><span class=muted>after</span>{img}</div></div>")
        cards.append(
            f"<figure{' class=edit' if row.get('source') else ''}>{img}<figcaption>"
            f"<p class=prompt title=\"{_e(prompt)}\">{_e(short)}</p>"
            f"<p class=muted>id <code>{_e(row['id'])}</code>{_image_index(row)} &middot; seed {_e(row['seed'])} &middot; "
            f"{_e(row['width'])}&times;{_e(row['height'])}</p>{_edit_caption(row, thumbs)}</figcaption></figure>"
        )
    missing = sum(1 for row in sample if row["image"] not in thumbs)
    extra = f" {missing} could not be read." if missing else ""
    grid = "".join(cards) or "<p>No images yet.</p>"
    return f"<section><h2>Gallery</h2><p class=muted>{_e(note)}{_e(extra)}</p><div class=gallery>{grid}</div></section>"


def _picture(uri: str | None, alt: Any, width: Any, height: Any, missing: str = "image not readable") -> str:
    if not uri:
        return f"<div class=missing>{_e(missing)}</div>"
    size = f' width="{_e(width)}" height="{_e(height)}"' if width and height else ""
    return f'<img src="{uri}" alt="{_e(alt)}"{size}>'


def _edit_caption(row: dict[str, Any], thumbs: dict[str, str]) -> str:
    """'mode inpaint · strength 0.6 · mask [thumbnail]' and the source's URI, for edit rows."""
    if not row.get("source"):
        return ""
    parts = [f"mode <b>{_e(row.get('mode'))}</b>"]
    if row.get("strength") is not None:
        parts.append(f"strength {_e(row['strength'])}")
    if row.get("mask") in DERIVED_MASKS:  # derived on the worker (alpha, words, a canvas): the review shows it
        parts.append(f"mask <b>{_e(row['mask'])}</b>")
    elif row.get("mask"):
        thumb = thumbs.get(row["mask"])
        mask = f'<img class=mask src="{thumb}" alt="mask">' if thumb else "(not readable)"
        parts.append(f"mask <span title=\"{_e(row['mask'])}\">{mask}</span>")
    return (f"<p class=muted>{' &middot; '.join(parts)}</p>"
            f"<p class=muted>source <code>{_e(row['source'])}</code></p>")


def failed_shards(state: OutputState, figures: dict[str, Any]) -> dict[str, str]:
    """Shards the latest ended run gave up on (shard -> last error)."""
    run = state.latest_run
    return dict(run.get("failed") or {}) if run is not None and figures["state"] != "running" else {}


def _errors_section(rows: list[dict[str, Any]], total: int, failed: dict[str, str]) -> str:
    parts = ["<section><h2>Errors</h2>"]
    if failed:
        items = "".join(f"<li><code>{_e(shard)}</code>: {_e(reason)}</li>" for shard, reason in failed.items())
        parts.append(f"<p>Shards that failed in the latest run (a rerun retries them):</p><ul>{items}</ul>")
    if not rows:
        parts.append("<p>No error rows.</p>")
    else:
        shown = f"the first {len(rows)} of {total}" if len(rows) < total else f"all {total}"
        body = "".join(f"<tr><td><code>{_e(r['id'])}</code></td><td><code>{_e(r['shard'])}</code></td>"
                       f"<td>{_e(r['error'])}</td></tr>" for r in rows)
        parts.append(f"<p class=muted>Rows stored as <code>error</code>: {shown}.</p>"
                     f"<table><tr><th>id</th><th>shard</th><th>error</th></tr>{body}</table>")
    return "".join(parts) + "</section>"


def throughput_svg(markers: list[CommitMarker], width: int = 760, height: int = 220, buckets: int = 40) -> str:
    """Rows per second over time (bars: each shard's rows spread over its run time) and rows
    done (line: stepping up at each shard's finish time)."""
    if not markers:
        return "<p>No committed shards yet.</p>"
    t0 = min(m.started for m in markers)
    t1 = max(m.finished for m in markers)
    span = max(t1 - t0, 1e-3)
    step = span / buckets
    rates = [0.0] * buckets
    for m in markers:  # a shard's rows count evenly over its own [started, finished]
        a, b = m.started - t0, m.finished - t0
        if b - a <= 0:
            rates[min(int(b / step), buckets - 1)] += m.rows / step
            continue
        for i in range(int(a / step), min(int(b / step), buckets - 1) + 1):
            overlap = min(b, (i + 1) * step) - max(a, i * step)
            rates[i] += m.rows * max(overlap, 0.0) / (b - a) / step
    left, right, top, bottom = 56, 56, 14, 30
    w, h = width - left - right, height - top - bottom
    peak = max(rates) or 1.0
    total = sum(m.rows for m in markers)
    bar_w = w / buckets
    bars = "".join(
        f'<rect x="{left + i * bar_w + 1:.1f}" y="{top + h - r / peak * h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
        f'height="{r / peak * h:.1f}" fill="#7aa6d8"><title>{r:.2f} rows/s</title></rect>'
        for i, r in enumerate(rates) if r
    )
    points, done = [f"{left},{top + h}"], 0
    for m in sorted(markers, key=lambda m: m.finished):
        done += m.rows
        points.append(f"{left + (m.finished - t0) / span * w:.1f},{top + h - done / total * h:.1f}")
    labels = (
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak:.1f}</text>'
        f'<text x="{left - 6}" y="{top + h}" text-anchor="end">0</text>'
        f'<text x="{left + w + 6}" y="{top + 4}">{total}</text>'
        f'<text x="{left}" y="{height - 8}">0 s</text>'
        f'<text x="{left + w}" y="{height - 8}" text-anchor="end">{span:.1f} s</text>'
        f'<text x="{left + w / 2}" y="{height - 8}" text-anchor="middle">time since the first shard started</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
        f'font-family="sans-serif" role="img" aria-label="throughput over time">'
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#f6f8fa" stroke="#ccc"/>{bars}'
        f'<polyline points="{" ".join(points)}" fill="none" stroke="#d1495b" stroke-width="2"/>{labels}</svg>'
        '<p class=muted><span style="color:#7aa6d8">&#9632;</span> rows/s (left axis) '
        '&middot; <span style="color:#d1495b">&#9632;</span> rows done (right axis)</p>'
    )


def _chart_section(markers: list[CommitMarker]) -> str:
    return f"<section><h2>Throughput over time</h2>{throughput_svg(markers)}</section>"


def _workers_section(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in reversed(runs[-5:]):
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run.get("finished", 0)))
        for w in run.get("workers") or []:
            fraction = float(w.get("busy_fraction") or 0.0)
            rows.append(
                f"<tr><td>{_e(finished)}</td><td><code>{_e(w.get('worker'))}</code></td>"
                f"<td>{float(w.get('busy_s') or 0):.1f} s</td><td>{float(w.get('wall_s') or 0):.1f} s</td>"
                f"<td><div class=bar><div style=\"width:{min(fraction, 1.0) * 100:.0f}%\"></div></div> "
                f"{fraction:.0%}</td></tr>"
            )
    if not rows:
        return "<section><h2>Workers</h2><p>No run has ended yet.</p></section>"
    return ("<section><h2>Workers</h2><p class=muted>Busy: share of each worker's life spent generating "
            "(latest runs first).</p><table><tr><th>run ended (UTC)</th><th>worker</th><th>busy</th><th>wall</th>"
            f"<th>busy fraction</th></tr>{''.join(rows)}</table></section>")


def _settings_section(job_record: dict[str, Any]) -> str:
    job = redact_env_vars(dict(job_record.get("job", {})), "…")
    items = {"fingerprint": job_record.get("fingerprint"), **job, "defaults (resolved)": job_record.get("defaults")}
    body = "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v)}"
        "</code></td></tr>"
        for k, v in items.items()
    )
    return f"<section><h2>Job settings</h2><table class=settings>{body}</table></section>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC",
  "WenQuanYi Micro Hei", "Microsoft YaHei", sans-serif; margin: 24px; color: #1f2328; }}
h1 {{ margin-bottom: 4px; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
.muted {{ color: #656d76; font-size: 13px; }}
.note {{ background: #fff8c5; border: 1px solid #d4a72c; padding: 8px 12px; border-radius: 6px; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.fig {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 110px; }}
.fig b {{ display: block; font-size: 18px; }} .fig span {{ color: #656d76; font-size: 12px; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }}
figure {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }}
figure img {{ width: 100%; height: auto; image-rendering: pixelated; display: block; }}
figcaption p {{ margin: 4px 0; overflow-wrap: anywhere; }} .prompt {{ font-size: 13px; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 4px; }} figure.edit {{ grid-column: span 2; }}
img.mask {{ width: 32px; height: 32px; vertical-align: middle; display: inline-block; }}
.missing {{ height: 120px; background: #eee; display: flex; align-items: center; justify-content: center; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }}
.bar {{ display: inline-block; width: 120px; height: 10px; background: #eee; vertical-align: middle; }}
.bar div {{ height: 100%; background: #2da44e; }}
.review {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(390px, 1fr)); gap: 12px; }}
.three {{ display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }}
</style></head>
<body>
{body}
</body></html>
"""
