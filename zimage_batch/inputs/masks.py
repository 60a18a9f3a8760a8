"""The pixels of derived inpaint masks (which rows have one: `mask_spec.py`), made on the CPU
ahead of the GPU, in the source's own pixels, before the source and mask are sized for the model.

* alpha: the mask is 255 - alpha (transparent repaints; the model repaints where the mask is
  over half, so pixels more than half transparent). A source without an alpha channel is an
  error row naming it.
* outpaint: the source is placed unscaled on the canvas at its anchor; the new area is filled
  by repeating the source's edge pixels outwards (each new pixel takes the colour of the nearest
  source pixel), which gives the model the source's colours to start from, and the mask is the
  new area. A canvas smaller than the source on either side is an error row naming both sizes.
* words (mask_prompt): CLIPSeg's probability of the words at each source pixel (generate/
  segmenter.py, on the worker's device, a window of rows at once); pixels from `mask_threshold`
  repaint, the rest not (`mask_invert` swaps them).
* then, for every mask: `mask_grow` dilates it by that many pixels (an elliptical kernel;
  negative erodes), so an outpaint mask reaches that far into the source for a seamless edge;
  `mask_blur` blurs its edge (Gaussian, radius in pixels).

A derived mask with nothing to repaint is an error row naming the source.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter

from zimage_batch.inputs.mask_spec import ALPHA, OUTPAINT, RowMask, parse_aspect

REPAINTED = 128  # the reference pipelines binarize masks at one half: values from 128 repaint


class MaskError(ValueError):
    """A row's mask cannot be made; the message is the row's error."""


def has_alpha(image: Image.Image) -> bool:
    """Whether a decoded (not yet RGB) image carries transparency."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def alpha_mask(image: Image.Image, uri: str) -> Image.Image:
    """255 - alpha of a decoded image, as an L mask."""
    if not has_alpha(image):
        raise MaskError(f"mask: alpha, and the source has no alpha channel (mode {image.mode}): {uri}")
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return Image.fromarray(255 - alpha, "L")


def canvas_size(width: int, height: int, spec: RowMask, uri: str) -> tuple[int, int]:
    """The outpaint canvas for a width x height source: the row's WxH, or the smallest canvas of
    its aspect ratio that holds the source."""
    if spec.canvas is not None:
        cw, ch = spec.canvas
        if cw < width or ch < height:
            raise MaskError(f"outpaint {cw}x{ch} is smaller than the source ({width}x{height}): {uri}")
        return cw, ch
    ratio = parse_aspect(spec.aspect or "")
    if width / height > ratio:  # wider than the target: add height
        return width, max(height, math.ceil(width / ratio - 1e-9))
    return max(width, math.ceil(height * ratio - 1e-9)), height


def offset(width: int, height: int, canvas: tuple[int, int], anchor: str) -> tuple[int, int]:
    """Where the source's top-left corner sits on the canvas."""
    cw, ch = canvas
    x, y = (cw - width) // 2, (ch - height) // 2
    if anchor == "top":
        y = 0
    elif anchor == "bottom":
        y = ch - height
    elif anchor == "left":
        x = 0
    elif anchor == "right":
        x = cw - width
    return x, y


def outpaint(image: Image.Image, spec: RowMask, uri: str) -> tuple[Image.Image, Image.Image]:
    """The source (RGB) on its canvas, edge pixels repeated outwards, and the new area's mask."""
    width, height = image.size
    canvas = canvas_size(width, height, spec, uri)
    x, y = offset(width, height, canvas, spec.anchor)
    pad = ((y, canvas[1] - height - y), (x, canvas[0] - width - x))
    pixels = np.pad(np.asarray(image), (*pad, (0, 0)), mode="edge")
    mask = np.pad(np.zeros((height, width), np.uint8), pad, constant_values=255)
    return Image.fromarray(pixels, "RGB"), Image.fromarray(mask, "L")


def refine(mask: Image.Image, grow: int, blur: int) -> Image.Image:
    """The mask grown (negative: shrunk) by `grow` pixels, then its edge blurred by `blur`."""
    if grow:
        import cv2

        size = 2 * abs(grow) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        op = cv2.dilate if grow > 0 else cv2.erode
        mask = Image.fromarray(op(np.asarray(mask), kernel, borderType=cv2.BORDER_REPLICATE), "L")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def derive(spec: RowMask, decoded: Image.Image, rgb: Image.Image, uri: str) -> tuple[Image.Image, Image.Image]:
    """A row's (source, mask) in source pixels before sizing: `decoded` is the upright image as
    decoded (for its alpha), `rgb` the same as RGB."""
    if spec.kind == ALPHA:
        image, mask = rgb, alpha_mask(decoded, uri)
    elif spec.kind == OUTPAINT:
        image, mask = outpaint(rgb, spec, uri)
    else:
        raise ValueError(f"not a derived mask: {spec.kind}")
    return image, refine(mask, spec.grow, spec.blur)


def words_mask(probability: np.ndarray, spec: RowMask) -> Image.Image:
    """The mask of a words row from its CLIPSeg probabilities (source size), grown and blurred."""
    found = probability >= spec.threshold
    mask = np.where(found != spec.invert, 255, 0).astype(np.uint8)
    return refine(Image.fromarray(mask, "L"), spec.grow, spec.blur)


def check_not_empty(mask: Image.Image, spec: RowMask, uri: str) -> None:
    """A derived mask must repaint something (at the size the model sees it)."""
    if int(np.asarray(mask).max(initial=0)) < REPAINTED:
        what = {ALPHA: "the source is opaque", OUTPAINT: "the canvas adds nothing"}.get(
            spec.kind, f"CLIPSeg finds no {spec.prompt!r} at threshold {spec.threshold:g}")
        raise MaskError(f"the derived mask is empty, nothing to repaint ({spec.kind}: {what}): {uri}")


def mask_png(mask: Image.Image) -> bytes:
    """The mask as stored beside the output (`<key>.mask.png`): 8-bit grayscale PNG."""
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
