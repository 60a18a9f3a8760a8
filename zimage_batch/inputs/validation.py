"""Manifest validation: the schema and every value checked, streaming, before anything is
written or any model loads; a problem is one line naming file, column and the first rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.inputs.column_types import family, not_whole, type_ok
from zimage_batch.inputs.columns import EDIT_COLUMNS, KNOWN_COLUMNS
from zimage_batch.inputs.control import check_control_batch
from zimage_batch.inputs.ids import IdDigests, find_duplicates
from zimage_batch.inputs.lora_spec import check_lora_column
from zimage_batch.inputs.manifest import Manifest, ManifestError, ManifestFile
from zimage_batch.inputs.mask_spec import MaskJob, check_mask_batch, derived_rows
from zimage_batch.inputs.uris import NOT_READABLE, foreign_uris
from zimage_batch.metadata_schema import reserved_columns
from zimage_batch.model.variants import VARIANTS
from zimage_batch.settings import EDIT, INTEGER, SIZE_STEP, STRING, job_settings, select
from zimage_batch.text import first_line

EDIT_MODES = ("img2img", "inpaint", "edit")
MAX_LISTED = 5  # offending rows named in an error message
# metadata columns the pipeline writes itself: a manifest column of that name would be lost
RESERVED_COLUMNS = {kind: reserved_columns(kind, set(KNOWN_COLUMNS)) for kind in ("prompt", "edit")}


@dataclass(frozen=True)
class Limits:
    """What the job allows for rows that leave a value to the defaults."""

    default_variant: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    loras: tuple[str, ...] = ()  # the adapter names the job declares
    controlnet: bool = False  # the job names a ControlNet
    control: str | None = None  # the job's derived condition (canny | tile | none)
    control_image: str | None = None  # the job's condition image
    default_num_images: int = 1
    masks: MaskJob = MaskJob()  # the job's mask settings (derived masks, outpainting)


def validate_manifest(manifest: Manifest, limits: Limits) -> set[str]:
    """Check schema and every value, streaming; raise ManifestError on the first problem.
    Returns the variants the rows run on (rows without one run on the default)."""
    required = ("id", "source", "prompt") if manifest.kind == "edit" else ("id", "prompt")
    for f in manifest.files:
        schema = f.schema
        where = manifest.display_name(f)
        for column in required:
            if column not in schema.names:
                raise ManifestError(f"{where}: required column '{column}' is missing (columns: {', '.join(schema.names)})")
        for field in schema:
            if field.name in RESERVED_COLUMNS[manifest.kind]:
                raise ManifestError(
                    f"{where}: column '{field.name}' is a name the output metadata uses; rename it to keep it"
                )
            if manifest.kind == "prompt" and field.name in EDIT_COLUMNS:
                raise ManifestError(
                    f"{where}: column '{field.name}' belongs to edit manifests, and no file of this manifest "
                    "has a 'source' column (the image to edit); add one, or rename the column to keep it"
                )
            expected = KNOWN_COLUMNS.get(field.name)
            if expected and not type_ok(expected, field.type):
                found = f.stored.field(field.name).type if f.stored is not None else field.type
                expected = "string or integer" if field.name == "id" else expected
                raise ManifestError(f"{where}: column '{field.name}' must be {expected}, found {found}")
    digests = IdDigests(manifest.num_rows)  # 8 bytes an id, not the ids: 10^8 rows fit a small driver
    variants: set[str] = set()
    for f in manifest.files:
        row_offset = 0
        for batch in _readable_batches(manifest, f):
            try:
                _check_batch(manifest.display_name(f), batch, row_offset, limits, manifest.kind)
            except pa.ArrowException as exc:  # e.g. values no check kernel takes: name the file
                raise ManifestError(f"{manifest.display_name(f)}: unusable values ({first_line(exc)})") from None
            digests.add(batch.column("id"))
            if "variant" in batch.schema.names:
                column = pc.cast(batch.column("variant"), pa.string()).fill_null(limits.default_variant)
                variants |= set(pc.unique(column).to_pylist())
            else:
                variants.add(limits.default_variant)
            row_offset += batch.num_rows
    if manifest.num_rows == 0:
        raise ManifestError(f"{manifest.uri}: manifest has no rows")
    _check_unique_ids(manifest, digests)
    return variants


def _readable_batches(manifest: Manifest, f: ManifestFile) -> Iterator[pa.RecordBatch]:
    """The record batches of one file; a file whose data (not just footer) is corrupt is a ManifestError."""
    batches = manifest.iter_batches(f)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(
                f"{manifest.display_name(f)}: not a readable Parquet file ({first_line(exc)})"
            ) from None
        yield batch


def _offending(where: str, column: str, problem: str, batch: pa.RecordBatch, bad: pa.Array, offset: int) -> ManifestError:
    """A one-line error naming the first offending rows by number and id."""
    rows = np.flatnonzero(np.asarray(pc.fill_null(bad, False)))[:MAX_LISTED]
    ids = batch.column("id")
    if family(ids.type) == STRING:  # as bytes: an id may be the text that is not UTF-8
        raw = ids.cast(pa.binary()).take(rows).to_pylist()
        ids = pa.array([None if b is None else b.decode("utf-8", "replace") for b in raw])
    else:
        ids = ids.take(rows)
    named = ", ".join(f"row {offset + int(r)} (id={ids[i].as_py()!r:.60})" for i, r in enumerate(rows))
    count = pc.sum(pc.cast(pc.fill_null(bad, False), pa.int64())).as_py()
    more = f" and {count - len(rows)} more" if count > len(rows) else ""
    return ManifestError(f"{where}: column '{column}' {problem}: {named}{more}")


def _check_batch(where: str, batch: pa.RecordBatch, offset: int, limits: Limits, kind: str) -> None:
    def column(name: str) -> pa.Array | None:
        return batch.column(name) if name in batch.schema.names else None

    def fail_if(name: str, bad: pa.Array, problem: str) -> None:
        if pc.any(pc.fill_null(bad, False)).as_py():
            raise _offending(where, name, problem, batch, bad, offset)

    _check_utf8(where, batch, offset)
    for name, expected in KNOWN_COLUMNS.items():
        values = column(name)
        if values is None:
            continue
        if pa.types.is_uint64(values.type):  # the checks below compare in int64
            fail_if(name, pc.greater(values, pa.scalar(2**63 - 1, pa.uint64())), "has values of 2**63 or more")
        if pa.types.is_floating(values.type):
            fail_if(name, pc.invert(pc.is_finite(values)), "must be a finite number (not NaN or infinity)")
            if expected == INTEGER:  # floats left by column_types.decoded: some are not whole
                fail_if(name, not_whole(values), "must hold whole numbers (below 2**53 when stored as floats)")
    ids = column("id")
    fail_if("id", pc.is_null(ids), "has null ids")
    fail_if("id", pc.equal(pc.utf8_length(ids), 0), "has empty ids")
    fail_if("prompt", pc.is_null(column("prompt")), "has null prompts")
    lora = column("lora")
    if lora is not None:
        check_lora_column(lora, limits.loras, fail_if)
    variant_column = column("variant")
    if variant_column is not None:
        fail_if("variant", _not_in(variant_column, list(VARIANTS)), f"must be one of {'|'.join(VARIANTS)}")
    if kind == "edit":
        fail_if("source", pc.is_null(column("source")), "has null sources")
        fail_if("source", pc.equal(pc.utf8_length(column("source")), 0), "has empty sources")
        for name in ("source", "mask"):
            uris = column(name)
            if uris is not None and not pa.types.is_null(uris.type):
                fail_if(name, foreign_uris(uris), NOT_READABLE)
        mode = column("mode")
        if mode is not None:
            fail_if("mode", _not_in(mode, EDIT_MODES), f"must be one of {'|'.join(EDIT_MODES)}")
        check_mask_batch(batch, limits.masks, fail_if)
        _check_edit_modes(batch, limits, fail_if)
    for name, default in (("width", limits.default_width), ("height", limits.default_height)):
        values = column(name)
        if values is None:
            continue
        fail_if(name, pc.not_equal(pc.bit_wise_and(values, SIZE_STEP - 1), 0), f"has sizes that are not multiples of {SIZE_STEP}")
        lowest, highest = _side_limits(variant_column, limits, batch.num_rows)
        fail_if(name, pc.or_(pc.less(values, lowest), pc.greater(values, highest)),
                f"has sizes beyond the model's limits ({_limits_text(variant_column, limits)})")
    _check_bounds(batch, kind, fail_if)
    if limits.controlnet or {s.name for s in job_settings("control")} & set(batch.schema.names):
        check_control_batch(batch, limits, fail_if)
    _check_num_images(column("num_images"), column("seed"), limits, fail_if)


_COMPARE = {"lt": pc.less, "le": pc.less_equal, "gt": pc.greater}


def _check_bounds(batch: pa.RecordBatch, kind: str, fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Each declared setting's column within its bounds (zimage_batch/settings.py; a boolean
    column is a switch; the ControlNet's columns are checked with the job's ControlNet)."""
    for s in select(lambda s: s.column is not None and s.group != "control" and bool(s.refusals())):
        if s.name not in batch.schema.names or (kind != "edit" and s.manifests == EDIT):
            continue
        values = batch.column(s.name)
        if pa.types.is_boolean(values.type) or pa.types.is_null(values.type):
            continue
        for comparison, message in s.refusals():
            if comparison == "in":
                bad = pc.or_(pc.less_equal(values, s.minimum), pc.greater(values, s.maximum))
            else:
                bad = _COMPARE[comparison](values, s.maximum if comparison == "gt" else s.minimum)
            fail_if(s.name, bad, message)


def _check_num_images(num_images: pa.Array | None, seed: pa.Array | None, limits: Limits,
                      fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Image k's seed (seed + k) fits int64 (num_images' bounds are declared: _check_bounds)."""
    if seed is None or pa.types.is_null(seed.type):
        return
    count = pa.array([limits.default_num_images] * len(seed), pa.int64()) if num_images is None else \
        pc.fill_null(pc.cast(num_images, pa.int64()), limits.default_num_images)
    room = pc.subtract(pa.scalar(2**63 - 1, pa.int64()), pc.cast(seed, pa.int64()))  # seed >= 0: no overflow
    fail_if("seed", pc.greater(pc.subtract(count, 1), room),
            "leaves no room for its images' seeds (image k uses seed + k, which must stay below 2**63)")


def _check_utf8(where: str, batch: pa.RecordBatch, offset: int) -> None:
    """Text must be valid UTF-8 (files written by other tools may hold raw bytes in string columns)."""
    try:
        batch.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for name, values in zip(batch.schema.names, batch.columns):
        try:
            values.validate(full=True)
            continue
        except pa.ArrowInvalid as exc:
            problem = f"holds invalid data ({first_line(exc)})"
        if family(values.type) == STRING:
            raw = values.cast(pa.binary()).to_pylist()
            bad = pa.array([_not_utf8(b) for b in raw])
            if pc.any(bad).as_py():
                raise _offending(where, name, "has text that is not valid UTF-8", batch, bad, offset)
        raise ManifestError(f"{where}: column '{name}' {problem}")


def _not_utf8(data: bytes | None) -> bool:
    if data is None:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _not_in(values: pa.Array, allowed: Sequence[str]) -> pa.Array:
    """True where a value is set and not allowed (a null takes the job default)."""
    if pa.types.is_null(values.type):
        return pc.is_valid(values)  # all null
    return pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(allowed, type=values.type))))


def _check_edit_modes(batch: pa.RecordBatch, limits: Limits, fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Each row's mode (given, or inferred: a mask means inpaint, an editing variant means edit,
    else img2img) must be one the row's variant (or the job's) does, and inpaint rows need a mask."""
    n = batch.num_rows
    mask = batch.column("mask") if "mask" in batch.schema.names else pa.nulls(n, pa.string())
    has_mask = pc.fill_null(pc.greater(pc.utf8_length(pc.cast(mask, pa.string())), 0), False)
    has_mask = pc.or_(has_mask, derived_rows(batch, limits.masks))  # alpha, words, canvases: inpaint
    given = batch.column("mode") if "mode" in batch.schema.names else pa.nulls(n, pa.string())
    given = pc.cast(given, pa.string())
    variants = batch.column("variant") if "variant" in batch.schema.names else pa.nulls(n, pa.string())
    variants = pc.fill_null(pc.cast(variants, pa.string()), limits.default_variant)
    for name in pc.unique(variants).to_pylist():
        variant = VARIANTS[name]
        mine = pc.equal(variants, name)
        mode = pc.coalesce(given, pc.if_else(has_mask, "inpaint", "edit" if "edit" in variant.tasks else "img2img"))
        supported = [m for m in EDIT_MODES if m in variant.tasks]
        fail_if("mode", pc.and_(mine, pc.invert(pc.is_in(mode, pa.array(supported)))),
                f"asks for modes the {variant.name} variant does not do (it does {'|'.join(supported)})")
        fail_if("mask", pc.and_(mine, pc.and_(pc.equal(mode, "inpaint"), pc.invert(has_mask))),
                "is missing for inpaint rows")


def _side_limits(variant_column: pa.Array | None, limits: Limits, n: int) -> tuple[pa.Array, pa.Array]:
    """Per-row min and max side from the row's variant (or the job's)."""
    names = list(VARIANTS)
    if variant_column is None or pa.types.is_null(variant_column.type):
        v = VARIANTS[limits.default_variant]
        return pa.array(np.full(n, v.min_side)), pa.array(np.full(n, v.max_side))
    filled = pc.fill_null(variant_column, limits.default_variant)
    index = pc.index_in(filled, pa.array(names))
    mins = pc.take(pa.array([VARIANTS[v].min_side for v in names]), index)
    maxs = pc.take(pa.array([VARIANTS[v].max_side for v in names]), index)
    return mins, maxs


def _limits_text(variant_column: pa.Array | None, limits: Limits) -> str:
    """The side limits of the variants rows may run on, e.g. '64..2048'."""
    names = set(VARIANTS) if variant_column is not None else {limits.default_variant}
    ranges = {(VARIANTS[n].min_side, VARIANTS[n].max_side) for n in names}
    if len(ranges) == 1:
        (low, high), = ranges
        return f"{low}..{high}"
    return ", ".join(f"{n}: {VARIANTS[n].min_side}..{VARIANTS[n].max_side}" for n in sorted(names))


def _check_unique_ids(manifest: Manifest, digests: IdDigests) -> None:
    """Duplicate ids are named with the file and row of each copy (they may be in different files).
    Rows whose id digest repeats are compared exactly in a second pass over the id column."""
    candidates = digests.candidates()
    if not len(candidates):
        return

    def id_batches() -> Iterator[tuple[str, int, pa.Array]]:
        for f in manifest.files:
            offset = 0
            for batch in manifest.iter_batches(f, columns=["id"]):
                yield f.name, offset, batch.column("id")
                offset += batch.num_rows

    dupes, total = find_duplicates(candidates, id_batches, MAX_LISTED)
    if not dupes:
        return  # digests that collided, ids that differ
    shown = ", ".join(f"{repr(d.id)[:60]} ({', '.join(f'{name} row {row}' for name, row in d.places)})" for d in dupes)
    more = f" and {total - len(dupes)} more" if total > len(dupes) else ""
    raise ManifestError(f"{manifest.uri}: column 'id' has duplicate ids: {shown}{more}")
