"""The pixels of ControlNet conditions, fetched or derived on the CPU ahead of the GPU (the rows
that have one, and the checks, are in `control.py`; `run/loading.py` puts them in the request).

Given condition images go through the edit sources' decoding (EXIF orientation, modes, 16-bit,
CMYK, the decompression-bomb limit) and are resized (Lanczos, as the reference pipelines'
image processor does) to the output size; in an edit manifest that size follows the source's.
`canny` runs OpenCV's Canny (thresholds `canny_low` / `canny_high`) on the source at the output
size, `tile` is the source itself. For ControlNet inpaint the source and mask are prepared as
for inpaint (`run/loading.py`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from PIL import Image

from zimage_batch.inputs import images
from zimage_batch.inputs.control import DERIVED, GIVEN


def condition_image(kind: str, uri: str | None, source: Image.Image | None, width: int, height: int,
                    max_pixels: int, canny: tuple[float, float], lineage: dict[str, Any]) -> Image.Image:
    """A row's condition at the output size: the given image at `uri` (`kind` GIVEN), fetched,
    decoded and resized, or derived from its `source`; its sha256 (of the given bytes, or of the
    derived RGB pixels) goes into the row's `lineage` as `control_sha256`."""
    if kind == GIVEN:
        data = images.fetch(uri, "control image")
        lineage["control_sha256"] = hashlib.sha256(data).hexdigest()
        return fit(images.decode(data, uri, max_pixels, "control image"), width, height)
    condition = derive(kind, source, width, height, canny)
    lineage["control_sha256"] = hashlib.sha256(np.asarray(condition).tobytes()).hexdigest()
    return condition


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
