"""Manifests: Parquet files, local or s3://, read and checked in a streaming way.

The driver never holds rows as Python objects: validation runs on Arrow record batches, and
workers read only the row range of the shard they run.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Callable, Iterator, Sequence
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zimage_batch.inputs import lora_spec
from zimage_batch.inputs.control import CONTROL_METADATA_COLUMNS, check_control_batch
from zimage_batch.inputs.ids import IdDigests, find_duplicates
from zimage_batch.inputs.lora_spec import check_lora_column
from zimage_batch.inputs.mask_spec import MASK_COLUMNS, MASK_METADATA_COLUMNS, MaskJob, check_mask_batch, derived_rows
from zimage_batch.model.variants import VARIANTS
from zimage_batch.storage import is_s3, open_storage, split_s3_uri

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
EDIT_MODES = ("img2img", "inpaint", "edit")

# column -> the Arrow type family it must have
STRING, INTEGER, NUMBER, BOOL_OR_NUMBER = "string", "integer", "number", "boolean or number"
PROMPT_COLUMNS = {
    "id": STRING,
    "prompt": STRING,
    "negative_prompt": STRING,
    "seed": INTEGER,
    "width": INTEGER,
    "height": INTEGER,
    "num_inference_steps": INTEGER,
    "guidance_scale": NUMBER,
    "cfg_truncation": NUMBER,
    "cfg_normalization": BOOL_OR_NUMBER,
    "variant": STRING,
    "lora": STRING,  # LoRA adapters: inputs/lora_spec.py
    "control_image": STRING,  # a ControlNet condition (with the job's `controlnet`)
    "control_scale": NUMBER,
    "num_images": INTEGER,
}
# `control` derives a ControlNet condition from the row's source (canny, tile)
EDIT_COLUMNS = {"source": STRING, "mode": STRING, "mask": STRING, "strength": NUMBER, "control": STRING,
                **MASK_COLUMNS}  # derived masks and outpainting: inputs/mask_spec.py
KNOWN_COLUMNS = PROMPT_COLUMNS | EDIT_COLUMNS
# metadata columns written for every row, in this order, before the pass-through columns
METADATA_COLUMNS = {
    "id": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "image": pa.string(),
    "sha256": pa.string(),
    "seed": pa.int64(),
    "width": pa.int64(),
    "height": pa.int64(),
    "num_inference_steps": pa.int64(),
    "guidance_scale": pa.float64(),
    "cfg_truncation": pa.float64(),
    "cfg_normalization": pa.float64(),
    "negative_prompt": pa.string(),
    "variant": pa.string(),
    "model": pa.string(),
    "prompt": pa.string(),
    "duration_ms": pa.float64(),
}


#: The most images one row may ask for (`num_images`, column or job setting).
MAX_NUM_IMAGES = 64
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
# metadata columns the pipeline writes itself: a manifest column of that name would be lost
RESERVED_COLUMNS = {
    "prompt": frozenset((METADATA_COLUMNS | IMAGE_INDEX_COLUMN | CONTROL_METADATA_COLUMNS).keys() - KNOWN_COLUMNS.keys()),
    "edit": frozenset((METADATA_COLUMNS | IMAGE_INDEX_COLUMN | EDIT_METADATA_COLUMNS | CONTROL_METADATA_COLUMNS
                       | MASK_METADATA_COLUMNS).keys() - KNOWN_COLUMNS.keys()),
}


def metadata_columns(edit: bool, image_index: bool = False, lora: bool = False,
                     control: bool = False, curated: dict[str, pa.DataType] | None = None,
                     expanded: bool = False, masks: bool = False) -> dict[str, pa.DataType]:
    """The pipeline's own metadata columns, in order: image_index after id when the job uses
    num_images, `prompt_original` after `prompt` in a job that expands prompts, the edit lineage
    for edit manifests, `lora` in a job with adapters, the ControlNet conditions in a job with a
    ControlNet, the mask columns in an edit job that keeps masks (mask_spec.masks_used), then a
    curated job's columns (scores, tries, the embedding: `curate.spec.Curation.metadata_columns`)."""
    columns = dict(METADATA_COLUMNS)
    if expanded:
        items = list(columns.items())
        at = list(columns).index("prompt") + 1
        columns = dict(items[:at] + [("prompt_original", pa.string())] + items[at:])
    if image_index:
        columns = {"id": columns.pop("id"), **IMAGE_INDEX_COLUMN, **columns}
    columns |= EDIT_METADATA_COLUMNS if edit else {}
    columns |= lora_spec.METADATA_COLUMN if lora else {}
    columns |= CONTROL_METADATA_COLUMNS if control else {}
    columns |= MASK_METADATA_COLUMNS if edit and masks else {}
    return columns | (curated or {})


MAX_LISTED = 5  # offending rows named in an error message


class ManifestError(ValueError):
    """The manifest cannot be used; the message is one line naming file, column and rows."""


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest."""

    path: str  # path within the filesystem (bucket/key for S3)
    name: str  # path relative to the manifest root, stable across runs
    num_rows: int
    schema: pa.Schema = dataclass_field(compare=False)  # as the pipeline reads it: see plain_type()
    # Hive-style folders on the way to the file (date=2026-11-27/): columns of every row, as strings
    partition: tuple[tuple[str, str | None], ...] = ()
    stored: pa.Schema | None = dataclass_field(default=None, compare=False)  # the types as written

    def with_partition(self, data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        """A table or batch read from this file, with its partition columns appended."""
        for key, value in self.partition:
            data = data.append_column(pa.field(key, pa.string()), pa.array([value] * data.num_rows, pa.string()))
        return data


class Manifest:
    """A Parquet file or folder of files, local or on S3."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, root = _filesystem(uri)
        self.files = self._list_files(root)
        self.schema = self._union_schema()
        self.kind = "edit" if "source" in self.schema.names else "prompt"

    @property
    def passthrough(self) -> pa.Schema:
        """The columns copied into the metadata unchanged, each with one type across all files."""
        return pa.schema([f for f in self.schema if f.name not in KNOWN_COLUMNS])

    def uses_num_images(self, job_num_images: int) -> bool:
        """Whether a job on this manifest draws several images per row: a `num_images` column, or
        a job setting other than 1. Its metadata rows then carry `image_index`."""
        return job_num_images != 1 or "num_images" in self.schema.names

    def metadata_schema(self, image_index: bool = False, lora: bool = False, control: bool = False,
                        curated: dict[str, pa.DataType] | None = None, expanded: bool = False,
                        masks: bool = False) -> pa.Schema:
        """The columns of every ``metadata/<shard>.parquet`` of a job on this manifest."""
        columns = metadata_columns(self.kind == "edit", image_index, lora, control, curated, expanded, masks)
        return pa.schema(list(columns.items()) + list(self.passthrough))

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def _list_files(self, root: str) -> list[ManifestFile]:
        info = self.fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ManifestError(f"{self.uri}: no such file or folder")
        if info.type == pafs.FileType.File:
            paths = [(root, posixpath.basename(root))]
        else:
            selector = pafs.FileSelector(root, recursive=True)
            paths = sorted(
                (i.path, posixpath.relpath(i.path, root))
                for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File
                and i.path.lower().endswith(PARQUET_SUFFIXES)
                and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, root).split("/"))
            )
            if not paths:
                raise ManifestError(f"{self.uri}: folder holds no .parquet files")
        files = []
        for path, name in paths:
            footer = self._footer(path)
            stored = footer.schema.to_arrow_schema()
            partition = _hive_partition(posixpath.dirname(name))
            for key, _ in partition:
                if key in stored.names:
                    raise ManifestError(f"{self._display(path)}: column '{key}' is named twice, in the file or its folders "
                                        f"({key}=...); rename one of them")
                stored = stored.append(pa.field(key, pa.string()))
            files.append(ManifestFile(path, name, footer.num_rows, _plain_schema(stored), partition, stored))
        return files

    def _footer(self, path: str) -> pq.FileMetaData:
        try:
            with self.fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"{self._display(path)}: not a readable Parquet file ({_first_line(exc)})") from None

    def _union_schema(self) -> pa.Schema:
        """Every column of every file, in order of first appearance. A known column keeps its first
        non-null type (each file's values are checked on their own); a pass-through column gets the
        one type all its files' types widen to, so every shard's metadata agrees."""
        fields: dict[str, pa.Field] = {}
        first_seen: dict[str, str] = {}
        for f in self.files:
            for column in f.schema:
                seen = fields.get(column.name)
                if seen is None or pa.types.is_null(seen.type):
                    fields[column.name], first_seen[column.name] = column, f.name
                elif column.name not in KNOWN_COLUMNS and column.type != seen.type:
                    try:
                        fields[column.name] = pa.unify_schemas(
                            [pa.schema([seen]), pa.schema([column])], promote_options="permissive"
                        ).field(0)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                        raise ManifestError(
                            f"{self._display(f.path)}: column '{column.name}' is {column.type} but "
                            f"{first_seen[column.name]} has {seen.type}; a column needs one type in every file"
                        ) from None
        return pa.schema(list(fields.values()))

    def _display(self, path: str) -> str:
        return f"s3://{path}" if is_s3(self.uri) else path

    def display_name(self, f: ManifestFile) -> str:
        return self._display(f.path)

    # ------------------------------------------------------------------ reading
    def iter_batches(self, f: ManifestFile, batch_size: int = 65536,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The file's rows batch by batch (only `columns`, when given), partition columns included."""
        own = None if columns is None else [c for c in columns if c in f.schema.names and c not in dict(f.partition)]
        with self.fs.open_input_file(f.path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=own):
                batch = _decoded(f.with_partition(batch))
                yield batch if columns is None else batch.select([c for c in columns if c in batch.schema.names])

    def read_column(self, f: ManifestFile, name: str) -> pa.Array:
        """One column of one file (nulls where the file lacks it)."""
        if name not in f.schema.names:
            return pa.nulls(f.num_rows, pa.string())
        partition = dict(f.partition)
        if name in partition:
            return pa.array([partition[name]] * f.num_rows, pa.string())
        with self.fs.open_input_file(f.path) as handle:
            parquet = pq.ParquetFile(handle)
            column = _decoded(parquet.read(columns=[name])).column(name).combine_chunks()
            return column.cast(pa.string()) if pa.types.is_null(column.type) else column

    def read_rows(self, f: ManifestFile, start: int, end: int) -> pa.Table:
        """Rows [start, end) of one file, reading only the row groups that hold them."""
        with self.fs.open_input_file(f.path) as handle:
            parquet = pq.ParquetFile(handle)
            groups, offset, first_offset = [], 0, None
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if offset < end and offset + n > start:
                    groups.append(g)
                    first_offset = offset if first_offset is None else first_offset
                offset += n
            if not groups:
                return f.schema.empty_table()
            table = _decoded(f.with_partition(parquet.read_row_groups(groups)))
        return table.slice(start - first_offset, end - start)


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Spark and Hive write a null partition value


def _hive_partition(folder: str) -> tuple[tuple[str, str | None], ...]:
    """The key=value parts of a file's folder path, values URL-decoded as Spark writes them."""
    parts = []
    for part in folder.split("/") if folder else []:
        key, sep, value = part.partition("=")
        if sep and key:
            value = unquote(value)
            parts.append((unquote(key), None if value == HIVE_NULL else value))
    return tuple(parts)


def open_manifest(uri: str) -> Manifest:
    try:
        return Manifest(uri)
    except ManifestError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(f"{uri}: cannot read manifest ({_first_line(exc)})") from None


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        fs, _ = open_storage(f"s3://{bucket}").arrow_fs()
        return fs, f"{bucket}/{key}".rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)  # no control characters


def plain_type(t: pa.DataType) -> pa.DataType:
    """The type the pipeline reads a column of type `t` as, whichever tool wrote it: dictionaries
    (categoricals) as their values, `large_string` and `string_view` (pandas, Polars) as `string`,
    `large_binary` and `binary_view` as `binary`, inside lists, structs and maps too."""
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_map(t):
        return pa.map_(plain_type(t.key_type), t.item_field.with_type(plain_type(t.item_type)), t.keys_sorted)
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(plain_type(t.value_type)), t.list_size)
    if pa.types.is_list(t) or pa.types.is_list_view(t):
        return pa.list_(t.value_field.with_type(plain_type(t.value_type)))
    if pa.types.is_large_list(t) or pa.types.is_large_list_view(t):
        return pa.large_list(t.value_field.with_type(plain_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(plain_type(f.type)) for f in t])
    return t


def _plain_field(f: pa.Field) -> pa.Field:
    """A column as the pipeline reads it; integer ids are their decimal text."""
    t = plain_type(f.type)
    return f.with_type(pa.string() if f.name == "id" and pa.types.is_integer(t) else t)


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([_plain_field(f) for f in schema], metadata=schema.metadata)


def _decoded(data: pa.RecordBatch | pa.Table):
    """Columns as the pipeline reads them (see plain_type; an integer id as its decimal text),
    and an integer column stored as floats (pandas writes an int column with nulls as float64)
    as int64 when every value is a whole number (validation refuses the rest)."""
    plain = _plain_schema(data.schema)
    for i, f in enumerate(plain):
        if KNOWN_COLUMNS.get(f.name) == INTEGER and pa.types.is_floating(f.type) and _whole(data.column(f.name)):
            plain = plain.set(i, f.with_type(pa.int64()))
    return data if plain.equals(data.schema) else data.cast(plain)


def _whole(values: pa.Array | pa.ChunkedArray) -> bool:
    """True if every value is a whole number that a float holds exactly (|v| < 2**53)."""
    return not pc.any(pc.fill_null(_not_whole(values), False)).as_py()


def _not_whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    values = values.cast(pa.float64())
    return pc.or_(pc.not_equal(pc.floor(values), values), pc.greater_equal(pc.abs(values), float(2**53)))


def _family(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return STRING
    if pa.types.is_integer(t):
        return INTEGER
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return NUMBER
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _type_ok(expected: str, actual: pa.DataType) -> bool:
    family = _family(actual)
    if family == "null":
        return True  # an all-null optional column
    if expected == NUMBER:
        return family in (NUMBER, INTEGER)
    if expected == INTEGER and pa.types.is_floating(actual):
        return True  # whole numbers only: checked value by value
    if expected == BOOL_OR_NUMBER:
        return family in (NUMBER, INTEGER, "boolean")
    return family == expected


# ---------------------------------------------------------------------- validation
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
            if expected and not _type_ok(expected, field.type):
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
                raise ManifestError(f"{manifest.display_name(f)}: unusable values ({_first_line(exc)})") from None
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
                f"{manifest.display_name(f)}: not a readable Parquet file ({_first_line(exc)})"
            ) from None
        yield batch


def _offending(where: str, column: str, problem: str, batch: pa.RecordBatch, bad: pa.Array, offset: int) -> ManifestError:
    """A one-line error naming the first offending rows by number and id."""
    rows = np.flatnonzero(np.asarray(pc.fill_null(bad, False)))[:MAX_LISTED]
    ids = batch.column("id")
    if _family(ids.type) == STRING:  # as bytes: an id may be the text that is not UTF-8
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
            if expected == INTEGER:  # floats left by _decoded: some are not whole
                fail_if(name, _not_whole(values), "must hold whole numbers (below 2**53 when stored as floats)")
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
                fail_if(name, pc.and_(pc.match_substring_regex(uris, r"^[A-Za-z][A-Za-z0-9+.-]*://"),
                                      pc.invert(pc.match_substring_regex(uris, r"^(s3|file)://"))),
                        "must be a local path, a file:// URI or an s3:// URI")
        mode = column("mode")
        if mode is not None:
            fail_if("mode", _not_in(mode, EDIT_MODES), f"must be one of {'|'.join(EDIT_MODES)}")
        strength = column("strength")
        if strength is not None:
            fail_if("strength", pc.or_(pc.less_equal(strength, 0), pc.greater(strength, 1)), "must be in (0, 1]")
        check_mask_batch(batch, limits.masks, fail_if)
        _check_edit_modes(batch, limits, fail_if)
    for name, default in (("width", limits.default_width), ("height", limits.default_height)):
        values = column(name)
        if values is None:
            continue
        fail_if(name, pc.not_equal(pc.bit_wise_and(values, 15), 0), "has sizes that are not multiples of 16")
        lowest, highest = _side_limits(variant_column, limits, batch.num_rows)
        fail_if(name, pc.or_(pc.less(values, lowest), pc.greater(values, highest)),
                f"has sizes beyond the model's limits ({_limits_text(variant_column, limits)})")
    steps = column("num_inference_steps")
    if steps is not None:
        fail_if("num_inference_steps", pc.less_equal(steps, 0), "must be > 0")
        fail_if("num_inference_steps", pc.greater(steps, 1000), "must be <= 1000")
    guidance = column("guidance_scale")
    if guidance is not None:
        fail_if("guidance_scale", pc.less(guidance, 0), "must be >= 0")
    truncation = column("cfg_truncation")
    if truncation is not None:
        fail_if("cfg_truncation", pc.less(truncation, 0), "must be >= 0")
    normalization = column("cfg_normalization")
    if normalization is not None and not pa.types.is_boolean(normalization.type):
        fail_if("cfg_normalization", pc.less(normalization, 0), "must be >= 0 (0 or false: off)")
    seed = column("seed")
    if seed is not None:
        fail_if("seed", pc.less(seed, 0), "must be >= 0")
    if limits.controlnet or {"control_image", "control", "control_scale"} & set(batch.schema.names):
        check_control_batch(batch, limits, fail_if)
    _check_num_images(column("num_images"), seed, limits, fail_if)


def _check_num_images(num_images: pa.Array | None, seed: pa.Array | None, limits: Limits,
                      fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """1 <= num_images <= MAX_NUM_IMAGES, and image k's seed (seed + k) fits int64."""
    if num_images is not None and not pa.types.is_null(num_images.type):
        fail_if("num_images", pc.less(num_images, 1), "must be >= 1")
        fail_if("num_images", pc.greater(num_images, MAX_NUM_IMAGES), f"must be <= {MAX_NUM_IMAGES} (MAX_NUM_IMAGES)")
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
            problem = f"holds invalid data ({_first_line(exc)})"
        if _family(values.type) == STRING:
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
    has_mask = pc.or_(has_mask, derived_rows(batch, limits.masks))  # alpha, outpaint, aspect: inpaint
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


# ---------------------------------------------------------------------- rows
def derive_seed(job_seed: int, row_id: str) -> int:
    """The seed of a row that has none: stable across runs, distinct across ids."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def variant_mask(rows: pa.Table | pa.RecordBatch, variant: str, job_variant: str | None) -> pa.Array | pa.ChunkedArray:
    """True for the rows that run on `variant` (rows without one run on the job's)."""
    if "variant" not in rows.schema.names:
        return pa.array(np.full(rows.num_rows, variant == job_variant))
    names = pc.fill_null(pc.cast(rows.column("variant"), pa.string()), job_variant or "")
    return pc.equal(names, variant)


def rows_of_variant(table: pa.Table, variant: str, job_variant: str) -> pa.Table:
    """The rows of `table` that run on `variant` (rows without one run on the job's)."""
    return table.filter(variant_mask(table, variant, job_variant))


def rows_digest(table: pa.Table) -> str:
    """Content hash of rows, independent of how they are chunked or sliced. It covers the Arrow
    types: hash rows as the manifest reads them (Manifest.read_rows / iter_batches), so that a
    string column hashes the same whichever string type the file stores."""
    table = table.replace_schema_metadata(None)
    table = table.take(pa.array(np.arange(table.num_rows))).combine_chunks()
    h = hashlib.sha256(table.schema.to_string().encode())
    for batch in table.to_batches():
        h.update(batch.serialize())
    return h.hexdigest()


def digest_matches(f: ManifestFile, table: pa.Table, digest: str) -> bool:
    """Whether rows read from `f` are those a commit marker's `digest` was taken of. Earlier
    versions hashed `large_string` and `large_binary` columns (pandas' and Polars' strings)
    as stored; such a digest is matched by hashing the rows in those types again."""
    if rows_digest(table) == digest:
        return True
    legacy = _legacy_schema(f, table.schema)
    return legacy is not None and rows_digest(table.cast(legacy)) == digest


def _legacy_schema(f: ManifestFile, schema: pa.Schema) -> pa.Schema | None:
    """`schema` with the large string and binary columns of `f` as earlier versions read them
    (as stored, categoricals decoded), or None when the file has none."""
    if f.stored is None:
        return None
    fields, changed = [], False
    for field in schema:
        stored = f.stored.field(field.name).type if field.name in f.stored.names else field.type
        stored = stored.value_type if pa.types.is_dictionary(stored) else stored
        if stored != field.type and plain_type(stored) == field.type and not _has_view(stored):
            field, changed = field.with_type(stored), True
        fields.append(field)
    return pa.schema(fields) if changed else None


def _has_view(t: pa.DataType) -> bool:
    """Whether `t` holds a view type, which earlier versions could not commit."""
    views = (pa.types.is_string_view, pa.types.is_binary_view, pa.types.is_list_view, pa.types.is_large_list_view)
    if any(is_view(t) for is_view in views):
        return True
    return any(_has_view(t.field(i).type) for i in range(t.num_fields))
