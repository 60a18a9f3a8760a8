"""A row's request made ready for the engine: its pixels loaded on the CPU ahead of the GPU.

An edit row's source (and mask: given, or derived from the source) is fetched, decoded and
sized (`inputs.images`, `inputs.masks`), then prepared as the reference pipeline does
(`generate.edit.prepare_source`); a ControlNet row's condition is fetched or derived at the
output size (`inputs.conditions`). Problems confined to the row come back as the row's `error`,
which the worker writes as an `error` row. In a job that keeps masks, the mask as used comes back
as a PNG with its sha256; a words row's mask is completed after the window's CLIPSeg pass.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from zimage_batch.generate.edit import prepare_source
from zimage_batch.generate.requests import ControlRequest, EditRequest
from zimage_batch.inputs import images, masks
from zimage_batch.inputs.conditions import condition_image
from zimage_batch.inputs.control import GIVEN, ControlSettings
from zimage_batch.inputs.mask_spec import WORDS, MaskJob, RowMask, mask_metadata, row_mask
from zimage_batch.model.variants import Variant
from zimage_batch.settings import request_settings
from zimage_batch.text import first_line


@dataclass
class EditRow:
    """A row's edit inputs after loading: the ready request, or the reason it cannot run."""

    request: Any  # the request ready for the engine (an EditRequest, or a ControlRequest), or None
    lineage: dict[str, Any]  # source, source_sha256, source_width, source_height, mode, strength, mask
    error: str | None = None
    mask_png: bytes | None = None  # the mask as the model used it, stored beside the output
    segment: tuple[Image.Image, RowMask] | None = None  # a words row: its source for CLIPSeg, mask to come


def control_request(common: Mapping[str, Any], width: int | None, height: int | None, settings: ControlSettings,
                    inpaint: bool) -> ControlRequest:
    """The request template of a row with a condition; its pixels come with `load_row`."""
    return ControlRequest(width=width, height=height, inpaint=inpaint, **settings.request_fields(), **common)


def load_row(row: Mapping[str, Any], template: Any, base: str, variant: Variant, max_pixels: int,
             canny: tuple[float, float], mask_job: MaskJob | None = None) -> EditRow:
    """A row's pixels, ready for the engine: its condition (and source, mask), or its edit source,
    or nothing to load. Problems confined to the row come back as the row's `error`. With the
    job's `mask_job` (a job that keeps masks), a row's mask may be derived, and is kept."""
    source = images.resolve_uri(row["source"], base) if row.get("source") else None
    spec = row_mask(row, mask_job) if mask_job is not None and source else None
    mask = images.resolve_uri(row["mask"], base) if row.get("mask") and not (spec and spec.derived) else None
    keep = mask_job is not None and source is not None
    if isinstance(template, ControlRequest):
        if template.control_uri:
            template = replace(template, control_uri=images.resolve_uri(template.control_uri, base))
        return load_control_row(template, source, mask, variant, max_pixels, canny, spec, keep)
    if isinstance(template, EditRequest):
        return load_edit_row(template, source, mask, variant, max_pixels, spec, keep)
    return EditRow(template, {})


def load_edit_row(template: EditRequest, source: str, mask: str | None, variant: Variant,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS, spec: RowMask | None = None,
                  keep: bool = False) -> EditRow:
    """Fetch, check and decode a row's source (and its mask, for inpaint: given, or derived
    from `spec`), size the output and prepare the pixels for the engine; with `keep`, the mask
    as used comes back too. Problems confined to the row come back as `error`."""
    mask = mask if template.mode == "inpaint" else None
    spec = spec if template.mode == "inpaint" else None
    lineage: dict[str, Any] = {
        "source": source,
        "source_sha256": None,
        "source_width": None,
        "source_height": None,
        "mode": template.mode,
        "strength": None if template.mode == "edit" else template.strength,
        "mask": mask,
    } | (mask_metadata(spec, mask) if keep else {})
    try:
        data = images.fetch(source)
        lineage["source_sha256"] = hashlib.sha256(data).hexdigest()
        original, mask_image = images.source_and_mask(data, source, mask, spec, max_pixels, lineage)
        width, height = images.output_size(original.width, original.height, variant, template.width, template.height)
        words = spec is not None and spec.kind == WORDS  # sized now, its mask made later
        image, mask_image = prepare_source(original, mask_image, "img2img" if words else template.mode, width, height)
    except (images.SourceError, masks.MaskError) as exc:
        return EditRow(None, lineage, str(exc))
    except ValueError as exc:  # the reference pipeline's own checks (size, aspect ratio)
        return EditRow(None, lineage, f"source unusable for {template.mode}: {source} ({first_line(exc, 200)})")
    except (struct.error, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:  # malformed EXIF/ICC
        return EditRow(None, lineage, f"source could not be decoded: {source} ({type(exc).__name__})")
    loaded = EditRow(replace(template, width=width, height=height, image=image, mask=mask_image), lineage)
    return pending_words(keep_mask(loaded, spec), original, spec) if keep else loaded


def load_control_row(template: ControlRequest, source: str | None, mask: str | None, variant: Variant,
                     max_pixels: int = images.DEFAULT_MAX_PIXELS, canny: tuple[float, float] = (100, 200),
                     spec: RowMask | None = None, keep: bool = False) -> EditRow:
    """Fetch and decode the row's source (edit manifests), size the output, fetch or derive the
    condition at that size, and for inpaint prepare source and mask (given, or derived from
    `spec`: an outpainted row's condition comes from its canvas). With `keep`, the mask as used
    comes back too."""
    spec = spec if template.inpaint else None
    lineage: dict[str, Any] = {
        "control_image": template.control_uri,
        "control": None if template.control == GIVEN else template.control,
        **{s.name: getattr(template, s.name) for s in request_settings("control") if s.group == "control"},
        "control_sha256": None,
    }
    if source is not None:
        lineage |= {"source": source, "source_sha256": None, "source_width": None, "source_height": None,
                    "mode": template.mode, "strength": None, "mask": mask if template.inpaint else None}
        lineage |= mask_metadata(spec, mask) if keep else {}
    try:
        image = mask_image = None
        width, height = template.width, template.height
        if source is not None:
            data = images.fetch(source)
            lineage["source_sha256"] = hashlib.sha256(data).hexdigest()
            image, mask_image = images.source_and_mask(data, source, mask if template.inpaint else None,
                                                       spec, max_pixels, lineage)
            width, height = images.output_size(image.width, image.height, variant, width, height)
        condition = condition_image(template.control, template.control_uri, image, width, height, max_pixels,
                                    canny, lineage)
        source_image = None
        if template.inpaint:  # a words row is sized now, its mask made later
            mode = "img2img" if spec is not None and spec.kind == WORDS else "inpaint"
            source_image, mask_image = prepare_source(image, mask_image, mode, width, height)
    except (images.SourceError, masks.MaskError) as exc:
        return EditRow(None, lineage, str(exc))
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:  # malformed EXIF/ICC, sizes
        return EditRow(None, lineage, f"control condition could not be prepared ({type(exc).__name__}: {exc})"[:300])
    request = replace(template, width=width, height=height, control_image=condition, image=source_image,
                      mask=mask_image if template.inpaint else None)
    loaded = EditRow(request, lineage)
    return pending_words(keep_mask(loaded, spec), image, spec) if keep else loaded


def pending_words(row: EditRow, image: Image.Image, spec: RowMask | None) -> EditRow:
    """A words row, loaded but for its mask: it waits for CLIPSeg (`complete_words`)."""
    if row.error or spec is None or spec.kind != WORDS:
        return row
    return replace(row, segment=(image, spec))


def complete_words(row: EditRow, probability: np.ndarray) -> EditRow:
    """A words row's mask from CLIPSeg's probabilities over its source, at the output size,
    checked and kept."""
    _, spec = row.segment
    mask, request = masks.words_mask(probability, spec), row.request
    if mask.size != (request.width, request.height):
        mask = mask.resize((request.width, request.height), Image.Resampling.LANCZOS)
    return keep_mask(replace(row, request=replace(request, mask=mask), segment=None), spec)


def keep_mask(row: EditRow, spec: RowMask | None) -> EditRow:
    """Check a derived mask at the output size and keep the mask as used (PNG, its sha256)."""
    request = row.request
    if row.error or request is None or request.mask is None:
        return row
    if spec is not None and spec.derived:
        try:
            masks.check_not_empty(request.mask, spec, row.lineage["source"])
        except masks.MaskError as exc:
            return EditRow(None, row.lineage, str(exc))
    data = masks.mask_png(request.mask)
    row.lineage["mask_sha256"] = hashlib.sha256(data).hexdigest()
    return replace(row, mask_png=data)
