"""ControlNet conditions of manifest rows: which rows have one, and the checks that
refuse bad ones before any work. Their pixels are fetched or derived in `conditions.py`, and
`run/loading.py` makes their requests. (This module stays light: the manifest checks import it,
and `run` refuses a bad manifest at once, before torch is imported.)

A row's condition, first match wins:

    control_image (the row's)       a given condition image (URI: local, file:// or s3://)
    control (the row's)             canny | tile, derived from the row's source (edit manifests);
                                    none: no condition for this row
    control_image (the job's)       one condition image for every row
    control (the job's)             canny | tile for every edit row

`control_scale` (row, else job, else 0.75 as diffusers) scales the ControlNet's hints. An edit
row with a mask runs as ControlNet inpaint. The metadata records `control_image`, `control`,
`control_scale` and `control_sha256` (the sha256 of the given image's bytes, or of a derived
condition's RGB pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.inputs.uris import NOT_READABLE, foreign_uris
from zimage_batch.model.variants import VARIANTS
from zimage_batch.settings import Here, fingerprint_fields, job_settings, with_settings

DERIVED = ("canny", "tile")  # conditions derived from an edit row's source
NONE = "none"  # a row that opts out of the job's condition
GIVEN = "image"  # ControlRequest.control of a given control image


def control_fields() -> tuple[str, ...]:
    """The job settings a ControlNet job's pixels depend on: the ControlNet's identity, then the
    rows' condition defaults the fingerprint covers (declared in zimage_batch/settings.py)."""
    return ("controlnet_id", *fingerprint_fields("control"))


#: The fields of a job with a ControlNet that its fingerprint covers (JobSpec.CONTROL_FIELDS).
CONTROL_FIELDS = control_fields()


@dataclass(frozen=True)
@with_settings
class ControlJob:
    """A job's ControlNet settings, as a worker is given them (typed: they cross Ray): the
    weights, their identity, and the declared condition defaults (control_image, control, ...)."""

    controlnet: str  # the source of the weights
    controlnet_id: str | None = None  # their identity, as the driver resolved it
    _control_settings: ClassVar[Here] = Here(lambda: job_settings("control"))

    @classmethod
    def from_mapping(cls, job: Mapping[str, Any]) -> ControlJob | None:
        """From a job's settings (`JobSpec.to_dict()`); None when the job names no ControlNet."""
        if not job.get("controlnet"):
            return None
        names = ("controlnet_id", *(s.name for s in job_settings("control")))
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

    def request_fields(self) -> dict[str, Any]:
        """The condition's fields of a `ControlRequest`."""
        return {"control": self.kind, "control_uri": self.uri, "control_scale": self.scale}


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


# ---------------------------------------------------------------------- checks (before any work)
def check_control_batch(batch: pa.RecordBatch, limits: Any,
                        fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Refuse, naming column and rows: control columns without a ControlNet, unknown `control`
    names (validation.py refuses `control` in a prompt manifest), a row naming both a control image and a derived one,
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
    fail_if("control_image", pc.and_(has_image, foreign_uris(image)), NOT_READABLE)
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
