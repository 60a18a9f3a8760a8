"""Image encodings: how an image is saved (PNG, JPEG, WebP), with fixed options so the same
pixels always give the same bytes (and the same sha256)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = ["IMAGE_FORMATS", "ImageFormat", "check_quality", "encode_image", "get_image_format"]


@dataclass(frozen=True)
class ImageFormat:
    """How one image format is saved: file extension, PIL format name, fixed save options."""

    ext: str
    pil_format: str
    save_args: dict = field(default_factory=dict)
    lossy: bool = False


# Fixed save options so the same pixels always give the same bytes (and the same sha256).
IMAGE_FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", "PNG", {"compress_level": 6, "optimize": False}),
    "jpeg": ImageFormat("jpg", "JPEG", {"optimize": False, "progressive": False}, lossy=True),
    "webp": ImageFormat("webp", "WEBP", {"method": 4, "lossless": False, "exact": False}, lossy=True),
}
_FORMAT_ALIASES = {"jpg": "jpeg"}


def get_image_format(name: "str | ImageFormat") -> ImageFormat:
    """The :class:`ImageFormat` for ``png`` / ``jpeg`` (or ``jpg``) / ``webp``; ValueError otherwise."""
    if isinstance(name, ImageFormat):
        return name
    fmt = IMAGE_FORMATS.get(_FORMAT_ALIASES.get(str(name).lower(), str(name).lower()))
    if fmt is None:
        raise ValueError(f"unknown image format {name!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    return fmt


def check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    return int(quality)


def encode_image(pixels: "np.ndarray | Image.Image", image_format: str = "png", quality: int = 95) -> bytes:
    """Encode an image (uint8 ``HxWx3`` array or PIL image) to PNG, JPEG or WebP bytes.

    ``quality`` (1..100) applies to JPEG and WebP; PNG is lossless and ignores it. PIL images
    that are not RGB are converted to RGB. Output carries no timestamps or other metadata.
    """
    fmt = get_image_format(image_format)
    quality = check_quality(quality)
    if isinstance(pixels, Image.Image):
        img = pixels if pixels.mode == "RGB" else pixels.convert("RGB")
    else:
        arr = np.asarray(pixels)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"pixels must be a non-empty uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
        img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    args = dict(fmt.save_args)
    if fmt.lossy:
        args["quality"] = quality
    buf = io.BytesIO()
    img.save(buf, format=fmt.pil_format, **args)
    return buf.getvalue()
