"""The pixels of ControlNet conditions, fetched or derived on the CPU ahead of the GPU (the rows
that have one, and the checks, are in `control.py`).

Given condition images go through the edit sources' decoding (EXIF orientation, modes, 16-bit,
CMYK, the decompression-bomb limit) and are resized (Lanczos, as the reference pipelines'
image processor does) to the output size; in an edit manifest that size follows the source's.
`canny` runs OpenCV's Canny (thresholds `canny_low` / `canny_high`) on the source at the output
size, `tile` is the source itself. For ControlNet inpaint the source and mask are prepared as
for inpaint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from zimage_batch.generate.edit import prepare_source
from zimage_batch.generate.requests import ControlRequest, EditRequest
from zimage_batch.inputs import images
from zimage_batch.inputs.control import DERIVED, GIVEN
from zimage_batch.inputs.mask_spec import WORDS, MaskJob, RowMask, row_mask
from zimage_batch.inputs.masks import MaskError
from zimage_batch.model.variants import Variant
from zimage_batch.settings import request_settings


def load_row(row: Mapping[str, Any], template: Any, base: str, variant: Variant, max_pixels: int,
             canny: tuple[float, float], masks: MaskJob | None = None) -> images.EditRow:
    """A row's pixels, ready for the engine: its condition (and source, mask), or its edit source,
    or nothing to load. Problems confined to the row come back as the row's `error`. With the
    job's `masks` (a job that keeps masks), a row's mask may be derived, and is kept."""
    source = images.resolve_uri(row["source"], base) if row.get("source") else None
    spec = row_mask(row, masks) if masks is not None and source else None
    mask = images.resolve_uri(row["mask"], base) if row.get("mask") and not (spec and spec.derived) else None
    keep = masks is not None and source is not None
    if isinstance(template, ControlRequest):
        if template.control_uri:
            template = replace(template, control_uri=images.resolve_uri(template.control_uri, base))
        return load_control_row(template, source, mask, variant, max_pixels, canny, spec, keep)
    if isinstance(template, EditRequest):
        return images.load_edit_row(template, source, mask, variant, max_pixels, spec, keep)
    return images.EditRow(template, {})


def load_control_row(template: ControlRequest, source: str | None, mask: str | None, variant: Variant,
                     max_pixels: int = images.DEFAULT_MAX_PIXELS, canny: tuple[float, float] = (100, 200),
                     spec: RowMask | None = None, keep: bool = False) -> images.EditRow:
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
        lineage |= images.mask_lineage(spec, mask) if keep else {}
    try:
        image = mask_image = None
        width, height = template.width, template.height
        if source is not None:
            data = images.fetch(source)
            lineage["source_sha256"] = hashlib.sha256(data).hexdigest()
            image, mask_image = images.source_and_mask(data, source, mask if template.inpaint else None,
                                                       spec, max_pixels, lineage)
            width, height = images.output_size(image.width, image.height, variant, width, height)
        if template.control == GIVEN:
            data = images.fetch(template.control_uri, "control image")
            lineage["control_sha256"] = hashlib.sha256(data).hexdigest()
            condition = fit(images.decode(data, template.control_uri, max_pixels, "control image"), width, height)
        else:
            condition = derive(template.control, image, width, height, canny)
            lineage["control_sha256"] = hashlib.sha256(np.asarray(condition).tobytes()).hexdigest()
        source_image = None
        if template.inpaint:  # a words row is sized now, its mask made later
            mode = "img2img" if spec is not None and spec.kind == WORDS else "inpaint"
            source_image, mask_image = prepare_source(image, mask_image, mode, width, height)
    except (images.SourceError, MaskError) as exc:
        return images.EditRow(None, lineage, str(exc))
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:  # malformed EXIF/ICC, sizes
        return images.EditRow(None, lineage, f"control condition could not be prepared ({type(exc).__name__}: {exc})"[:300])
    request = replace(template, width=width, height=height, control_image=condition, image=source_image,
                      mask=mask_image if template.inpaint else None)
    loaded = images.EditRow(request, lineage)
    return images.pending_words(images.keep_mask(loaded, spec), image, spec) if keep else loaded


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at the output size, resized as the reference pipelines' image processor does."""
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def derive(kind: str, source: Image.Image | None, width: int, height: int, canny: tuple[float, float]) -> Image.Image:
    """The condition `kind` derived from `source` at the output size (RGB)."""
    if source is None:
        raise ValueError(f"control {kind!r} derives from the row's source, and the row has none")
    sized = fit(source, width, height)
    if kind == "tile":
        return sized
    if kind == "canny":
        import cv2

        edges = cv2.Canny(np.asarray(sized), float(canny[0]), float(canny[1]))
        return Image.fromarray(edges, "L").convert("RGB")
    raise ValueError(f"unknown control {kind!r} (known: {', '.join(DERIVED)})")
