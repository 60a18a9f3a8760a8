"""ControlNet conditions of manifest rows (SPEC §3): which rows have one, checks before any work,
and the condition's pixels, fetched or derived on the CPU ahead of the GPU.

A row's condition, first match wins:

    control_image (the row's)       a given condition image (URI: local, file:// or s3://)
    control (the row's)             canny | tile, derived from the row's source (edit manifests);
                                    none: no condition for this row
    control_image (the job's)       one condition image for every row
    control (the job's)             canny | tile for every edit row

`control_scale` (row, else job, else 0.75 as diffusers) scales the ControlNet's hints. Given
images go through the edit sources' decoding (EXIF orientation, modes, 16-bit, CMYK, the
decompression-bomb limit) and are resized (Lanczos, as the reference pipelines do) to the
output size; in an edit manifest that size follows the source's. `canny` runs OpenCV's Canny
(thresholds `canny_low` / `canny_high`) on the source at the output size, `tile` is the source
itself. A row with a mask runs as ControlNet inpaint. The metadata records `control_image`,
`control`, `control_scale` and `control_sha256`: the sha256 of the given image's bytes, or of a
derived condition's RGB pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from zimage_batch.generate.edit import prepare_source
from zimage_batch.generate.requests import ControlRequest, EditRequest
from zimage_batch.inputs import images
from zimage_batch.model.variants import VARIANTS, Variant

DERIVED = ("canny", "tile")  # conditions derived from an edit row's source
NONE = "none"  # a row that opts out of the job's condition
DEFAULT_SCALE = 0.75  # diffusers' controlnet_conditioning_scale
GIVEN = "image"  # ControlRequest.control of a given control image

# metadata columns of a job with a ControlNet (SPEC §5)
CONTROL_METADATA_COLUMNS = {
    "control_image": pa.string(),
    "control": pa.string(),
    "control_scale": pa.float64(),
    "control_sha256": pa.string(),
}


@dataclass(frozen=True)
class ControlJob:
    """A job's ControlNet settings, as a worker is given them (typed: they cross Ray)."""

    controlnet: str  # the source of the weights
    controlnet_id: str | None = None  # their identity, as the driver resolved it
    control_image: str | None = None  # the job's condition image
    control: str | None = None  # the job's derived condition (canny | tile | none)
    control_scale: float = DEFAULT_SCALE
    canny_low: float = 100.0
    canny_high: float = 200.0

    @classmethod
    def from_mapping(cls, job: Mapping[str, Any]) -> ControlJob | None:
        """From a job's settings (`JobSpec.to_dict()`); None when the job names no ControlNet."""
        if not job.get("controlnet"):
            return None
        names = ("controlnet_id", "control_image", "control", "control_scale", "canny_low", "canny_high")
        return cls(str(job["controlnet"]), **{name: job[name] for name in names if job.get(name) is not None})

    @property
    def canny(self) -> tuple[float, float]:
        return float(self.canny_low), float(self.canny_high)


@dataclass(frozen=True)
class ControlSettings:
    """What a row's condition is, before anything is fetched."""

    kind: str  # image | canny | tile
    uri: str | None  # the given image
    scale: float


def row_control(row: Mapping[str, Any], job: ControlJob) -> ControlSettings | None:
    """The row's condition (see the module docstring), or None when it has none."""
    scale = row.get("control_scale")
    scale = float(job.control_scale if scale is None else scale)
    uri, kind = row.get("control_image"), row.get("control")
    if uri:
        return ControlSettings(GIVEN, uri, scale)
    if kind is not None:
        return None if kind == NONE else ControlSettings(kind, None, scale)
    if job.control_image:
        return ControlSettings(GIVEN, job.control_image, scale)
    if job.control in DERIVED:
        return ControlSettings(job.control, None, scale)
    return None


def control_request(common: Mapping[str, Any], width: int | None, height: int | None, settings: ControlSettings,
                    inpaint: bool) -> ControlRequest:
    """The request template of a row with a condition; its pixels come with `load_row`."""
    return ControlRequest(width=width, height=height, control=settings.kind, control_uri=settings.uri,
                          control_scale=settings.scale, inpaint=inpaint, **common)


# ---------------------------------------------------------------------- loading (ahead of the GPU)
def load_row(row: Mapping[str, Any], template: Any, base: str, variant: Variant, max_pixels: int,
             canny: tuple[float, float]) -> images.EditRow:
    """A row's pixels, ready for the engine: its condition (and source, mask), or its edit source,
    or nothing to load. Problems confined to the row come back as the row's `error`."""
    source = images.resolve_uri(row["source"], base) if row.get("source") else None
    mask = images.resolve_uri(row["mask"], base) if row.get("mask") else None
    if isinstance(template, ControlRequest):
        if template.control_uri:
            template = replace(template, control_uri=images.resolve_uri(template.control_uri, base))
        return load_control_row(template, source, mask, variant, max_pixels, canny)
    if isinstance(template, EditRequest):
        return images.load_edit_row(template, source, mask, variant, max_pixels)
    return images.EditRow(template, {})


def load_control_row(template: ControlRequest, source: str | None, mask: str | None, variant: Variant,
                     max_pixels: int = images.DEFAULT_MAX_PIXELS, canny: tuple[float, float] = (100, 200)) -> images.EditRow:
    """Fetch and decode the row's source (edit manifests), size the output, fetch or derive the
    condition at that size, and for inpaint prepare source and mask."""
    lineage: dict[str, Any] = {
        "control_image": template.control_uri,
        "control": None if template.control == GIVEN else template.control,
        "control_scale": template.control_scale,
        "control_sha256": None,
    }
    if source is not None:
        lineage |= {"source": source, "source_sha256": None, "source_width": None, "source_height": None,
                    "mode": template.mode, "strength": None, "mask": mask if template.inpaint else None}
    try:
        image = None
        width, height = template.width, template.height
        if source is not None:
            data = images.fetch(source)
            lineage["source_sha256"] = hashlib.sha256(data).hexdigest()
            image = images.decode(data, source, max_pixels)
            lineage["source_width"], lineage["source_height"] = image.size
            width, height = images.output_size(image.width, image.height, variant, width, height)
        if template.control == GIVEN:
            data = images.fetch(template.control_uri, "control image")
            lineage["control_sha256"] = hashlib.sha256(data).hexdigest()
            condition = fit(images.decode(data, template.control_uri, max_pixels, "control image"), width, height)
        else:
            condition = derive(template.control, image, width, height, canny)
            lineage["control_sha256"] = hashlib.sha256(np.asarray(condition).tobytes()).hexdigest()
        source_image = mask_image = None
        if template.inpaint:
            mask_image = images.decode(images.fetch(mask, "mask"), mask, max_pixels, "mask").convert("L")
            source_image, mask_image = prepare_source(image, mask_image, "inpaint", width, height)
    except images.SourceError as exc:
        return images.EditRow(None, lineage, str(exc))
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:  # malformed EXIF/ICC, sizes
        return images.EditRow(None, lineage, f"control condition could not be prepared ({type(exc).__name__}: {exc})"[:300])
    request = replace(template, width=width, height=height, control_image=condition, image=source_image, mask=mask_image)
    return images.EditRow(request, lineage)


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


# ---------------------------------------------------------------------- checks (before any work)
def check_control_batch(batch: pa.RecordBatch, limits: Any,
                        fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Refuse, naming column and rows: control columns without a ControlNet, unknown `control`
    names (manifest.py refuses `control` in a prompt manifest), a row naming both a control image and a derived one,
    negative scales, control images that are not local or s3:// URIs, img2img/edit modes on
    rows with a condition, and conditions on variants without ControlNet support."""
    names, n = batch.schema.names, batch.num_rows

    def strings(name: str) -> pa.Array:
        return pc.cast(batch.column(name), pa.string()) if name in names else pa.nulls(n, pa.string())

    image, derived = strings("control_image"), strings("control")
    has_image = pc.fill_null(pc.greater(pc.utf8_length(image), 0), False)
    derives = pc.fill_null(pc.is_in(derived, pa.array(DERIVED)), False)
    opted_out = pc.fill_null(pc.equal(derived, NONE), False)
    if not limits.controlnet:
        need = "needs a ControlNet: add 'controlnet: SOURCE' to the job (or --set controlnet=SOURCE)"
        fail_if("control_image", has_image, need)
        fail_if("control", pc.and_(pc.is_valid(derived), pc.invert(opted_out)), need)
        if "control_scale" in names:
            fail_if("control_scale", pc.is_valid(batch.column("control_scale")), need)
        return
    fail_if("control", pc.and_(pc.is_valid(derived), pc.invert(pc.or_(derives, opted_out))),
            f"must be one of {'|'.join((*DERIVED, NONE))}")
    fail_if("control_image", pc.and_(has_image, derives),
            "is given on rows whose 'control' also derives a condition; keep one of them")
    fail_if("control_image", pc.and_(has_image, pc.and_(pc.match_substring_regex(image, r"^[A-Za-z][A-Za-z0-9+.-]*://"),
                                                        pc.invert(pc.match_substring_regex(image, r"^(s3|file)://")))),
            "must be a local path, a file:// URI or an s3:// URI")
    if "control_scale" in names:
        fail_if("control_scale", pc.less(batch.column("control_scale"), 0), "must be >= 0")
    job_default = bool(limits.control_image) or limits.control in DERIVED
    controlled = pc.or_(pc.or_(has_image, derives), pc.and_(pc.is_null(derived), pa.array([job_default] * n)))
    if "mode" in names:
        fail_if("mode", pc.and_(controlled, pc.fill_null(pc.is_in(strings("mode"), pa.array(["img2img", "edit"])), False)),
                "asks for img2img or edit on rows with a control condition (they run as ControlNet text-to-image, "
                "or ControlNet inpaint with a mask); leave it empty")
    variants = pc.fill_null(strings("variant"), limits.default_variant)
    unable = [v for v in VARIANTS if "controlnet" not in VARIANTS[v].tasks]
    column = "variant" if "variant" in names else "control_image" if "control_image" in names else "control"
    fail_if(column, pc.and_(controlled, pc.is_in(variants, pa.array(unable or [""]))),
            f"has rows with a control condition on a variant without ControlNet support ({'|'.join(unable)})")
