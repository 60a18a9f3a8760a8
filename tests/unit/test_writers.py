import io
import json
import math
import os
import tarfile
import tempfile
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zimage_batch.output.encoding import Encoding
from zimage_batch.output.keys import safe_key
from zimage_batch.output.writers import (
    IMAGE_FORMATS,
    FilesWriter,
    ParquetWriter,
    WebDatasetWriter,
    encode_image,
    make_writer,
)
from zimage_batch.storage import LocalStorage, open_storage

N = 20
SHARD = "shard-00003"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    try:
        bucket = request.getfixturevalue("s3_bucket")
    except pytest.FixtureLookupError:
        pytest.skip("no s3_bucket fixture (tests/conftest.py)")
    uri = bucket if isinstance(bucket, str) and bucket.startswith("s3://") else f"s3://{bucket}"
    return open_storage(f"{uri.rstrip('/')}/writers-{uuid.uuid4().hex[:8]}")


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Route the writers' temp files to a folder the test can inspect."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _pixels(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _samples(n: int = N, image_format: str = "png", quality: int = 95):
    out = []
    for i in range(n):
        row_id = f"行/{i:03d} 中文提示词 ../{'x' if i % 2 else 'X'}"
        meta = {
            "id": row_id,
            "prompt": f"一只猫坐在窗台上，第{i}张 🐱",
            "seed": np.int64(1000 + i),
            "width": 32,
            "height": 24,
            "guidance_scale": 4.5,
            "tags": ["水彩", "夜景"],
            "nan_value": float("nan"),
        }
        out.append((safe_key(row_id), encode_image(_pixels(i), image_format, quality), meta))
    return out


def _read_tar(storage, key, tmp_path) -> str:
    """A local path of the tar, downloading it from S3 if needed."""
    if isinstance(storage, LocalStorage):
        return storage.url(key)
    local = tmp_path / "download" / os.path.basename(key)
    storage.download(key, local)
    return str(local)


# ------------------------------------------------------------------------------ encode_image
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image(fmt):
    px = _pixels(1, 48, 64)
    data = encode_image(px, fmt, quality=90)
    assert data == encode_image(px, fmt, quality=90)  # deterministic bytes
    img = Image.open(io.BytesIO(data))
    assert img.format == IMAGE_FORMATS[fmt].pil_format
    assert img.size == (64, 48) and img.mode == "RGB"
    if fmt == "png":
        assert np.array_equal(np.asarray(img), px)
    assert encode_image(Image.fromarray(px), fmt, quality=90) == data


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_matters_for_lossy(fmt):
    px = np.asarray(Image.fromarray(_pixels(2, 64, 64)).resize((256, 256)))
    assert len(encode_image(px, fmt, quality=20)) < len(encode_image(px, fmt, quality=95))


def test_encode_image_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif")
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "jpeg", quality=0)
    # non-RGB PIL images are converted
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert Image.open(io.BytesIO(encode_image(rgba))).mode == "RGB"


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_files_roundtrip(storage, image_format, private_tempdir):
    samples = _samples(image_format=image_format, quality=80)
    w = make_writer("files", storage, SHARD, encoding=Encoding.of(image_format, 80))
    assert isinstance(w, FilesWriter)
    ext = IMAGE_FORMATS[image_format].ext
    locations = [w.add(k, data, meta) for k, data, meta in samples]
    w.close()
    assert locations == [f"images/{SHARD}/{k}.{ext}" for k, _, _ in samples]
    for loc, (_, data, _) in zip(locations, samples):
        assert storage.get_bytes(loc) == data
        assert Image.open(io.BytesIO(storage.get_bytes(loc))).format == IMAGE_FORMATS[image_format].pil_format
    assert sorted(o.key for o in storage.list("images/")) == sorted(locations)
    assert list(private_tempdir.iterdir()) == []


def test_files_upload_error_raised(tmp_path):
    class Flaky(LocalStorage):
        def put_bytes(self, key, data):
            if key.endswith(f"{bad}.png"):
                raise OSError("disk on fire")
            super().put_bytes(key, data)

    samples = _samples(6)
    bad = samples[2][0]
    w = FilesWriter(Flaky(str(tmp_path / "out")), SHARD, upload_threads=2)
    with pytest.raises(OSError, match="disk on fire"):
        for k, data, meta in samples:
            w.add(k, data, meta)
        w.close()
    w.abort()
    assert w.closed


def test_files_uploads_overlap_and_bounded(tmp_path):
    """add() does not wait for uploads, but blocks once max_pending are queued."""
    gate = threading.Event()

    class Gated(LocalStorage):
        def put_bytes(self, key, data):
            gate.wait(10)
            super().put_bytes(key, data)

    w = make_writer("files", Gated(str(tmp_path / "out")), SHARD, upload_threads=2, max_pending=3)
    samples = _samples(5)
    done = []

    def feed():
        for k, data, meta in samples:
            w.add(k, data, meta)
            done.append(k)

    t = threading.Thread(target=feed)
    t.start()
    time.sleep(0.3)
    assert len(done) == 3  # three queued, none stored yet, the fourth add waits
    assert list(w.storage.list("images/")) == []
    gate.set()
    t.join(10)
    w.close()
    assert len(done) == 5
    assert len(list(w.storage.list("images/"))) == 5


def test_json_metadata_types(tmp_path):
    import datetime

    import pandas as pd

    st = LocalStorage(str(tmp_path / "out"))
    meta = {
        "id": "x", "na": pd.NA, "nat": pd.NaT, "inf": float("-inf"), "np_nan": np.float64("nan"),
        "arr": np.arange(3), "i32": np.int32(7), "b": True, "none": None, 3: "int key",
        "when": datetime.datetime(2024, 5, 1, 12, 0), "ts": pd.Timestamp("2024-05-01"),
        "raw": b"\x01\xff", "nested": {"z": [1.5, float("nan")], "a": "中"}, "tags": {"b", "a"},
    }
    w = make_writer("webdataset", st, SHARD, upload_threads=3)  # files-only tuning is ignored
    w.add("x", b"img", meta)
    w.close()
    with tarfile.open(st.url(f"shards/{SHARD}.tar")) as tf:
        doc = json.loads(tf.extractfile("x.json").read().decode("utf-8"))
    assert doc == {
        "id": "x", "na": None, "nat": None, "inf": None, "np_nan": None, "arr": [0, 1, 2], "i32": 7,
        "b": True, "none": None, "3": "int key", "when": "2024-05-01T12:00:00",
        "ts": "2024-05-01T00:00:00", "raw": "01ff", "nested": {"z": [1.5, None], "a": "中"},
        "tags": ["a", "b"],
    }


# ------------------------------------------------------------------------------ webdataset
@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_webdataset_roundtrip(storage, image_format, tmp_path, private_tempdir):
    import webdataset as wds

    samples = _samples(image_format=image_format, quality=85)
    w = make_writer("webdataset", storage, SHARD, encoding=Encoding.of(image_format, 85))
    assert isinstance(w, WebDatasetWriter)
    ext = IMAGE_FORMATS[image_format].ext
    locations = [w.add(k, data, meta) for k, data, meta in samples]
    assert not storage.exists(f"shards/{SHARD}.tar")  # nothing visible before close
    w.close()
    assert locations == [f"shards/{SHARD}.tar#{k}.{ext}" for k, _, _ in samples]
    assert [o.key for o in storage.list("shards/")] == [f"shards/{SHARD}.tar"]  # the one object
    assert list(private_tempdir.iterdir()) == []

    path = _read_tar(storage, f"shards/{SHARD}.tar", tmp_path)
    got = list(wds.WebDataset(path, shardshuffle=False))
    assert [s["__key__"] for s in got] == [k for k, _, _ in samples]
    for s, (k, data, meta) in zip(got, samples):
        assert set(s) >= {ext, "txt", "json"}
        assert s[ext] == data
        assert s["txt"].decode("utf-8") == meta["prompt"]  # the caption training loaders read
        Image.open(io.BytesIO(s[ext])).load()
        text = s["json"].decode("utf-8")
        assert "一只猫" in text  # not \u-escaped
        doc = json.loads(text)
        assert doc["id"] == meta["id"] and doc["prompt"] == meta["prompt"]
        assert doc["seed"] == int(meta["seed"]) and doc["tags"] == meta["tags"]
        assert doc["nan_value"] is None  # strict JSON: NaN becomes null
        assert list(doc) == sorted(doc)

    # deterministic tar headers
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == [n for k, _, _ in samples for n in (f"{k}.{ext}", f"{k}.txt", f"{k}.json")]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isfile()


def test_webdataset_is_deterministic(tmp_path):
    a, b = LocalStorage(str(tmp_path / "a")), LocalStorage(str(tmp_path / "b"))
    samples = _samples(4)
    for st in (a, b):
        with make_writer("webdataset", st, SHARD) as w:
            for k, data, meta in samples:
                w.add(k, data, meta)
    assert a.get_bytes(f"shards/{SHARD}.tar") == b.get_bytes(f"shards/{SHARD}.tar")


# ------------------------------------------------------------------------------ parquet
@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_parquet_roundtrip(storage, image_format, tmp_path, private_tempdir):
    samples = _samples(image_format=image_format, quality=85)
    fields = pa.schema([("seed", pa.int64()), ("width", pa.int64()), ("guidance_scale", pa.float64()),
                        ("tags", pa.list_(pa.string())), ("nan_value", pa.float64())])
    w = make_writer("parquet", storage, SHARD, encoding=Encoding.of(image_format, 85), fields=fields)
    assert isinstance(w, ParquetWriter)
    w.ROW_GROUP_ROWS = 7  # exercise several row groups
    locations = [w.add(k, data, meta) for k, data, meta in samples]
    assert not storage.exists(f"data/{SHARD}.parquet")
    w.close()
    assert locations == [f"data/{SHARD}.parquet#{k}" for k, _, _ in samples]
    assert list(private_tempdir.iterdir()) == []

    local = tmp_path / "dl.parquet"
    local.write_bytes(storage.get_bytes(f"data/{SHARD}.parquet"))
    pf = pq.ParquetFile(local)
    assert pf.metadata.num_row_groups == 3
    table = pf.read()
    assert table.schema.names == ["__key__", "id", "image", "prompt", "seed", "width", "guidance_scale", "tags",
                                  "nan_value"]
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = table.to_pylist()
    assert [r["__key__"] for r in rows] == [k for k, _, _ in samples]
    ext = IMAGE_FORMATS[image_format].ext
    for r, (k, data, meta) in zip(rows, samples):
        assert r["id"] == meta["id"] and r["prompt"] == meta["prompt"] and r["seed"] == meta["seed"]
        assert r["image"] == {"bytes": data, "path": f"{k}.{ext}"}
        assert r["tags"] == meta["tags"] and math.isnan(r["nan_value"])  # a float column keeps NaN
        Image.open(io.BytesIO(r["image"]["bytes"])).load()
    # the Hugging Face features travel in the schema metadata: image is an Image
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["seed"] == {"dtype": "int64", "_type": "Value"}
    assert features["tags"] == {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}
    # also readable straight through the storage's arrow filesystem
    fs, root = storage.arrow_fs()
    assert [i["bytes"] for i in pq.read_table(f"{root}/data/{SHARD}.parquet", filesystem=fs).column("image").to_pylist()] == [
        data for _, data, _ in samples
    ]


def test_parquet_loads_with_datasets_as_images(tmp_path):
    """`datasets.load_dataset("parquet")` decodes the image column to PIL from the schema metadata alone."""
    datasets = pytest.importorskip("datasets")
    st = LocalStorage(str(tmp_path / "out"))
    samples = _samples(4)
    with make_writer("parquet", st, SHARD) as w:
        for k, data, meta in samples:
            w.add(k, data, meta)
    ds = datasets.load_dataset("parquet", data_files=st.url(f"data/{SHARD}.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    for row, (_, data, meta) in zip(ds, samples):
        assert isinstance(row["image"], Image.Image) and np.array_equal(np.asarray(row["image"]), _pixels_of(data))
        assert row["prompt"] == meta["prompt"] and row["seed"] == meta["seed"] and row["guidance_scale"] == 4.5


def _pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_webdataset_captions_read_the_way_training_loaders_read_them(tmp_path):
    import webdataset as wds

    st = LocalStorage(str(tmp_path / "out"))
    samples = _samples(3)
    with make_writer("webdataset", st, SHARD) as w:
        for k, data, meta in samples:
            w.add(k, data, meta)
    got = list(wds.WebDataset(st.url(f"shards/{SHARD}.tar"), shardshuffle=False).decode("pil").to_tuple("png;jpg;webp", "txt"))
    assert [txt for _, txt in got] == [meta["prompt"] for _, _, meta in samples]
    assert all(isinstance(img, Image.Image) for img, _ in got)


# ------------------------------------------------------------------------------ common
@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_make_writer_takes_an_image_format_s_name_as_its_encoding(fmt, tmp_path):
    w = make_writer(fmt, LocalStorage(str(tmp_path / "out")), SHARD, "jpeg")  # positional, as a name
    assert w.encoding == Encoding.of("jpeg") and w.ext == "jpg"
    w.abort()
    with pytest.raises(ValueError):
        make_writer(fmt, LocalStorage(str(tmp_path / "out")), SHARD, "gif")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_abort_leaves_no_temp_files(fmt, tmp_path, private_tempdir):
    st = LocalStorage(str(tmp_path / "out"))
    w = make_writer(fmt, st, SHARD)
    for k, data, meta in _samples(3):
        w.add(k, data, meta)
    w.abort()
    w.abort()  # idempotent
    assert list(private_tempdir.iterdir()) == []
    if fmt != "files":
        assert list(st.list()) == []
    with pytest.raises(RuntimeError):
        w.add("k", b"x", {})
    with pytest.raises(RuntimeError):
        w.close()


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_context_manager_aborts_on_error(fmt, tmp_path, private_tempdir):
    st = LocalStorage(str(tmp_path / "out"))
    with pytest.raises(KeyError):
        with make_writer(fmt, st, SHARD) as w:
            k, data, meta = _samples(1)[0]
            w.add(k, data, meta)
            raise KeyError("boom")
    assert w.closed
    assert list(private_tempdir.iterdir()) == []
    if fmt != "files":
        assert list(st.list()) == []


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_empty_shard_still_written(fmt, tmp_path):
    st = LocalStorage(str(tmp_path / "out"))
    w = make_writer(fmt, st, SHARD)
    w.close()
    (key,) = [o.key for o in st.list()]  # the one object, empty
    assert key == (f"data/{SHARD}.parquet" if fmt == "parquet" else f"shards/{SHARD}.tar")
    if fmt == "parquet":
        t = pq.read_table(st.url(key))
        assert t.num_rows == 0 and t.schema.names[:4] == ["__key__", "id", "image", "prompt"]
    else:
        with tarfile.open(st.url(key)) as tf:
            assert tf.getmembers() == []


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_validation(fmt, tmp_path):
    st = LocalStorage(str(tmp_path / "out"))
    for bad_shard in ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "x\x00", "中"]:
        with pytest.raises(ValueError):
            make_writer(fmt, st, bad_shard)
    with pytest.raises(ValueError):
        make_writer(fmt, st, SHARD, encoding=Encoding.of("bmp"))
    make_writer(fmt, st, "-part-1e86f37d-0000000000").abort()  # plan.shard_name can start with "-"
    w = make_writer(fmt, st, SHARD)
    for bad_key in ["", "a.b", "a/b", "../x", "-x", "x\x00", "é"]:
        with pytest.raises(ValueError):
            w.add(bad_key, b"x", {"id": "x"})
    w.add("ok", b"x", {"id": "x"})
    with pytest.raises(ValueError, match="duplicate"):
        w.add("ok", b"y", {"id": "x"})
    with pytest.raises(TypeError):
        w.add("ok2", "not bytes", {"id": "x"})
    w.close()
    assert len(w) == 1 and w.keys == ["ok"]


def test_make_writer_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="files"):
        make_writer("zip", LocalStorage(str(tmp_path)), SHARD)
