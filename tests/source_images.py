"""Source images of every kind an edit manifest may hold (EXIF-rotated, palette, gray, RGBA, CMYK,
16-bit, a mask), for the edit tests in tests/unit/ and tests/drills/."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pattern(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * 5 + y * 3) % 256], -1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 96 wide x 64 high, EXIF orientation 6: shown upright as 64 x 96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pattern(96, 64)), "JPEG", exif=exif, quality=95)


def palette_png() -> bytes:
    return encode(Image.fromarray(pattern(80, 64)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def gray_png() -> bytes:
    return encode(Image.fromarray(pattern(64, 64)[..., 0], "L"), "PNG")


def rgba_png() -> bytes:
    rgba = np.dstack([pattern(64, 64), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half transparent: white once composited
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(pattern(64, 64)).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    """16-bit grayscale, 64 wide x 80 high, values up to 65535."""
    y, x = np.mgrid[0:80, 0:64]
    return encode(Image.fromarray(((x + y) * 65535 // 142).astype(np.uint16)), "PNG")


def mask_png() -> bytes:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return encode(Image.fromarray(mask, "L"), "PNG")


def small_jpeg() -> bytes:
    return encode(Image.fromarray(pattern(40, 40)), "JPEG")
