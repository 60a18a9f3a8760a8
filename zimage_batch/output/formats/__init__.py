"""The output formats, by name: ``--format files | webdataset | parquet``.

Each format is one module of this package defining ``FORMAT`` (an `OutputFormat`: its folder
under OUTPUT and a shard's key there, writer, reader, where a kept mask is, and the dataset
card's data files and features); job validation, the workers' writers, the ledger's publish and
removal of a shard (and so repair), the report and its review, the dataset card and tests look
formats up here, by name (`get_format(marker.format)`) or by location (`format_of`). A new format
is a new module, named in `_MODULES` (whose order is the order `--help` and messages list them).
"""

from __future__ import annotations

from collections.abc import Iterable

from zimage_batch.output.formats import files, parquet, webdataset
from zimage_batch.output.formats.base import MASK_COLUMN, CardInput, OutputFormat, Reader
from zimage_batch.storage import Storage

__all__ = ["FORMATS", "FORMAT_NAMES", "MASK_COLUMN", "CardInput", "OutputFormat", "Reader", "format_of", "get_format",
           "mask_location", "read_images"]

_MODULES = (files, webdataset, parquet)

FORMATS: dict[str, OutputFormat] = {module.FORMAT.name: module.FORMAT for module in _MODULES}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


def get_format(name: str) -> OutputFormat:
    """The format called `name`; ValueError naming the known ones otherwise."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown output format {name!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def format_of(location: str) -> OutputFormat | None:
    """The format a metadata `image` value (an image's location under OUTPUT) belongs to."""
    return next((fmt for fmt in FORMATS.values() if fmt.holds(location)), None)


def mask_location(image: str) -> str:
    """Where an image's kept mask is (read it with `read_images(..., MASK_COLUMN)`), from the
    image's location; a location of no format is returned as it is (and reads as nothing)."""
    fmt = format_of(image)
    return image if fmt is None else fmt.mask_location(image)


def read_images(storage: Storage, locations: Iterable[str], column: str = "image") -> dict[str, bytes]:
    """Image bytes by location, whatever the format of each (see `base.Reader`); locations that
    cannot be read, or that name no format's folder, are left out."""
    by_format: dict[str, list[str]] = {}
    for location in locations:
        fmt = format_of(location)
        if fmt is not None:
            by_format.setdefault(fmt.name, []).append(location)
    found: dict[str, bytes] = {}
    for name, wanted in by_format.items():
        found |= FORMATS[name].read(storage, wanted, column)
    return found
