"""Image encodings: how an image is saved (PNG, JPEG, WebP), with fixed options so the same
pixels always give the same bytes (and the same sha256)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_FORMATS", "PNG", "Encoding", "ImageFormat", "check_quality", "encode_image", "get_image_format"]


@dataclass(frozen=True)
class ImageFormat:
    """How one image format is saved: file extension, PIL format name, fixed save options."""

    name: str  # as a job names it: png | jpeg | webp
    ext: str
    pil_format: str
    save_args: dict = field(default_factory=dict)
    lossy: bool = False


# Fixed save options so the same pixels always give the same bytes (and the same sha256).
IMAGE_FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", "png", "PNG", {"compress_level": 6, "optimize": False}),
    "jpeg": ImageFormat("jpeg", "jpg", "JPEG", {"optimize": False, "progressive": False}, lossy=True),
    "webp": ImageFormat("webp", "webp", "WEBP", {"method": 4, "lossless": False, "exact": False}, lossy=True),
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


@dataclass(frozen=True)
class Encoding:
    """How a job saves its images: an image format and the quality of the lossy ones. The one
    value that writers, the worker and the dataset card are given (a job's `image_format` and
    `quality` are read here and in the job file only)."""

    format: ImageFormat
    quality: int = 95

    @classmethod
    def of(cls, name: "str | ImageFormat" = "png", quality: int = 95) -> Encoding:
        """The encoding named ``png`` / ``jpeg`` (``jpg``) / ``webp`` at ``quality`` (1..100)."""
        return cls(get_image_format(name), check_quality(quality))

    @classmethod
    def of_job(cls, job: "Mapping[str, Any] | Any") -> Encoding:
        """The encoding of a job: a `JobSpec`, or its record as job.json holds it."""
        if not isinstance(job, Mapping):
            job = {"image_format": job.image_format, "quality": job.quality}
        return cls.of(job.get("image_format", "png"), job.get("quality", 95))

    @property
    def ext(self) -> str:
        """The images' file extension (``png``, ``jpg``, ``webp``)."""
        return self.format.ext

    def encode(self, pixels: "np.ndarray | Image.Image") -> bytes:
        """Encode an image (uint8 ``HxWx3`` array or PIL image) to bytes.

        The quality applies to JPEG and WebP; PNG is lossless and ignores it. PIL images that
        are not RGB are converted to RGB. Output carries no timestamps or other metadata.
        """
        if isinstance(pixels, Image.Image):
            img = pixels if pixels.mode == "RGB" else pixels.convert("RGB")
        else:
            arr = np.asarray(pixels)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
                raise ValueError(f"pixels must be a non-empty uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
            img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
        args = dict(self.format.save_args)
        if self.format.lossy:
            args["quality"] = self.quality
        buf = io.BytesIO()
        img.save(buf, format=self.format.pil_format, **args)
        return buf.getvalue()


PNG = Encoding.of()


def encode_image(pixels: "np.ndarray | Image.Image", image_format: str = "png", quality: int = 95) -> bytes:
    """`Encoding.of(image_format, quality).encode(pixels)`."""
    return Encoding.of(image_format, quality).encode(pixels)
