"""What an output format is: one value (`OutputFormat`) that says where it puts a shard's images,
how it writes them, how they are read back, and what the dataset card declares for it.

Each format is one module of this package that defines ``FORMAT``; the package's registry
(`zimage_batch.output.formats`) holds them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from zimage_batch.output.shard_writer import ShardWriter
from zimage_batch.storage import Storage

READ_THREADS = 16  # objects (or containers) read at once

#: Image bytes by location (a metadata `image` value: `images/<shard>/<key>.png`,
#: `shards/<shard>.tar#<key>.png`, `data/<shard>.parquet#<key>`), for locations of one format;
#: `column`: the Parquet column holding the bytes (`image`, or `mask_image` for kept masks).
#: Locations that cannot be read are left out.
Reader = Callable[[Storage, Sequence[str], str], dict[str, bytes]]


@dataclass(frozen=True)
class CardInput:
    """What the dataset card knows of OUTPUT when it declares a format's features."""

    storage: Storage
    shard: str  # a committed shard (the last one): its files show the columns
    metadata: pa.Schema  # the schema every committed metadata/<shard>.parquet shares
    image_ext: str  # png, jpg, webp

    @property
    def masks(self) -> bool:
        """An edit job that keeps each inpaint row's mask beside its image."""
        return "mask_sha256" in self.metadata.names


@dataclass(frozen=True)
class OutputFormat:
    """One output format: ``--format <name>``."""

    name: str
    folder: str  # where its shards' images go under OUTPUT (layout.FORMAT_FOLDERS)
    writer: type[ShardWriter]
    writer_options: tuple[str, ...]  # keywords its writer takes beyond storage, shard, image format, quality
    read: Reader
    data_files: str  # the dataset card's default config: what `load_dataset(OUTPUT)` reads
    features: Callable[[CardInput], list[dict[str, Any]]]  # the card's `features` of that config
    loading: Callable[[str], list[str]]  # the card's lines that load the default config (given the image ext)
    stages_locally: bool  # builds a shard's file on local disk before uploading it (needs scratch space)

    def holds(self, location: str) -> bool:
        """Whether a metadata `image` value names an object of this format."""
        return location.startswith(self.folder)


def read_containers(storage: Storage, locations: Sequence[str],
                    members_of: Callable[[Storage, str, set[str]], dict[str, bytes]]) -> dict[str, bytes]:
    """Read `<object>#<member>` locations, each object once (in parallel), through `members_of`
    (object, wanted members -> bytes by member); a missing object is left out."""
    wanted: dict[str, set[str]] = {}
    for location in locations:
        obj, _, member = location.partition("#")
        wanted.setdefault(obj, set()).add(member)

    def one(obj: str) -> dict[str, bytes]:
        try:
            return {f"{obj}#{member}": data for member, data in members_of(storage, obj, wanted[obj]).items()}
        except FileNotFoundError:
            return {}

    found: dict[str, bytes] = {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for part in pool.map(one, wanted):
            found |= part
    return found
