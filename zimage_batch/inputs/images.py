"""Source images and masks of edit manifests: fetched, checked and decoded on the CPU.

A row's source URI (local path or s3://) and mask become decoded pixels, or a one-line reason
naming the problem and the URI (`SourceError`), which the worker writes as an `error` row;
`output_size` sizes the output from the source; `prefetch` runs the loading (`run/loading.py`)
on a thread pool ahead of the GPU. Decoding applies EXIF orientation, converts palette,
grayscale, alpha (composited on white), CMYK (through its ICC profile when it has one) and 16-bit
images to 8-bit RGB, and refuses images with more pixels than a limit before decoding them
(decompression bombs). Relative source paths are relative to the manifest file that lists them
(`resolve_uri`). A mask may instead be derived from the source (masks.py: its alpha, an outpaint
canvas, words through CLIPSeg); what the metadata records of a row's mask is
`mask_spec.mask_metadata`.
"""
from __future__ import annotations

import io
import math
import posixpath
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from zimage_batch.inputs import masks
from zimage_batch.inputs.mask_spec import WORDS, RowMask
from zimage_batch.model.variants import Variant
from zimage_batch.storage import StorageError, is_s3, open_storage, split_s3_uri
from zimage_batch.text import first_line

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: the decompression-bomb limit per source image
SIZE_MULTIPLE = 16

_SRGB = ImageCms.createProfile("sRGB")
T = TypeVar("T")
R = TypeVar("R")


class SourceError(Exception):
    """A per-row problem with a source image or mask; the message is the row's error."""


def resolve_uri(uri: str, base: str | None) -> str:
    """A URI as written in a manifest: absolute paths and s3:// stay, file:// URIs become paths
    (percent-decoded); relative paths are relative to `base` (the manifest's folder, local or
    s3://), with `.` and `..` resolved."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    if is_s3(uri) or posixpath.isabs(uri) or not base:
        return uri
    if is_s3(base):
        bucket, prefix = split_s3_uri(base)
        key = posixpath.normpath(posixpath.join("/", prefix, uri)).lstrip("/")  # '..' stops at the bucket
        return f"s3://{bucket}/{key}"
    return posixpath.normpath(posixpath.join(base, uri))


def fetch(uri: str, what: str = "source") -> bytes:
    """The bytes at `uri`; a missing object or one we may not read is a SourceError."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise SourceError(f"{what} not found: {uri}")
    try:
        return open_storage(parent or ".").get_bytes(name)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SourceError(f"{what} not found: {uri}") from None
    except StorageError as exc:
        raise SourceError(f"{what} not readable: {uri} ({exc})") from None
    except ValueError as exc:  # a key storage refuses (NUL, '..')
        raise SourceError(f"{what} has an invalid URI: {uri!r} ({exc})") from None
    except PermissionError:
        raise SourceError(f"{what} not readable: {uri} (permission denied)") from None


def decode(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "source") -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image (see the module docstring)."""
    return decode_upright(data, uri, max_pixels, what, rgb=True)


def decode_upright(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "source",
                   rgb: bool = False) -> Image.Image:
    """Decode image bytes into an upright image, in its own mode unless `rgb` (its alpha kept)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = _signature(data)
        if kind:  # it starts like an image but does not parse as one
            raise SourceError(f"{what} is corrupt or truncated: {uri} (a damaged {kind} file)") from None
        raise SourceError(f"{what} is not an image: {uri}") from None
    except Image.DecompressionBombError:
        raise SourceError(f"{what} too large: {uri} (over Pillow's decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SourceError(f"{what} is corrupt or truncated: {uri} ({first_line(exc, 200)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SourceError(
            f"{what} too large: {uri} is {width}x{height} = {width * height / 1e6:.1f} MP,"
            f" over the {max_pixels / 1e6:g} MP limit"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image) if rgb else image
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise SourceError(f"{what} is corrupt or truncated: {uri} ({first_line(exc, 200)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: transparency is composited on white, 16-bit values are scaled
    (not clipped), CMYK goes through its embedded ICC profile when there is one."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # 16/32-bit grayscale: I;16, I;16B, I, F
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
        gray = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "CMYK":
        profile = image.info.get("icc_profile")
        if profile:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
                return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
            except (ImageCms.PyCMSError, OSError):
                pass  # a broken profile: fall back to the plain conversion
        return image.convert("RGB")
    if mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        image = image.convert("RGBA")
    elif mode in ("L", "LA") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def source_and_mask(data: bytes, source: str, mask: str | None, spec: RowMask | None, max_pixels: int,
                    lineage: dict[str, Any]) -> tuple[Image.Image, Image.Image | None]:
    """A row's decoded source (RGB) and mask, before sizing: the given mask file, or one derived
    from the source (masks.py), grown and blurred (a words row's mask comes later: None here); the
    row's lineage gets the source's size."""
    decoded = decode_upright(data, source, max_pixels)
    try:
        image = to_rgb(decoded)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SourceError(f"source is corrupt or truncated: {source} ({first_line(exc, 200)})") from None
    lineage["source_width"], lineage["source_height"] = image.size
    if spec is not None and spec.kind == WORDS:
        return image, None
    if spec is not None and spec.derived:
        return masks.derive(spec, decoded, image, source)
    mask_image = decode(fetch(mask, "mask"), mask, max_pixels, "mask").convert("L") if mask else None
    if mask_image is not None and spec is not None:
        mask_image = masks.refine(mask_image, spec.grow, spec.blur)
    return image, mask_image


def prefetch(
    pool: Executor, items: Sequence[T], load: Callable[[T], R], window: int, first: int | None = None
) -> Iterator[list[tuple[int, R]]]:
    """Load `items` on `pool` a window at a time, the next window loading while the caller
    works on the current one; yields each window as [(index, result)] in item order. Windows
    start at `first` items and double up to `window`, so work starts before a whole window
    has loaded and each window has had the previous one's working time to load."""
    futures: dict[int, Future] = {}
    submitted, start, size = 0, 0, min(first or window, window)
    try:
        while start < len(items):
            end = min(start + size, len(items))
            while submitted < min(end + window, len(items)):
                futures[submitted] = pool.submit(load, items[submitted])
                submitted += 1
            yield [(i, futures.pop(i).result()) for i in range(start, end)]
            start, size = end, min(window, 2 * size)
    finally:
        for future in futures.values():
            future.cancel()


def output_size(
    source_width: int, source_height: int, variant: Variant, width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """(width, height) of the output: given sides win; missing ones follow the source's aspect,
    scaled into [min_side, max_side] of the variant and rounded to a multiple of 16."""
    if width and height:
        return int(width), int(height)
    aspect = source_width / source_height
    if width:
        return int(width), _fit(width / aspect, variant)
    if height:
        return _fit(height * aspect, variant), int(height)
    longest, shortest = max(source_width, source_height), min(source_width, source_height)
    down = min(1.0, variant.max_side / longest)  # the longest side fits
    scale = max(down, min(variant.min_side / shortest, variant.max_side / longest))  # the shortest reaches min
    return _fit(source_width * scale, variant), _fit(source_height * scale, variant)


def _fit(side: float, variant: Variant) -> int:
    rounded = int(math.floor(side / SIZE_MULTIPLE + 0.5)) * SIZE_MULTIPLE
    return max(variant.min_side, min(variant.max_side, rounded))


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


def _signature(data: bytes) -> str | None:
    """The image format `data` claims to be by its first bytes, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES.items() if data.startswith(magic)), None)

