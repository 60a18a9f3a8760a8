"""The duplicate-id check beyond its memory budget: digests spilled to scratch files by their
top bits, each file sorted alone, duplicates still found across files and partitions, digest
collisions still re-checked against the real ids, and the spill files removed."""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch import scratch
from zimage_batch.inputs import ids as ids_module
from zimage_batch.inputs.ids import IdDigests, id_digests, partitions_for
from zimage_batch.inputs.manifest import ManifestError, open_manifest
from zimage_batch.inputs.validation import Limits, validate_manifest

LIMITS = Limits("turbo", 64, 64, 8, 0.0)
BUDGET = 8 * 16  # sixteen digests in memory


@pytest.fixture
def tiny_budget(tmp_path, monkeypatch):
    """A budget of sixteen digests, and a TMPDIR of the test's own (to see the spill files)."""
    monkeypatch.setattr(ids_module, "MEMORY_BUDGET", BUDGET)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


def spill_files(tmp: object) -> list:
    return sorted(p for p in scratch.root().rglob("*.u64")) if scratch.root().exists() else []


def test_spilled_digests_give_the_same_candidates_as_in_memory(tiny_budget):
    rng = np.random.default_rng(3)
    values = [f"id-{int(v)}" for v in rng.integers(0, 300, 1000)]  # many repeats, all over the digest space
    in_memory = IdDigests(len(values), budget=len(values) * 8)
    spilled = IdDigests(len(values))
    assert in_memory.spill is None and spilled.spill is not None and len(spilled.digests) == BUDGET // 8
    for lo in range(0, len(values), 37):
        in_memory.add(pa.array(values[lo:lo + 37]))
        spilled.add(pa.array(values[lo:lo + 37]))
    assert len(spill_files(tiny_budget)) == partitions_for(len(values), BUDGET) > 2
    expected = in_memory.candidates()
    assert len(expected) > 100 and np.array_equal(spilled.candidates(), expected)
    assert spill_files(tiny_budget) == []  # read back and removed


def test_unique_ids_pass_through_the_spill_and_leave_no_file(tiny_budget, tmp_path):
    pq.write_table(pa.table({"id": [f"u{i}" for i in range(500)], "prompt": ["p"] * 500}), tmp_path / "m.parquet",
                   row_group_size=50)
    assert validate_manifest(open_manifest(str(tmp_path / "m.parquet")), LIMITS) == {"turbo"}
    assert spill_files(tiny_budget) == []


def test_duplicates_across_files_and_partitions_are_named_after_a_spill(tiny_budget, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    first = [f"a{i}" for i in range(200)]
    second = [f"b{i}" for i in range(200)] + ["a7", "a150"]
    pq.write_table(pa.table({"id": first, "prompt": ["p"] * len(first)}), folder / "one.parquet", row_group_size=30)
    pq.write_table(pa.table({"id": second, "prompt": ["p"] * len(second)}), folder / "two.parquet", row_group_size=30)
    top = id_digests(pa.array(["a7", "a150"])) >> np.uint64(64 - 4)
    assert top[0] != top[1]  # (the two duplicates spill to different partitions)
    with pytest.raises(ManifestError) as refused:
        validate_manifest(open_manifest(str(folder)), LIMITS)
    message = str(refused.value)
    assert "'a7' (one.parquet row 7, two.parquet row 200)" in message
    assert "'a150' (one.parquet row 150, two.parquet row 201)" in message
    assert spill_files(tiny_budget) == []


def test_forced_digest_collisions_are_rechecked_against_the_real_ids(tiny_budget, tmp_path, monkeypatch):
    """A test hook weakens the digest to 6 bits: nearly every row collides with others, in
    every partition; only the real duplicate is refused."""
    real = ids_module.id_digests
    monkeypatch.setattr(ids_module, "id_digests", lambda ids: real(ids) & np.uint64(0xF000_0000_0000_0003))
    unique = [f"u{i}" for i in range(300)]
    pq.write_table(pa.table({"id": unique, "prompt": ["p"] * 300}), tmp_path / "ok.parquet", row_group_size=40)
    assert validate_manifest(open_manifest(str(tmp_path / "ok.parquet")), LIMITS) == {"turbo"}
    pq.write_table(pa.table({"id": unique + ["u42"], "prompt": ["p"] * 301}), tmp_path / "dup.parquet",
                   row_group_size=40)
    with pytest.raises(ManifestError, match=r"duplicate ids: 'u42' \(dup.parquet row 42, dup.parquet row 300\)$"):
        validate_manifest(open_manifest(str(tmp_path / "dup.parquet")), LIMITS)
    assert spill_files(tiny_budget) == []


def test_the_spill_files_are_a_power_of_two_each_about_half_the_budget():
    assert partitions_for(10**9, 256 << 20) == 64
    assert partitions_for(100, 8 * 16) == 16
    assert partitions_for(17, 8 * 16) == 4
