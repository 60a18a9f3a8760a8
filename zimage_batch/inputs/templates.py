"""Prompt templates: a job's `template` with `{slot}` placeholders, multiplied by its `slots`.

The expansion is a manifest that exists nowhere on disk: `TemplateManifest` computes its rows
from the template, so the planner, the resume checks and the workers read it like Parquet.
Shards are row ranges of one manifest file, and a resume re-checks each committed range's
digest; appending values to a slot must therefore only append rows to files or add files.

    expand: product   one virtual file per combination of the slots before the last one (named
                      after a digest of those values), whose rows are the last slot's values, in
                      order. A value appended to the last slot appends a row to every file; a
                      value appended to another slot adds files. Committed ranges never move.
    expand: sample    `samples` combinations drawn with the job seed: each combination's score is
                      a hash of the seed and its id, the sample is the lowest scores, in score
                      order, in one virtual file. Raising `samples` appends rows; changing the
                      slots draws another sample (its committed shards no longer match).

Each row's id is `<template_name>-<digest of its slot names and values>`, the same in every run
whatever order or position the values have; the slot values are columns of the row, and so of
the metadata.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import string
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from zimage_batch.inputs.columns import KNOWN_COLUMNS
from zimage_batch.inputs.manifest import Manifest, ManifestError, ManifestFile
from zimage_batch.inputs.validation import RESERVED_COLUMNS

EXPAND_MODES = ("product", "sample")
#: Metadata columns the pipeline itself may add to a template job (prompt expansion).
TEMPLATE_RESERVED = frozenset({"prompt_original", "template"})


class TemplateError(ManifestError):
    """The template or its slots cannot be used; the message is one line."""


@dataclass(frozen=True)
class TemplateSpec:
    """A job's template with its slot values loaded: what crosses to the workers."""

    name: str  # the id prefix of its rows
    text: str
    slots: tuple[tuple[str, tuple[str, ...]], ...]  # in the job's order: the last one is each file's rows
    expand: str = "product"
    samples: int | None = None
    seed: int = 0

    @property
    def slot_names(self) -> list[str]:
        return [name for name, _ in self.slots]

    @property
    def combinations(self) -> int:
        count = 1
        for _, values in self.slots:
            count *= len(values)
        return count

    def describe(self) -> str:
        """e.g. `20 concept x 30 style, product`."""
        sizes = " x ".join(f"{len(values)} {name}" for name, values in self.slots)
        return f"{sizes}, {self.expand}" + (f" of {self.samples}" if self.expand == "sample" else "")


def placeholders(text: str) -> list[str]:
    """The slot names `text` uses, in order of first use; `{{` and `}}` are literal braces."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"template: {exc} (a literal brace is written {{{{ or }}}})") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise TemplateError(f"template: {{{field}{'!' + conversion if conversion else ''}"
                                f"{':' + spec if spec else ''}}} is not a slot; write {{name}}")
        if field not in names:
            names.append(field)
    return names


def make_template(name: str, text: str, slots: dict[str, list[Any]], expand: str = "product",
                  samples: int | None = None, seed: int = 0) -> TemplateSpec:
    """Check a template against its slots (values already loaded) and return its spec."""
    if not isinstance(text, str) or not text.strip():
        raise TemplateError("template: empty; write a prompt with {slot} placeholders")
    used = placeholders(text)
    if not used:
        raise TemplateError(f"template {text[:60]!r} has no {{slot}} placeholder; a template multiplies a "
                            "prompt by slot values (a fixed prompt is a manifest row)")
    unknown = [s for s in used if s not in slots]
    if unknown:
        raise TemplateError(f"template names slot(s) {', '.join(unknown)} that 'slots' does not declare "
                            f"(declared: {', '.join(slots) or 'none'})")
    unused = [s for s in slots if s not in used]
    if unused:
        raise TemplateError(f"slot(s) {', '.join(unused)} are not in the template; use {{name}} in it or remove them")
    checked = tuple((slot, _slot_values(slot, slots[slot])) for slot in slots)
    if expand not in EXPAND_MODES:
        raise TemplateError(f"expand must be one of {'|'.join(EXPAND_MODES)}, got {expand!r}")
    spec = TemplateSpec(name, text, checked, expand, samples, seed)
    if expand == "sample":
        if samples is None or samples < 1:
            raise TemplateError("expand: sample needs samples: N (N >= 1), the number of combinations to draw")
        if samples > spec.combinations:
            raise TemplateError(f"samples: {samples} is more than the {spec.combinations:,} combinations "
                                f"({spec.describe()}); use expand: product for all of them")
    elif samples is not None:
        raise TemplateError("samples is for expand: sample; expand: product draws every combination")
    return spec


def _slot_values(slot: str, values: Any) -> tuple[str, ...]:
    if not slot.isidentifier():
        raise TemplateError(f"slot {slot!r}: a slot name is a Python-style identifier (letters, digits, _)")
    if slot in KNOWN_COLUMNS or slot in RESERVED_COLUMNS["prompt"] or slot in TEMPLATE_RESERVED:
        raise TemplateError(f"slot {slot!r}: a column of that name is the pipeline's own; rename the slot")
    if not isinstance(values, (list, tuple)):
        raise TemplateError(f"slot {slot!r}: give a list of values or a text file (one value a line)")
    if not values:
        raise TemplateError(f"slot {slot!r} has no values")
    if any(v is None or isinstance(v, (dict, list)) for v in values):
        raise TemplateError(f"slot {slot!r}: values are text (no empty entries, lists or mappings)")
    texts = tuple(str(v) for v in values)
    seen: set[str] = set()
    dupes = [v for v in texts if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if dupes:
        raise TemplateError(f"slot {slot!r} repeats value(s) {', '.join(repr(v)[:40] for v in dupes[:5])}; "
                            "each value once (a repeat would be the same row twice)")
    return texts


def read_slot_file(slot: str, location: str) -> list[str]:
    """A slot's values from a UTF-8 text file, local or s3://: one value a line, blank lines skipped."""
    from zimage_batch.storage import StorageError, is_s3, open_storage, split_s3_uri

    try:
        if is_s3(location):
            bucket, key = split_s3_uri(location)
            data = open_storage(f"s3://{bucket}").get_bytes(key)
        else:
            with open(location, "rb") as f:
                data = f.read()
        text = data.decode("utf-8")
    except (OSError, StorageError, UnicodeDecodeError) as exc:
        raise TemplateError(f"slot {slot!r}: cannot read {location} ({str(exc).splitlines()[0] if str(exc) else exc})"
                            ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def row_id(name: str, values: dict[str, str]) -> str:
    """`<name>-<16 hex>`: a digest of the slot names and values, whatever their positions."""
    payload = json.dumps(sorted(values.items()), ensure_ascii=False).encode()
    return f"{name}-{hashlib.sha256(payload).hexdigest()[:16]}"


def _score(seed: int, identifier: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{identifier}".encode()).digest()[:8]


class TemplateManifest(Manifest):
    """The rows of a template's expansion, read like a Parquet manifest (see the module's docstring)."""

    def __init__(self, template: TemplateSpec) -> None:  # nothing to list: the files are computed
        self.template = template
        self.uri = f"template:{template.name}"
        self.fs = None
        self.kind = "prompt"
        self.schema = pa.schema([("id", pa.string()), ("prompt", pa.string())]
                                + [(slot, pa.string()) for slot in template.slot_names])
        self._parts: dict[str, list[dict[str, str]] | tuple[str, ...]] = {}  # file name -> its prefix or sample
        self.files = self._virtual_files()

    def _virtual_files(self) -> list[ManifestFile]:
        t = self.template
        if t.expand == "sample":
            name = f"{t.name}-sample"
            self._parts[name] = self._sample()
            return [ManifestFile(name, name, len(self._parts[name]), self.schema)]
        *prefix_slots, (_, last) = t.slots
        files = []
        for prefix in itertools.product(*(values for _, values in prefix_slots)):
            fixed = dict(zip((s for s, _ in prefix_slots), prefix))
            name = f"{t.name}/{row_id('part', fixed)[5:]}" if prefix_slots else t.name
            self._parts[name] = tuple(prefix)
            files.append(ManifestFile(name, name, len(last), self.schema))
        return files

    def _sample(self) -> list[dict[str, str]]:
        """The `samples` combinations of lowest score (a hash of the job seed and the row id), in score order."""
        t = self.template
        names = t.slot_names
        scored = ((_score(t.seed, row_id(t.name, dict(zip(names, combo)))), combo)
                  for combo in itertools.product(*(values for _, values in t.slots)))
        return [dict(zip(names, combo)) for _, combo in heapq.nsmallest(t.samples or 0, scored)]

    def _combinations(self, f: ManifestFile, start: int, end: int) -> list[dict[str, str]]:
        part = self._parts[f.name]
        if isinstance(part, list):  # a sample
            return part[start:end]
        *prefix_slots, (last_slot, last) = self.template.slots
        fixed = dict(zip((s for s, _ in prefix_slots), part))
        return [{**fixed, last_slot: value} for value in last[start:end]]

    def _table(self, f: ManifestFile, start: int, end: int) -> pa.Table:
        t = self.template
        combos = self._combinations(f, max(0, start), min(end, f.num_rows))
        columns = {"id": [row_id(t.name, c) for c in combos], "prompt": [t.text.format(**c) for c in combos]}
        columns |= {slot: [c[slot] for c in combos] for slot in t.slot_names}
        return pa.Table.from_pydict(columns, schema=self.schema)

    def display_name(self, f: ManifestFile) -> str:
        return f"template {self.template.name!r} ({f.name})"

    def iter_batches(self, f: ManifestFile, batch_size: int = 65536,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for start in range(0, f.num_rows, batch_size):
            table = self._table(f, start, start + batch_size)
            if columns is not None:
                table = table.select([c for c in columns if c in table.schema.names])
            yield from table.combine_chunks().to_batches()

    def read_column(self, f: ManifestFile, name: str) -> pa.Array:
        if name not in self.schema.names:
            return pa.nulls(f.num_rows, pa.string())
        return self._table(f, 0, f.num_rows).column(name).combine_chunks()

    def read_rows(self, f: ManifestFile, start: int, end: int) -> pa.Table:
        return self._table(f, start, end)
