"""``--format webdataset``: ``shards/<shard>.tar`` with ``<key>.<ext>``, ``<key>.txt`` (the prompt,
the caption training loaders read) and ``<key>.json`` (the settings) per sample (and
``<key>.mask.png`` for an edited image whose mask the job keeps). Read back member by member
(seeks, not whole downloads); the dataset card declares the samples' features, so
`load_dataset(OUTPUT)` does not guess types from the first shard.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from zimage_batch.output import layout
from zimage_batch.output.encoding import PNG, Encoding
from zimage_batch.output.features import json_type, sample_fields, yaml_features
from zimage_batch.output.formats.base import CardInput, OutputFormat, read_containers
from zimage_batch.output.shard_writer import ShardWriter, TempDirMixin
from zimage_batch.storage import Storage


def _json_clean(obj: Any) -> Any:
    """Make metadata strictly JSON-able: non-finite floats become null, keys become strings."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_json_clean(v) for v in obj), key=lambda v: json.dumps(v, default=str))
    if type(obj).__name__ in ("NAType", "NaTType"):  # pandas.NA / pandas.NaT
        return None
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    iso = getattr(obj, "isoformat", None)
    if callable(iso):
        return iso()
    return str(obj)


def meta_json(meta: dict) -> bytes:
    """The ``<key>.json`` member: UTF-8, unescaped non-ASCII, sorted keys, strict JSON."""
    return json.dumps(
        _json_clean(meta), ensure_ascii=False, sort_keys=True, default=_json_default, allow_nan=False
    ).encode("utf-8")


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _caption(meta: dict, field: str = "prompt") -> bytes:
    """The ``<key>.txt`` member: the prompt (or the metadata `field` the writer's `caption_field`
    names), UTF-8 (empty when a sample has none)."""
    prompt = meta.get(field)
    return b"" if prompt is None else str(prompt).encode("utf-8")


class WebDatasetWriter(TempDirMixin, ShardWriter):
    """``shards/<shard>.tar``: streamed to a local temp tar, uploaded by ``close()``.

    The tar is deterministic (mtime 0, uid/gid 0, no user names, mode 0644); an empty shard
    still gets a (valid, empty) tar so every committed shard has its object.
    """

    output_format = "webdataset"

    def __init__(self, storage: Storage, shard: str, encoding: Encoding = PNG) -> None:
        super().__init__(storage, shard, encoding)
        self.object = layout.tar_key(self.shard)
        self._path = os.path.join(self._make_tmpdir("zimage-wds-"), f"{self.shard}.tar")
        self._tar: tarfile.TarFile | None = tarfile.open(self._path, "w", format=tarfile.PAX_FORMAT)

    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str:
        js = meta_json(meta)  # fail on bad metadata before anything is written
        caption = _caption(meta, self.caption_field)
        img_name = f"{key}.{self.ext}"
        self._tar.addfile(_tar_member(img_name, len(data)), io.BytesIO(data))
        if mask is not None:
            self._tar.addfile(_tar_member(f"{key}{layout.MASK_SUFFIX}", len(mask)), io.BytesIO(mask))
        self._tar.addfile(_tar_member(f"{key}.txt", len(caption)), io.BytesIO(caption))
        self._tar.addfile(_tar_member(f"{key}.json", len(js)), io.BytesIO(js))
        return f"{self.object}#{img_name}"

    def _close(self):
        self._tar.close()
        self._tar = None
        self.storage.put_file(self.object, self._path)
        self._remove_tmpdir()

    def _abort(self):
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
            self._tar = None
        self._remove_tmpdir()


def read(storage: Storage, locations: Sequence[str], column: str = "image") -> dict[str, bytes]:
    """Members of the tars (`column` does not apply)."""
    return read_containers(storage, locations, _tar_members)


def _tar_members(storage: Storage, obj: str, wanted: set[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with storage.open_read(obj) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.name in wanted:
                out[member.name] = tar.extractfile(member).read()
                if len(out) == len(wanted):
                    break
    return out


def mask_location(image: str) -> str:
    """The ``<key>.mask.png`` member beside ``<key>.<ext>`` in the shard's tar."""
    obj, _, member = image.partition("#")
    return f"{obj}#{member.rsplit('.', 1)[0]}{layout.MASK_SUFFIX}"


def features(card: CardInput) -> list[dict[str, Any]]:
    """A sample: its key, image, mask (when kept), caption and settings (a JSON struct)."""
    sample = pa.struct([pa.field(f.name, json_type(f.type)) for f in sample_fields(card.metadata)])
    ext = card.image_ext
    mask = [("mask.png", pa.binary())] if card.masks else []
    return yaml_features(pa.schema([("__key__", pa.string()), (ext, pa.binary()), *mask, ("txt", pa.string()),
                                    ("json", sample)]), images={ext, "mask.png"} if card.masks else {ext})


def loading(ext: str) -> list[str]:
    return [f'ds = load_dataset("path/to/this/folder", split="train")  # {ext}, txt (the prompt), json',
            "# or any WebDataset loader (urls: the shards/*.tar files):",
            f'# webdataset.WebDataset(urls).decode("pil").to_tuple("{ext}", "txt")']


FORMAT = OutputFormat(
    name="webdataset",
    folder=layout.SHARDS,
    shard_key=layout.tar_key,
    writer=WebDatasetWriter,
    writer_options=(),
    read=read,
    mask_location=mask_location,
    data_files=f"{layout.SHARDS}*.tar",
    features=features,
    loading=loading,
    stages_locally=True,
)
