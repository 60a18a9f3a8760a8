"""The streaming duplicate-id check: digests, not ids, so 10^8 rows fit a small driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.inputs import ids as ids_module
from zimage_batch.inputs.ids import IdDigests, find_duplicates, id_digests
from zimage_batch.inputs.manifest import ManifestError, open_manifest
from zimage_batch.inputs.validation import Limits, validate_manifest

LIMITS = Limits("turbo", 64, 64, 8, 0.0)
HOSTILE = ["a", "a\x00", "\x00a", "A", "../x", "中文", "中文 ", "x" * 5000, "\u202eevil", "b" * 70 + "/" + "c" * 3]


def test_equal_ids_give_equal_digests_however_the_arrays_are_cut():
    rng = np.random.default_rng(1)
    ids = [f"id-{rng.integers(1 << 40)}-{'é' * int(rng.integers(4))}" for _ in range(2000)] + HOSTILE
    whole = id_digests(pa.array(ids))
    assert len(set(whole.tolist())) == len(set(ids))  # no collision among distinct ids
    sliced = np.concatenate([id_digests(pa.array(ids).slice(i, 333)) for i in range(0, len(ids), 333)])
    chunked = id_digests(pa.chunked_array([ids[:7], ids[7:]], pa.string()))
    large = id_digests(pa.array(ids, pa.large_string()))
    assert np.array_equal(whole, sliced) and np.array_equal(whole, chunked) and np.array_equal(whole, large)
    assert id_digests(pa.array(["a", "a"]))[0] == id_digests(pa.array(["zz", "a"]))[1]


def test_ids_longer_than_a_hashing_chunk_are_hashed_whole(monkeypatch):
    """At a chunk of 4 KiB: the same cut as at the real 4 MiB, without building 4 Mi weights first."""
    monkeypatch.setattr(ids_module, "CHUNK_BYTES", 1 << 12)
    long_a, long_b = "q" * (ids_module.CHUNK_BYTES + 10), "q" * (ids_module.CHUNK_BYTES + 9) + "r"
    d = id_digests(pa.array(["x", long_a, long_b, long_a, "y"]))
    assert d[1] == d[3] and len({d[0], d[1], d[2], d[4]}) == 4


def test_candidates_are_the_repeated_digests():
    digests = IdDigests(6)
    digests.add(pa.array(["a", "b", "c"]))
    digests.add(pa.array(["b", "d", "b"]))
    assert digests.candidates().tolist() == id_digests(pa.array(["b"])).tolist()


def test_a_digest_shared_by_different_ids_is_not_a_duplicate():
    """What a digest collision looks like to the second pass: rows with that digest whose ids differ."""
    ids = pa.array(["only-once", "other"])
    candidates = np.sort(id_digests(ids))  # as if each digest had been seen twice
    found, total = find_duplicates(candidates, lambda: iter([("m.parquet", 0, ids)]), 5)
    assert found == [] and total == 0


def test_duplicates_are_named_with_file_and_row_across_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "x" * 300, "c"], "prompt": ["p"] * 4}), folder / "one.parquet")
    pq.write_table(pa.table({"id": ["d", "b", "x" * 300] + [f"u{i}" for i in range(100)], "prompt": ["p"] * 103}),
                   folder / "two.parquet", row_group_size=10)
    with pytest.raises(ManifestError) as refused:
        validate_manifest(open_manifest(str(folder)), LIMITS)
    message = str(refused.value)
    assert message.startswith(f"{folder}: column 'id' has duplicate ids: 'b' (one.parquet row 1, two.parquet row 1), ")
    assert "(one.parquet row 2, two.parquet row 2)" in message and "more" not in message


def test_many_duplicates_are_counted(tmp_path):
    ids = [f"r{i % 40}" for i in range(100)]
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * 100}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"'r0' \(m.parquet row 0, m.parquet row 40, m.parquet row 80\).* and 35 more"):
        validate_manifest(open_manifest(str(tmp_path / "m.parquet")), LIMITS)


def test_unique_ids_pass(tmp_path):
    pq.write_table(pa.table({"id": HOSTILE + [f"u{i}" for i in range(5000)], "prompt": ["p"] * (len(HOSTILE) + 5000)}),
                   tmp_path / "m.parquet")
    assert validate_manifest(open_manifest(str(tmp_path / "m.parquet")), LIMITS) == {"turbo"}
