"""The metadata schema: the pipeline's own columns of ``metadata/<shard>.parquet``, in order,
with their Arrow types. The generation settings' columns come from their declaration
(zimage_batch/settings.py); readers and tests rely on the names, order and types. Like the
declaration, it imports no stage: the manifest checks refuse columns of these names."""

from __future__ import annotations

import pyarrow as pa

from zimage_batch.settings import metadata_settings

#: The metadata column of a job that uses num_images: which of its row's images a metadata row is.
IMAGE_INDEX_COLUMN = {"image_index": pa.int64()}

# lineage columns added for edit manifests: where each edited image came from
EDIT_METADATA_COLUMNS = {
    "source": pa.string(),
    "source_sha256": pa.string(),
    "source_width": pa.int64(),
    "source_height": pa.int64(),
    "mode": pa.string(),
    "strength": pa.float64(),
    "mask": pa.string(),
}


def base_columns() -> dict[str, pa.DataType]:
    """The columns of every row, in this order, before the pass-through columns: its outcome,
    then the seed, size and sampler settings that drew it, then variant, model and prompt."""
    return {
        "id": pa.string(),
        "status": pa.string(),
        "error": pa.string(),
        "image": pa.string(),
        "sha256": pa.string(),
        **metadata_settings("sampler"),
        "variant": pa.string(),
        "model": pa.string(),
        "prompt": pa.string(),
        "duration_ms": pa.float64(),
    }


def mask_columns() -> dict[str, pa.DataType]:
    """The columns of an edit job that keeps masks (inputs/mask_spec.masks_used): the stored
    mask's sha256, then the declared mask settings that made it."""
    return {"mask_sha256": pa.string(), **metadata_settings("mask")}


def control_columns() -> dict[str, pa.DataType]:
    """The columns of a job with a ControlNet: the rows' conditions, and each condition's sha256."""
    return {**metadata_settings("control"), "control_sha256": pa.string()}


METADATA_COLUMNS = base_columns()


def metadata_columns(edit: bool, image_index: bool = False, lora: bool = False,
                     control: bool = False, curated: dict[str, pa.DataType] | None = None,
                     expanded: bool = False, masks: bool = False) -> dict[str, pa.DataType]:
    """The pipeline's own metadata columns, in order: image_index after id when the job uses
    num_images, `prompt_original` after `prompt` in a job that expands prompts, the edit lineage
    for edit manifests, `lora` in a job with adapters, the ControlNet conditions in a job with a
    ControlNet, the mask columns in an edit job that keeps masks (mask_spec.masks_used), then a
    curated job's columns (scores, tries, the embedding: `curate.spec.Curation.metadata_columns`)."""
    columns = base_columns()
    if expanded:
        items = list(columns.items())
        at = list(columns).index("prompt") + 1
        columns = dict(items[:at] + [("prompt_original", pa.string())] + items[at:])
    if image_index:
        columns = {"id": columns.pop("id"), **IMAGE_INDEX_COLUMN, **columns}
    columns |= EDIT_METADATA_COLUMNS if edit else {}
    columns |= metadata_settings("lora") if lora else {}  # the resolved set, e.g. 'detail:1.0,style:0.8'; null: none
    columns |= control_columns() if control else {}
    columns |= mask_columns() if edit and masks else {}
    return columns | (curated or {})


def reserved_columns(kind: str, known: set[str]) -> frozenset[str]:
    """The metadata columns the pipeline writes itself for a `prompt` or `edit` manifest, less
    the `known` input columns: a manifest column of such a name would be lost."""
    edit = kind == "edit"
    return frozenset(metadata_columns(edit, image_index=True, control=True, masks=edit).keys() - known)
