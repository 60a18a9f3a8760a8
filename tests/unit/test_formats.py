"""The output format registry: each format one module (folder, writer, reader, the card's data
files and features), looked up by name; every format's writer read back by its own reader."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from zimage_batch.jobspec import FORMATS as JOB_FORMATS
from zimage_batch.jobspec import JobError, JobSpec, load_job
from zimage_batch.output import formats, layout
from zimage_batch.output.encoding import encode_image
from zimage_batch.output.features import sample_fields
from zimage_batch.output.formats import MASK_COLUMN, CardInput, format_of, get_format, mask_location
from zimage_batch.output.keys import safe_key
from zimage_batch.output.writers import make_writer
from zimage_batch.run.preflight import scratch_needed
from zimage_batch.storage import open_storage

SHARD = "part-0000"


def _metadata(masks: bool = False) -> pa.Schema:
    from zimage_batch.inputs.manifest import metadata_columns

    return pa.schema(list(metadata_columns(True, masks=masks).items()))


def _write(fmt: str, storage, n: int = 5, masks: bool = False, shard: str = SHARD) -> dict[str, tuple[bytes, bytes | None]]:
    """A shard of `n` samples (every other one with a kept mask when `masks`): what each location holds."""
    writer = make_writer(fmt, storage, shard, fields=sample_fields(_metadata(masks)))
    written = {}
    for i in range(n):
        image = encode_image(np.full((8, 8, 3), 10 * i, np.uint8))
        mask = encode_image(np.full((8, 8, 3), 255 - i, np.uint8)) if masks and i % 2 == 0 else None
        meta = {"id": f"row/{i}", "prompt": f"prompt {i}", "seed": i} | ({"mask_sha256": "x"} if mask else {})
        written[writer.add(safe_key(f"row/{i}"), image, meta, mask=mask)] = (image, mask)
    writer.close()
    return written


def test_the_registry_names_each_format_once_in_the_order_the_cli_lists_them(tmp_path):
    assert formats.FORMAT_NAMES == JOB_FORMATS == ("files", "webdataset", "parquet")
    for name, fmt in formats.FORMATS.items():
        assert fmt.name == name and fmt.folder == {"files": layout.IMAGES, "webdataset": layout.SHARDS,
                                                   "parquet": layout.DATA}[name]
        assert fmt.shard_key(SHARD) == {"files": layout.images_prefix(SHARD), "webdataset": layout.tar_key(SHARD),
                                        "parquet": layout.parquet_key(SHARD)}[name]
        writer = make_writer(name, open_storage(str(tmp_path)), SHARD)
        assert type(writer) is fmt.writer and writer.output_format == name
        writer.abort()
    with pytest.raises(ValueError, match="expected one of files, webdataset, parquet"):
        get_format("zip")


def test_job_validation_and_scratch_space_come_from_the_registry():
    with pytest.raises(JobError, match=re.escape("format must be one of files|webdataset|parquet, got 'zip'")):
        load_job(None, {"manifest": "m", "output": "o", "format": "zip"}, [])
    for name in formats.FORMAT_NAMES:
        assert load_job(None, {"manifest": "m", "output": "o", "format": name}, []).format == name

    class Resolved:  # what scratch_needed reads of a resolved job
        variant = "turbo"
        defaults = {"turbo": {"width": 64, "height": 64}}

        def __init__(self, fmt: str) -> None:
            self.spec = JobSpec(manifest="m", output="o", format=fmt, shard_size=10)

    needed = {name: scratch_needed(Resolved(name)) for name in formats.FORMAT_NAMES}
    assert needed["files"] == 0 and needed["webdataset"] > 0 and needed["parquet"] > 0
    assert [name for name in formats.FORMAT_NAMES if get_format(name).stages_locally] == ["webdataset", "parquet"]


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_each_format_reads_back_what_its_writer_wrote(tmp_path, fmt):
    storage = open_storage(str(tmp_path / "out"))
    written = _write(fmt, storage)
    assert all(format_of(location) is get_format(fmt) for location in written)
    read = get_format(fmt).read(storage, list(written), "image")
    assert read == {location: image for location, (image, _) in written.items()}
    # through the registry, with a location that names nothing readable left out
    first = next(iter(written))
    gone = f"{first.rpartition('/')[0]}/missing.png" if fmt == "files" else f"{first.partition('#')[0]}#missing"
    assert formats.read_images(storage, [*written, gone, "elsewhere/x.png"]) == read


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_each_format_reads_back_the_kept_masks(tmp_path, fmt):
    storage = open_storage(str(tmp_path / "out"))
    written = _write(fmt, storage, masks=True)
    where = {mask_location(location): mask for location, (_, mask) in written.items()}
    read = formats.read_images(storage, list(where), MASK_COLUMN)
    assert read == {location: mask for location, mask in where.items() if mask is not None} and len(read) == 3


def test_formats_of_several_outputs_read_together(tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    written = {}
    for i, name in enumerate(formats.FORMAT_NAMES):
        written |= _write(name, storage, n=3, shard=f"s{i}")
    assert formats.read_images(storage, list(written)) == {location: image for location, (image, _) in written.items()}


@pytest.mark.parametrize("fmt, columns", [
    ("files", {"id", "prompt", "seed", "status", "image", "sha256"}),
    ("webdataset", {"__key__", "png", "txt", "json"}),
    ("parquet", {"__key__", "id", "image", "prompt", "seed"}),
])
def test_each_format_declares_the_card_s_data_files_and_features(tmp_path, fmt, columns):
    datasets = pytest.importorskip("datasets")
    storage = open_storage(str(tmp_path / "out"))
    _write(fmt, storage)
    fmt_ = get_format(fmt)
    assert fmt_.data_files == {"files": "metadata/*.parquet", "webdataset": "shards/*.tar",
                               "parquet": "data/*.parquet"}[fmt]
    features = datasets.Features._from_yaml_list(fmt_.features(CardInput(storage, SHARD, _metadata(), "png")))
    assert columns <= set(features)
    image = {"files": None, "webdataset": "png", "parquet": "image"}[fmt]
    assert image is None or isinstance(features[image], datasets.Image)
    assert any("load_dataset(" in line for line in fmt_.loading("png"))
