"""Derived inpaint masks of edit rows (catalogue editing): which rows have one, and the checks
that refuse bad settings before any work. The pixels are made in `masks.py`. (This module stays
light: the manifest checks import it, before Pillow or torch.)

A row's mask, from its own columns, else the job's settings of the same names:

    mask: alpha          the source's transparent area is repainted (255 - alpha)
    mask: URI            a given mask image (white repaints), as before
    outpaint: WxH        the source placed on a WxH canvas (source pixels) at `anchor`; the new
    aspect: W:H          area is repainted. `aspect` picks the smallest canvas of that aspect
                         ratio that holds the source.
    anchor               center (default) | top | bottom | left | right: where the source sits
    mask_prompt          words ("the background"): the mask is where CLIPSeg (the job's
                         `segmenter`) finds them, its probability at least `mask_threshold`
                         (default 0.4); `mask_invert: true` repaints everything else
    mask_grow            pixels (source pixels): the mask dilated (negative: eroded)
    mask_blur            pixels: a Gaussian blur of the mask's edge

A row has one of: a mask, mask words, an outpaint canvas. Rows with any of them run as inpaint.

The settings themselves (type, default, manifest column, metadata column, fingerprint) are
declared in zimage_batch/settings.py (group `mask`); this module reads them by those names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.settings import Here, job_settings, with_settings
from zimage_batch.settings import fingerprint_fields as declared_fingerprint_fields

ALPHA = "alpha"
WORDS = "words"  # RowMask.kind of a mask from mask_prompt
OUTPAINT = "outpaint"  # RowMask.kind of an outpainted row (outpaint or aspect)
DEFAULT_THRESHOLD = 0.4
DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
ANCHORS = ("center", "top", "bottom", "left", "right")
MAX_GROW = 1024  # pixels, either way
MAX_BLUR = 256
MAX_CANVAS_SIDE = 16384
MAX_ASPECT = 16.0  # the longest side at most this many times the shortest
_OUTPAINT = re.compile(r"^\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*$")
_ASPECT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$")


def mask_settings() -> tuple[str, ...]:
    """The declared mask settings (zimage_batch/settings.py), in JobSpec's order."""
    return tuple(s.name for s in job_settings("mask"))


def derived_mask_columns() -> tuple[str, ...]:
    """The manifest columns that derive a mask: every mask setting's but `mask` (a given file's URI, too)."""
    return tuple(s.name for s in job_settings("mask") if s.column is not None and s.name != "mask")


def fingerprint_fields() -> tuple[str, ...]:
    """The fields a job's fingerprint covers when any is set: the mask settings it covers
    (zimage_batch/settings.py), then the segmenter's identity (JobSpec.output_fields)."""
    return (*declared_fingerprint_fields("mask"), "segmenter_id")


class MaskSettingError(ValueError):
    """A mask setting that cannot be used; the message names it."""


@dataclass(frozen=True)
@with_settings
class MaskJob:
    """A job's mask settings, the defaults of the rows' columns (typed: they cross Ray): the
    declared ones (mask, mask_grow, ...: zimage_batch/settings.py), then the segmenter."""

    _mask_settings: ClassVar[Here] = Here(lambda: job_settings("mask"))
    segmenter: str | None = None  # None: CIDAS/clipseg-rd64-refined
    segmenter_id: str | None = None  # its identity, as the driver resolved it

    @classmethod
    def from_mapping(cls, job: Mapping[str, Any]) -> MaskJob:
        names = (*mask_settings(), "segmenter", "segmenter_id")
        return cls(**{name: job[name] for name in names if job.get(name) is not None})

    @property
    def edits_sources(self) -> bool:
        """Whether the job's settings edit source images (so need an edit manifest)."""
        return bool(self.derives or self.mask_grow or self.mask_blur or self.anchor)

    def refusal_on_prompt_manifest(self, manifest: str) -> str | None:
        """Why this job cannot run on a prompt manifest (no sources to edit), or None."""
        if not self.edits_sources:
            return None
        return (f"mask, mask_grow, mask_blur, outpaint, aspect and anchor edit source images, and {manifest} is a "
                "prompt manifest (no source column); leave them unset")

    @property
    def derives(self) -> bool:
        """Whether the job's own settings derive a mask for every row."""
        return bool(self.mask or self.outpaint or self.aspect or self.mask_prompt)

    @property
    def segmenter_source(self) -> str:
        return self.segmenter or DEFAULT_SEGMENTER

    def check(self) -> None:
        """Refuse bad job settings (one line)."""
        if self.mask is not None and self.mask != ALPHA:
            raise MaskSettingError(f"mask: the job setting may only be {ALPHA!r} (a mask file is a row's 'mask' "
                                   f"column), got {self.mask!r}")
        if self.outpaint and self.aspect:
            raise MaskSettingError("outpaint and aspect both set the canvas; set one of them")
        if sum(map(bool, (self.mask, self.outpaint or self.aspect, self.mask_prompt))) > 1:
            raise MaskSettingError("mask, mask_prompt and outpaint/aspect each set the mask; set one of them")
        if self.mask_threshold is not None and not 0 <= self.mask_threshold <= 1:
            raise MaskSettingError(f"mask_threshold must be in 0..1, got {self.mask_threshold}")
        if self.outpaint is not None:
            parse_outpaint(self.outpaint)
        if self.aspect is not None:
            parse_aspect(self.aspect)
        if self.anchor is not None and self.anchor not in ANCHORS:
            raise MaskSettingError(f"anchor must be one of {'|'.join(ANCHORS)}, got {self.anchor!r}")
        if not -MAX_GROW <= self.mask_grow <= MAX_GROW:
            raise MaskSettingError(f"mask_grow must be in -{MAX_GROW}..{MAX_GROW} pixels, got {self.mask_grow}")
        if not 0 <= self.mask_blur <= MAX_BLUR:
            raise MaskSettingError(f"mask_blur must be in 0..{MAX_BLUR} pixels, got {self.mask_blur}")


def parse_outpaint(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    match = _OUTPAINT.match(str(text))
    if not match or not all(0 < int(v) <= MAX_CANVAS_SIDE for v in match.groups()):
        raise MaskSettingError(f"outpaint must be WxH with sides in 1..{MAX_CANVAS_SIDE}, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_aspect(text: str) -> float:
    """'W:H' -> W / H."""
    match = _ASPECT.match(str(text))
    ratio = float(match.group(1)) / float(match.group(2)) if match and float(match.group(2)) > 0 else 0.0
    if not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        raise MaskSettingError(f"aspect must be W:H with a ratio between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1, "
                               f"got {text!r}")
    return ratio


@dataclass(frozen=True)
class RowMask:
    """How one row's mask is made."""

    kind: str  # file | alpha | outpaint | words
    grow: int = 0
    blur: int = 0
    canvas: tuple[int, int] | None = None  # outpaint: WxH
    aspect: str | None = None  # outpaint: W:H
    anchor: str = "center"
    prompt: str | None = None  # words
    threshold: float = DEFAULT_THRESHOLD
    invert: bool = False

    @property
    def derived(self) -> bool:
        return self.kind != "file"


def row_mask(row: Mapping[str, Any], job: MaskJob) -> RowMask | None:
    """The row's mask settings (see the module docstring), or None when the row has no mask."""
    def value(name: str) -> Any:
        given = row.get(name)
        return getattr(job, name) if given is None else given

    grow, blur, anchor = int(value("mask_grow")), int(value("mask_blur")), value("anchor") or "center"
    mask = row.get("mask") or job.mask
    outpaint, aspect = row.get("outpaint"), row.get("aspect")
    if not outpaint and not aspect:
        outpaint, aspect = job.outpaint, job.aspect
    words = row.get("mask_prompt") or job.mask_prompt
    if words:
        threshold = value("mask_threshold")
        return RowMask(WORDS, grow, blur, prompt=str(words), invert=bool(value("mask_invert")),
                       threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold))
    if outpaint:
        return RowMask(OUTPAINT, grow, blur, canvas=parse_outpaint(outpaint), anchor=anchor)
    if aspect:
        return RowMask(OUTPAINT, grow, blur, aspect=str(aspect), anchor=anchor)
    if mask:
        return RowMask(ALPHA if mask == ALPHA else "file", grow, blur)
    return None


def mask_metadata(spec: RowMask | None, mask: str | None) -> dict[str, Any]:
    """The metadata of a row's mask settings (jobs that keep masks: metadata_schema.mask_columns),
    before the mask is made; `mask` is the row's given mask."""
    if spec is None:
        return {"mask_sha256": None, "mask_grow": None, "mask_blur": None, "outpaint": None, "anchor": None}
    canvas = spec.canvas and f"{spec.canvas[0]}x{spec.canvas[1]}"
    outpainted, words = spec.kind == OUTPAINT, spec.kind == WORDS
    return {"mask": spec.kind if spec.derived else mask, "mask_sha256": None, "mask_grow": spec.grow,
            "mask_blur": spec.blur, "outpaint": (canvas or spec.aspect) if outpainted else None,
            "anchor": spec.anchor if outpainted else None, "mask_prompt": spec.prompt,
            "mask_threshold": spec.threshold if words else None, "mask_invert": spec.invert if words else None}


def uses_words(columns: Any, job: MaskJob) -> bool:
    """Whether a job on a manifest with these columns makes masks from words (needs a segmenter)."""
    return bool(job.mask_prompt) or "mask_prompt" in set(columns)


def masks_used(columns: Any, job: MaskJob, alpha_rows: bool = False) -> bool:
    """Whether a job on an edit manifest with these columns keeps masks (metadata columns and
    the stored `<key>.mask.png`): when it derives them, from job settings, a derived-mask
    column, or rows whose `mask` is `alpha` (`alpha_rows`). A job whose masks are all given
    files keeps the layout it always had: the mask is the row's own file."""
    return job.derives or alpha_rows or bool(set(derived_mask_columns()) & set(columns))


def has_alpha_rows(mask_columns: Any) -> bool:
    """Whether any of these `mask` columns (Arrow arrays, one per manifest file) says `alpha`."""
    return any(pc.any(pc.fill_null(pc.equal(pc.cast(column, pa.string()), ALPHA), False)).as_py()
               for column in mask_columns)


# ---------------------------------------------------------------------- checks (before any work)
def derived_rows(batch: pa.RecordBatch, job: MaskJob) -> pa.Array:
    """True where a row's mask is derived on the worker (alpha, outpaint or aspect)."""
    n = batch.num_rows

    def given(name: str) -> pa.Array:
        if name not in batch.schema.names:
            return pa.array([False] * n)
        return pc.fill_null(pc.greater(pc.utf8_length(pc.cast(batch.column(name), pa.string())), 0), False)

    alpha = pa.array([False] * n)
    if "mask" in batch.schema.names:
        alpha = pc.fill_null(pc.equal(pc.cast(batch.column("mask"), pa.string()), ALPHA), False)
    own_mask = given("mask")
    job_alpha = pc.and_(pc.invert(own_mask), pa.array([job.mask == ALPHA] * n))
    return pc.or_(pc.or_(pc.or_(alpha, job_alpha), canvas_rows(batch, job)), word_rows(batch, job))


def word_rows(batch: pa.RecordBatch, job: MaskJob) -> pa.Array:
    """True where a row's mask comes from words (its own mask_prompt, else the job's)."""
    n = batch.num_rows
    if "mask_prompt" not in batch.schema.names:
        return pa.array([bool(job.mask_prompt)] * n)
    own = pc.fill_null(pc.greater(pc.utf8_length(pc.cast(batch.column("mask_prompt"), pa.string())), 0), False)
    return pc.or_(own, pa.array([bool(job.mask_prompt)] * n))


def canvas_rows(batch: pa.RecordBatch, job: MaskJob) -> pa.Array:
    """True where a row is outpainted (its own outpaint/aspect, else the job's)."""
    n = batch.num_rows
    own = pa.array([False] * n)
    for name in ("outpaint", "aspect"):
        if name in batch.schema.names:
            values = pc.cast(batch.column(name), pa.string())
            own = pc.or_(own, pc.fill_null(pc.greater(pc.utf8_length(values), 0), False))
    return pc.or_(own, pa.array([bool(job.outpaint or job.aspect)] * n))


def check_mask_batch(batch: pa.RecordBatch, job: MaskJob, fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Refuse, naming column and rows: a mask and an outpaint canvas on one row, outpaint and
    aspect on one row, malformed outpaint sizes or aspect ratios, unknown anchors, grow and blur
    out of range, and img2img/edit modes on rows whose mask is derived."""
    names, n = batch.schema.names, batch.num_rows

    def strings(name: str) -> pa.Array:
        return pc.cast(batch.column(name), pa.string()) if name in names else pa.nulls(n, pa.string())

    def is_set(name: str) -> pa.Array:
        return pc.fill_null(pc.greater(pc.utf8_length(strings(name)), 0), False)

    outpaint, aspect = strings("outpaint"), strings("aspect")
    fail_if("outpaint", pc.and_(is_set("outpaint"), is_set("aspect")), "and 'aspect' are both set; keep one of them")
    if "outpaint" in names:
        fail_if("outpaint", pc.and_(is_set("outpaint"), _bad_values(outpaint, parse_outpaint)),
                f"must be WxH (e.g. 1024x1280) with sides in 1..{MAX_CANVAS_SIDE}")
    if "aspect" in names:
        fail_if("aspect", pc.and_(is_set("aspect"), _bad_values(aspect, parse_aspect)),
                f"must be W:H (e.g. 4:5) with a ratio between 1:{MAX_ASPECT:g} and {MAX_ASPECT:g}:1")
    if "anchor" in names:
        anchor = strings("anchor")
        fail_if("anchor", pc.and_(pc.is_valid(anchor), pc.invert(pc.is_in(anchor, pa.array(ANCHORS)))),
                f"must be one of {'|'.join(ANCHORS)}")
    if "mask_grow" in names:
        grow = batch.column("mask_grow")
        fail_if("mask_grow", pc.or_(pc.less(grow, -MAX_GROW), pc.greater(grow, MAX_GROW)),
                f"must be in -{MAX_GROW}..{MAX_GROW} pixels")
    if "mask_blur" in names:
        blur = batch.column("mask_blur")
        fail_if("mask_blur", pc.or_(pc.less(blur, 0), pc.greater(blur, MAX_BLUR)), f"must be in 0..{MAX_BLUR} pixels")
    has_mask = pc.or_(is_set("mask"), pa.array([bool(job.mask)] * n))
    fail_if("mask", pc.and_(has_mask, canvas_rows(batch, job)),
            "is set on rows that are also outpainted (outpaint/aspect make their own mask); keep one of them")
    words = word_rows(batch, job)
    fail_if("mask_prompt", pc.and_(words, has_mask), "is set on rows that also have a mask; keep one of them")
    fail_if("mask_prompt", pc.and_(words, canvas_rows(batch, job)),
            "is set on rows that are also outpainted (outpaint/aspect make their own mask); keep one of them")
    if "mask_threshold" in names:
        threshold = batch.column("mask_threshold")
        fail_if("mask_threshold", pc.or_(pc.less(threshold, 0), pc.greater(threshold, 1)), "must be in 0..1")
    if "mode" in names:
        fail_if("mode", pc.and_(derived_rows(batch, job), pc.fill_null(pc.is_in(strings("mode"),
                                                                                pa.array(["img2img", "edit"])), False)),
                "asks for img2img or edit on rows whose mask is derived (alpha, words, outpaint, aspect: they run "
                "as inpaint); leave it empty")


def _bad_values(values: pa.Array, parse: Callable[[str], Any]) -> pa.Array:
    """True where a set value does not parse (few distinct values: parsed once each)."""
    bad = []
    for text in pc.unique(values).to_pylist():
        if text:
            try:
                parse(text)
            except MaskSettingError:
                bad.append(text)
    return pc.fill_null(pc.is_in(values, pa.array(bad, pa.string())), False)
