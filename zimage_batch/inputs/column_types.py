"""The types the pipeline reads manifest columns as, whichever tool wrote them, and the type
families the known columns must have."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.inputs.columns import KNOWN_COLUMNS
from zimage_batch.settings import BOOL_OR_NUMBER, INTEGER, NUMBER, STRING


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


def plain_field(f: pa.Field) -> pa.Field:
    """A column as the pipeline reads it; integer ids are their decimal text."""
    t = plain_type(f.type)
    return f.with_type(pa.string() if f.name == "id" and pa.types.is_integer(t) else t)


def plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([plain_field(f) for f in schema], metadata=schema.metadata)


def decoded(data: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """Columns as the pipeline reads them (see plain_type; an integer id as its decimal text),
    and an integer column stored as floats (pandas writes an int column with nulls as float64)
    as int64 when every value is a whole number (validation refuses the rest)."""
    plain = plain_schema(data.schema)
    for i, f in enumerate(plain):
        if KNOWN_COLUMNS.get(f.name) == INTEGER and pa.types.is_floating(f.type) and whole(data.column(f.name)):
            plain = plain.set(i, f.with_type(pa.int64()))
    return data if plain.equals(data.schema) else data.cast(plain)


def whole(values: pa.Array | pa.ChunkedArray) -> bool:
    """True if every value is a whole number that a float holds exactly (|v| < 2**53)."""
    return not pc.any(pc.fill_null(not_whole(values), False)).as_py()


def not_whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    values = values.cast(pa.float64())
    return pc.or_(pc.not_equal(pc.floor(values), values), pc.greater_equal(pc.abs(values), float(2**53)))


def family(t: pa.DataType) -> str:
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


def type_ok(expected: str, actual: pa.DataType) -> bool:
    found = family(actual)
    if found == "null":
        return True  # an all-null optional column
    if expected == NUMBER:
        return found in (NUMBER, INTEGER)
    if expected == INTEGER and pa.types.is_floating(actual):
        return True  # whole numbers only: checked value by value
    if expected == BOOL_OR_NUMBER:
        return found in (NUMBER, INTEGER, "boolean")
    return found == expected
