"""What an output format is: one value (`OutputFormat`) that says where it puts a shard's images,
how it writes them, publishes and removes them, how they (and kept masks) are read back, and
what the dataset card declares for it. Nothing outside this package tells formats apart by name:
the ledger, repair, the review and the card ask a shard's format (`get_format(marker.format)`).

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

#: The `Reader` column of an edited image's kept mask (a Parquet ``mask_image`` cell; formats that
#: keep masks as their own objects or members ignore the column).
MASK_COLUMN = "mask_image"

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
    folder: str  # where its shards' images go under OUTPUT (named in `output.layout`), ending in "/"
    #: Where one shard's images go under OUTPUT (under `folder`): its one object (a tar, a Parquet
    #: file), or, ending in "/", the folder of its objects (published as one, removed as a prefix).
    shard_key: Callable[[str], str]
    writer: type[ShardWriter]
    writer_options: tuple[str, ...]  # keywords its writer takes beyond storage, shard and encoding
    read: Reader
    #: Where an image's kept mask is, from the image's location (a location of the same forms, read
    #: through `read` with `MASK_COLUMN`).
    mask_location: Callable[[str], str]
    data_files: str  # the dataset card's default config: what `load_dataset(OUTPUT)` reads
    features: Callable[[CardInput], list[dict[str, Any]]]  # the card's `features` of that config
    loading: Callable[[str], list[str]]  # the card's lines that load the default config (given the image ext)
    stages_locally: bool  # builds a shard's file on local disk before uploading it (needs scratch space)

    def __post_init__(self) -> None:
        if not self.folder.endswith("/"):
            raise ValueError(f"output format {self.name!r}: its folder {self.folder!r} must end with '/'")

    def holds(self, location: str) -> bool:
        """Whether a metadata `image` value names an object of this format."""
        return location.startswith(self.folder)

    def shard_folder(self, shard: str) -> str | None:
        """The folder of a shard's objects, which a publish moves as one (`Storage.publish_folder`),
        or None when the shard's images are one object (moved like any other staged file)."""
        key = self.shard_key(shard)
        return key if key.endswith("/") else None

    def remove(self, storage: Storage, shard: str) -> None:
        """Delete a shard's images (its object, or every object of its folder)."""
        key = self.shard_key(shard)
        if key.endswith("/"):
            storage.delete_prefix(key)
        else:
            storage.delete([key])


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
