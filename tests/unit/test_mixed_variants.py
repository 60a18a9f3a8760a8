"""A manifest whose rows name different variants: one worker pool per variant, exactly once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process


def _manifest(path, start: int, n: int) -> list[str]:
    ids = [f"m-{i:04d}" for i in range(start, start + n)]
    variants = [("base" if i % 4 == 0 else ("turbo" if i % 4 == 1 else None)) for i in range(start, start + n)]
    steps = [6 if v == "base" else None for v in variants]
    pq.write_table(pa.table({"id": ids, "prompt": [f"a lantern #{i}" for i in range(start, start + n)],
                             "variant": pa.array(variants, pa.string()),
                             "num_inference_steps": pa.array(steps, pa.int64())}), path)
    return ids


def _commit_everything(manifest_path) -> dict:
    """Commit markers for every shard of a fresh plan, as workers write them (no Ray)."""
    from zimage_batch.inputs.identity import rows_digest, rows_of_variant
    from zimage_batch.inputs.manifest import open_manifest
    from zimage_batch.output.ledger import CommitMarker
    from zimage_batch.run.plan import make_plan

    manifest = open_manifest(str(manifest_path))
    committed = {}
    for shard in make_plan(manifest, {}, 10, "turbo").todo:
        table = manifest.read_rows(manifest.files[0], shard.start, shard.end)
        if shard.variant is not None:
            table = rows_of_variant(table, shard.variant, "turbo")
        committed[shard.name] = CommitMarker(
            shard=shard.name, file=shard.file, start=shard.start, end=shard.end, variant=shard.variant,
            rows=table.num_rows, ok=table.num_rows, error=0, digest=rows_digest(table), fingerprint="f", format="files")
    return committed


def test_a_resumed_mixed_variant_plan_runs_only_the_new_rows_of_each_variant(tmp_path):
    """The resume of the drill above, planned without Ray: with every shard of both variants
    committed, appended rows of both variants are all that is planned, each on its variant, in
    new shards; a committed base row that changed is refused."""
    from zimage_batch.inputs.manifest import open_manifest
    from zimage_batch.run.plan import JobMismatch, make_plan

    manifest = tmp_path / "m.parquet"
    _manifest(manifest, 0, 30)
    committed = _commit_everything(manifest)
    assert sorted(n for n in committed if n.endswith("-base")) and len(committed) == 6
    assert make_plan(open_manifest(str(manifest)), committed, 10, "turbo").todo == []

    extra = tmp_path / "extra.parquet"
    _manifest(extra, 30, 12)
    pq.write_table(pa.concat_tables([pq.read_table(manifest), pq.read_table(extra)]), manifest)
    todo = make_plan(open_manifest(str(manifest)), committed, 10, "turbo").todo
    assert not {s.name for s in todo} & set(committed)
    assert [(s.start, s.end, s.variant, s.num_rows) for s in todo] == [
        (30, 40, "turbo", 8), (40, 42, "turbo", 1), (30, 40, "base", 2), (40, 42, "base", 1)]

    table = pq.read_table(manifest)
    prompts = table.column("prompt").to_pylist()
    prompts[4] = "a changed base row"  # m-0004 runs on base
    pq.write_table(table.set_column(1, "prompt", pa.array(prompts)), manifest)
    with pytest.raises(JobMismatch, match="changed since shard"):
        make_plan(open_manifest(str(manifest)), committed, 10, "turbo")


def test_a_variant_without_a_model_is_refused(tmp_path):
    folder = tmp_path / "model"
    from zimage_batch.model.tiny import make_tiny_model

    make_tiny_model(folder, "turbo")
    manifest = tmp_path / "m.parquet"
    _manifest(manifest, 0, 8)
    result = cli_in_process("run", "--manifest", str(manifest), "--output", str(tmp_path / "o"), "--model", str(folder))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "variant 'base'" in result.stderr and "models.base" in result.stderr
    assert not (tmp_path / "o").exists()


def test_images_to_generate_are_counted_per_variant_shard(tmp_path):
    """The cost line's images: each row's num_images (the job's where empty), and of the planned
    shards only their own variant's rows."""
    from zimage_batch.inputs.identity import variant_mask
    from zimage_batch.inputs.manifest import open_manifest
    from zimage_batch.run.estimate import count_images
    from zimage_batch.run.plan import make_plan

    manifest = tmp_path / "m.parquet"
    _manifest(manifest, 0, 12)  # base at 0, 4, 8; the rest turbo (named or the job's)
    table = pq.read_table(manifest)
    counts = [1 + i % 3 if i % 2 else None for i in range(12)]  # the job's 2 where empty
    pq.write_table(table.append_column("num_images", pa.array(counts, pa.int64())), manifest, row_group_size=5)
    opened = open_manifest(str(manifest))  # read in batches that cut across the shards
    base = np.asarray(variant_mask(pq.read_table(manifest), "base", "turbo"))
    assert base.tolist() == [i % 4 == 0 for i in range(12)]
    todo = make_plan(opened, {}, 10, "turbo").todo
    assert sorted((s.start, s.variant) for s in todo) == [(0, "base"), (0, "turbo"), (10, "turbo")]
    images = [c or 2 for c in counts]
    assert count_images(opened, 2, todo, "turbo") == (sum(images), sum(images))
    only_base = [s for s in todo if s.variant == "base"]
    assert count_images(opened, 2, only_base, "turbo") == (sum(images), sum(images[i] for i in (0, 4, 8)))
