"""``<key>`` is derived from ``id`` so that no id can escape its folder; the metadata
keeps the original ``id``. One real run per output format over a manifest of hostile ids
(path traversal, absolute paths, NUL and control characters, bidi overrides, very long ids,
ids differing only in case, dot names, option-like names, non-Latin scripts).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process

HOSTILE_IDS = [
    "../../etc/passwd",
    "../../../../../../../../tmp/zimage-batch-escape",
    "/abs/path",
    "/etc/passwd",
    "a/../../b",
    "a/b/c",
    "a\\..\\..\\b",
    "C:\\Windows\\system32",
    "nul\x00byte",
    "\x00",
    "ctrl\x01char",
    "new\nline",
    "tab\there",
    "cr\rret",
    "\x1b[31mred\x1b[0m",
    "bidi\u202eevil.exe",
    "\u202e",
    "x" * 5000,
    "Cat",
    "cat",
    "CAT",
    ".",
    "..",
    "...",
    ".hidden",
    "-rf",
    "--help",
    "~",
    "~root/x",
    " ",
    "trailing. ",
    "a.b.c.png",
    "file.json",
    "shards/x.tar",
    "一只猫",
    "قطة",
    "🐱🐈‍⬛",
    "e\u0301",  # combining accent: NFD of "é"
    "\u00e9",  # NFC "é"
    "normal-1",
    "normal_2",
    "plain3",
]


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(manifest: Path, output: Path, fmt: str) -> subprocess.CompletedProcess:
    """The CLI in this process, on the module's local cluster (fixture `ray_local`)."""
    workers = "2" if fmt == "files" else "1"  # two workers once; the second run only checks the format
    return cli_in_process("run", "--manifest", str(manifest), "--output", str(output), "--model", "tiny:turbo",
                          "--format", fmt, "--workers", workers, "--shard-size", "10")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """Both runs, one after the other on the module's cluster."""
    assert len(set(HOSTILE_IDS)) == len(HOSTILE_IDS)
    base = tmp_path_factory.mktemp("hostile")
    manifest = base / "manifest.parquet"
    pq.write_table(pa.table({
        "id": HOSTILE_IDS,
        "prompt": [f"hostile id number {i}" for i in range(len(HOSTILE_IDS))],
        "row_number": list(range(len(HOSTILE_IDS))),  # a pass-through column
    }), manifest)
    outputs = {"files": base / "out_files", "webdataset": base / "out_wds"}
    before = _listing(base)
    parent_before = {p.name for p in base.parent.iterdir()}
    escape_marker = Path("/tmp/zimage-batch-escape")
    assert not Path("/abs").exists() and not any(Path("/tmp").glob("zimage-batch-escape*"))
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else None

    started = time.monotonic()
    procs = {fmt: _run(manifest, output, fmt) for fmt, output in outputs.items()}
    elapsed = time.monotonic() - started

    return {
        "base": base, "manifest": manifest, "outputs": outputs, "procs": procs, "before": before,
        "parent_before": parent_before, "escape_marker": escape_marker, "passwd": passwd, "elapsed": elapsed,
    }


def _metadata(output: Path) -> pa.Table:
    files = sorted((output / "metadata").glob("*.parquet"))
    assert files, f"no metadata under {output}"
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-5000:]


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_run_succeeds(runs, fmt):
    _check_ok(runs["procs"][fmt])
    assert f"{len(HOSTILE_IDS)} ok, 0 error" in runs["procs"][fmt].stdout


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_everything_stays_inside_output(runs, fmt):
    _check_ok(runs["procs"][fmt])
    output = runs["outputs"][fmt]
    root = output.resolve()
    for dirpath, dirnames, filenames in os.walk(output, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink(), path
            assert path.resolve().is_relative_to(root), path
            assert name not in (".", "..") and "\x00" not in name, path
    # nothing new beside the outputs, nothing above them, nothing at the absolute paths
    assert _listing(runs["base"]) - runs["before"] <= {
        str(p.relative_to(runs["base"])) for o in runs["outputs"].values() for p in [o, *o.rglob("*")]
    }
    assert {p.name for p in runs["base"].parent.iterdir()} - runs["parent_before"] <= set(), "new entry beside base"
    assert not Path("/abs").exists()
    assert not any(Path("/tmp").glob("zimage-batch-escape*"))
    if runs["passwd"] is not None:
        assert Path("/etc/passwd").read_bytes() == runs["passwd"]


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_metadata_keeps_original_ids_exactly_once(runs, fmt):
    _check_ok(runs["procs"][fmt])
    table = _metadata(runs["outputs"][fmt])
    ids = table.column("id").to_pylist()
    counts = Counter(ids)
    assert set(counts) == set(HOSTILE_IDS), {
        "missing": [i[:80] for i in set(HOSTILE_IDS) - set(counts)],
        "unexpected": [i[:80] for i in set(counts) - set(HOSTILE_IDS)],
    }
    assert [i[:80] for i, n in counts.items() if n != 1] == []
    assert table.num_rows == len(HOSTILE_IDS)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("error").to_pylist()) == {None}
    # the pass-through column still lines up with the original id
    for row_id, number in zip(ids, table.column("row_number").to_pylist()):
        assert HOSTILE_IDS[number] == row_id


def test_files_images_are_relative_distinct_and_match_sha256(runs):
    _check_ok(runs["procs"]["files"])
    output = runs["outputs"]["files"]
    table = _metadata(output)
    images = table.column("image").to_pylist()
    assert len(set(images)) == len(images)
    # distinct even on a case-insensitive file system (Cat / cat / CAT)
    assert len({i.lower() for i in images}) == len(images)
    on_disk = {str(p.relative_to(output)) for p in (output / "images").rglob("*") if p.is_file()}
    assert on_disk == set(images), "orphan or missing image files"
    for row_id, image, sha in zip(table.column("id").to_pylist(), images, table.column("sha256").to_pylist()):
        rel = PurePosixPath(image)
        assert not rel.is_absolute() and ".." not in rel.parts and image.isprintable(), (row_id[:80], image)
        assert rel.parts[0] == "images" and len(rel.parts) == 3, image
        assert not rel.name.startswith(("-", ".")), image  # never read as an option or a hidden file
        path = output / image
        assert path.is_file() and not path.is_symlink(), image
        assert path.resolve().is_relative_to(output.resolve()), image
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, (row_id[:80], image)


def test_webdataset_members_are_safe_and_readable(runs):
    import webdataset as wds

    _check_ok(runs["procs"]["webdataset"])
    output = runs["outputs"]["webdataset"]
    table = _metadata(output)
    sha_by_id = dict(zip(table.column("id").to_pylist(), table.column("sha256").to_pylist()))
    tars = sorted((output / "shards").glob("*.tar"))
    assert tars

    # the raw members: plain files, flat names, no traversal
    members = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                assert m.isfile(), m.name
                assert "/" not in m.name and "\\" not in m.name and not m.name.startswith((".", "-")), m.name
                assert m.name.isprintable(), repr(m.name)
                members.append(m.name)
    assert len(members) == len(set(members)) == 3 * len(HOSTILE_IDS)  # <key>.png, <key>.txt, <key>.json

    # read back the way a training dataloader would
    seen = Counter()
    dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)
    for sample in dataset:
        meta = json.loads(sample["json"])
        seen[meta["id"]] += 1
        assert sample["txt"].decode("utf-8") == meta["prompt"]  # the caption
        image_ext = next(k for k in sample if not k.startswith("__") and k not in ("json", "txt"))
        image = sample[image_ext]
        assert hashlib.sha256(image).hexdigest() == sha_by_id[meta["id"]], meta["id"][:80]
        from PIL import Image

        with Image.open(io.BytesIO(image)) as im:
            assert im.size[0] > 0 and im.size[1] > 0
    assert set(seen) == set(HOSTILE_IDS)
    assert all(n == 1 for n in seen.values()), [i[:80] for i, n in seen.items() if n != 1]
