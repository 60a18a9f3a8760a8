"""Hugging Face `datasets` features of what OUTPUT holds, described without importing `datasets`.

`datasets` reads column types from two places, and zimage-batch writes both:

* a Parquet file's schema metadata, key ``huggingface``: ``{"info": {"features": {...}}}`` in the
  form of ``Features.to_dict()`` (``--format parquet`` shards, so ``load_dataset("parquet", ...)``
  decodes the ``image`` column, an Arrow struct of ``bytes`` and ``path``, as a PIL image);
* the ``dataset_info.features`` list in a dataset card's YAML front matter, in the form of
  ``Features._to_yaml_list()`` (``OUTPUT/README.md``, so nothing is guessed from the first shard).

Only types every `datasets` release since 4.0 reads the same way are described: plain values,
structs and lists. `json_type` says what a metadata value becomes in a sample's ``<key>.json``
after a JSON round trip (dates become strings, all integers int64), which is how
``load_dataset("webdataset", ...)`` sees it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import pyarrow as pa

#: How `datasets` stores an image: the encoded bytes and an optional file name.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
#: Metadata columns that describe the outcome of a row, not its image: not part of a sample.
OUTCOME_COLUMNS = ("status", "error", "image")


class UnsupportedType(TypeError):
    """An Arrow type that has no stable `datasets` feature (map, union, dictionary, views)."""


_NAMED = {
    pa.null(): "null", pa.bool_(): "bool", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32",
    pa.int64(): "int64", pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64", pa.string(): "string",
    pa.large_string(): "large_string", pa.binary(): "binary", pa.large_binary(): "large_binary",
    pa.date32(): "date32", pa.date64(): "date64",
}


def value_dtype(t: pa.DataType) -> str:
    """The `datasets` ``Value`` dtype of a plain Arrow type (``int64``, ``timestamp[us, tz=UTC]``)."""
    if t in _NAMED:
        return _NAMED[t]
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, tz={t.tz}]" if t.tz else f"timestamp[{t.unit}]"
    if pa.types.is_time32(t) or pa.types.is_time64(t):
        return f"time{t.bit_width}[{t.unit}]"
    if pa.types.is_duration(t):
        return f"duration[{t.unit}]"
    if pa.types.is_decimal128(t) or pa.types.is_decimal256(t):
        return f"decimal{t.bit_width}({t.precision}, {t.scale})"
    raise UnsupportedType(f"no datasets feature for Arrow type {t}")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t)


def feature(t: pa.DataType) -> dict[str, Any]:
    """The feature of Arrow type `t` as ``Features.to_dict()`` writes it."""
    if pa.types.is_struct(t):
        return {t.field(i).name: feature(t.field(i).type) for i in range(t.num_fields)}
    if _is_list(t):
        return {"feature": feature(t.value_type), "_type": "List"}
    return {"dtype": value_dtype(t), "_type": "Value"}


def _yaml_inner(t: pa.DataType) -> dict[str, Any]:
    """One feature in the card's YAML form, without its name."""
    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **_yaml_inner(t.field(i).type)} for i in range(t.num_fields)]}
    if _is_list(t):
        inner = _yaml_inner(t.value_type)
        if "dtype" in inner:  # list: int64
            return {"list": inner["dtype"]}
        if "struct" in inner:  # list: [- name: ..., dtype: ...]
            return {"list": inner["struct"]}
        return {"list": inner}
    return {"dtype": value_dtype(t)}


def schema_features(schema: pa.Schema, images: Collection[str] = ()) -> dict[str, Any]:
    """``Features.to_dict()`` of `schema`, the columns named in `images` as ``Image``; columns of a
    type with no stable feature are left out (`datasets` then derives them from the Arrow type)."""
    out: dict[str, Any] = {}
    for field in schema:
        if field.name in images:
            out[field.name] = {"_type": "Image"}
            continue
        try:
            out[field.name] = feature(field.type)
        except UnsupportedType:
            continue
    return out


def yaml_features(schema: pa.Schema, images: Collection[str] = ()) -> list[dict[str, Any]]:
    """The card's ``features:`` list for `schema`; UnsupportedType if a column has no feature."""
    return [{"name": f.name, "dtype": "image"} if f.name in images else {"name": f.name, **_yaml_inner(f.type)}
            for f in schema]


def with_features(schema: pa.Schema, images: Collection[str] = ()) -> pa.Schema:
    """`schema` with the ``huggingface`` metadata `datasets` reads back as its features."""
    info = json.dumps({"info": {"features": schema_features(schema, images)}}, ensure_ascii=False)
    return schema.with_metadata({**(schema.metadata or {}), b"huggingface": info.encode("utf-8")})


def json_type(t: pa.DataType) -> pa.DataType:
    """The type a value of Arrow type `t` has once written to ``<key>.json`` and read back: numbers
    stay numbers (every integer int64, every float float64), text, bytes (hex), decimals, dates and
    times become strings, lists and structs keep their shape."""
    if pa.types.is_null(t) or pa.types.is_boolean(t):
        return t
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_struct(t):
        return pa.struct([pa.field(t.field(i).name, json_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(json_type(t.value_type))
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_temporal(t) or pa.types.is_decimal(t)):
        return pa.string()
    raise UnsupportedType(f"no JSON form for Arrow type {t}")


def sample_fields(metadata_schema: pa.Schema) -> pa.Schema:
    """What one sample carries (its JSON, a data Parquet row): the metadata's columns but the outcome."""
    return pa.schema([f for f in metadata_schema if f.name not in OUTCOME_COLUMNS])
