"""A format added as one module (here two throwaway ones, registered for a test only): its
shards' objects are written, published, found by status and the report's reader, and taken out
whole by `Ledger.remove_shard`, repair, `forget_lost` and `--overwrite`; nothing outside the
registry needs to know its name, so nothing of it is orphaned."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import pytest

from zimage_batch.output import formats, layout
from zimage_batch.output.encoding import PNG, Encoding
from zimage_batch.output.formats.base import OutputFormat, read_containers
from zimage_batch.output.ledger import CommitMarker, Ledger
from zimage_batch.output.repair import repair
from zimage_batch.output.shard_writer import ShardWriter
from zimage_batch.output.status import load_output
from zimage_batch.output.writers import make_writer
from zimage_batch.storage import Storage, open_storage

SAMPLES = 3


# ------------------------------------------------------------------ a one-object format: zips/<shard>.zip
class ZipWriter(ShardWriter):
    output_format = "zip"

    def __init__(self, storage: Storage, shard: str, encoding: Encoding = PNG, *, level: int = 0) -> None:
        super().__init__(storage, shard, encoding)
        self.level = level
        self.object = f"zips/{self.shard}.zip"
        self._buffer = io.BytesIO()
        self._zip = zipfile.ZipFile(self._buffer, "w")

    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str:
        self._zip.writestr(f"{key}.{self.ext}", data)
        if mask is not None:
            self._zip.writestr(f"{key}{layout.MASK_SUFFIX}", mask)
        return f"{self.object}#{key}.{self.ext}"

    def _close(self) -> None:
        self._zip.close()
        self.storage.put_bytes(self.object, self._buffer.getvalue())

    def _abort(self) -> None:
        self._zip.close()


def _zip_members(storage: Storage, obj: str, wanted: set[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(storage.get_bytes(obj))) as z:
        return {name: z.read(name) for name in wanted if name in z.namelist()}


ZIP = OutputFormat(
    name="zip", folder="zips/", shard_key=lambda shard: f"zips/{shard}.zip", writer=ZipWriter,
    writer_options=("level",), read=lambda st, locations, column="image": read_containers(st, locations, _zip_members),
    mask_location=lambda image: f"{image.rsplit('.', 1)[0]}{layout.MASK_SUFFIX}",
    data_files="zips/*.zip", features=lambda card: [], loading=lambda ext: [], stages_locally=False,
)


# ------------------------------------------------------------------ a folder format: frames/<shard>/<key>.<ext>
class FramesWriter(ShardWriter):
    output_format = "frames"

    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str:
        location = f"frames/{self.shard}/{key}.{self.ext}"
        self.storage.put_bytes(location, data)
        if mask is not None:
            self.storage.put_bytes(f"frames/{self.shard}/{key}{layout.MASK_SUFFIX}", mask)
        return location

    def _close(self) -> None:
        pass

    def _abort(self) -> None:
        pass


def _read_frames(storage: Storage, locations: Sequence[str], column: str = "image") -> dict[str, bytes]:
    return {location: storage.get_bytes(location) for location in locations if storage.exists(location)}


FRAMES = OutputFormat(
    name="frames", folder="frames/", shard_key=lambda shard: f"frames/{shard}/", writer=FramesWriter,
    writer_options=(), read=_read_frames, mask_location=lambda image: f"{image.rsplit('.', 1)[0]}{layout.MASK_SUFFIX}",
    data_files="metadata/*.parquet", features=lambda card: [], loading=lambda ext: [], stages_locally=False,
)


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out/")


@pytest.fixture(params=[ZIP, FRAMES], ids=lambda fmt: fmt.name)
def fmt(request, monkeypatch) -> OutputFormat:
    """The throwaway format under test; both are in the registry, for this test only."""
    for added in (ZIP, FRAMES):
        monkeypatch.setitem(formats.FORMATS, added.name, added)
    return request.param


def _keys(store: Storage, prefix: str = "") -> set[str]:
    return {info.key for info in store.list(prefix)}


def _marker(fmt: OutputFormat, shard: str, start: int, finished: float) -> CommitMarker:
    return CommitMarker(shard=shard, file="m.parquet", start=start, end=start + SAMPLES, rows=SAMPLES, ok=SAMPLES,
                        error=0, digest="d", fingerprint="f", format=fmt.name, finished=finished)


def _written(store: Storage, marker: CommitMarker) -> dict[str, bytes]:
    """A worker's attempt: the writer's objects and the metadata staged, committed; the images by location."""
    staged = store.child(marker.staging.prefix)
    images = {}
    # every format's options given: each writer takes its own, ignores the others', and a name is an encoding
    with make_writer(marker.format, staged, marker.shard, "png", level=1, upload_threads=2, fields=None) as writer:
        for i in range(SAMPLES):
            image = f"{marker.shard} image {i}".encode()
            mask = f"{marker.shard} mask {i}".encode() if i % 2 == 0 else None
            images[writer.add(f"k{i}", image, {"id": str(i), "prompt": "p"}, mask=mask)] = image
    staged.put_bytes(layout.metadata_key(marker.shard), b"metadata")
    assert Ledger(store).commit(marker)
    return images


def _shard_keys(store: Storage, shard: str) -> set[str]:
    return {key for key in _keys(store) if shard in key}


def test_a_new_format_s_shards_are_published_found_and_removed_whole(store, fmt):
    ledger = Ledger(store)
    ledger.claim_output({"fingerprint": "f", "job": {"format": fmt.name}, "output_fields": []}, overwrite=False)
    first, later = _marker(fmt, "a-0", 0, 1.0), _marker(fmt, "a-2", 2, 2.0)  # later shares rows 2..3: repair's
    images, folders = {}, []
    publish_folder = store.publish_folder
    store.publish_folder = lambda source, dest: (folders.append(dest), publish_folder(source, dest))
    for marker in (first, later):
        images[marker.shard] = _written(store, marker)
        ledger.publish(marker)
        assert ledger.is_published(marker.shard) and not _keys(store, layout.STAGING)
        key = fmt.shard_key(marker.shard)
        assert {loc.partition("#")[0] for loc in images[marker.shard]} <= _keys(store, key)
    # a folder format's shard is published as one folder; a one-object format's object is moved
    assert folders == ([] if fmt is ZIP else ["frames/a-0/", "frames/a-2/"])
    assert all(formats.format_of(location) is fmt for location in images["a-0"])

    # status and the report's reader find them
    state = load_output(store)
    assert [m.shard for m in state.markers] == ["a-0"]
    assert [(o.kept.shard, o.extra.shard) for o in state.overlaps] == [("a-0", "a-2")]
    assert formats.read_images(store, list(images["a-0"])) == images["a-0"]
    masks = formats.read_images(store, [formats.mask_location(loc) for loc in images["a-0"]], formats.MASK_COLUMN)
    assert sorted(masks.values()) == [b"a-0 mask 0", b"a-0 mask 2"]

    # repair takes the later shard out whole, its format's objects included
    lines: list[str] = []
    assert [o.extra.shard for o in repair(store, echo=lines.append)] == ["a-2"]
    assert _shard_keys(store, "a-2") == set() and len(lines) == 1
    assert formats.read_images(store, list(images["a-0"])) == images["a-0"]

    # a committed shard that can never be published (metadata deleted by hand) is forgotten whole
    lost = _marker(fmt, "b-0", 0, 3.0)
    _written(store, lost)
    ledger.publish(lost)
    store.delete([layout.metadata_key("b-0")])
    assert _shard_keys(store, "b-0") - {layout.commit_key("b-0")}, "its data objects are out"
    assert ledger.forget_lost(ledger.committed()) == ["b-0"]
    assert _shard_keys(store, "b-0") == set()

    # remove_shard on its own, then --overwrite: nothing of the format is left
    ledger.remove_shard(first)
    assert _keys(store) == {layout.JOB_FILE}
    again = _marker(fmt, "c-0", 0, 4.0)
    _written(store, again)
    ledger.publish(again)
    assert _keys(store, fmt.folder)
    ledger.claim_output({"fingerprint": "g", "job": {"format": fmt.name}, "output_fields": []}, overwrite=True)
    assert _keys(store) == {layout.JOB_FILE}

