"""``OUTPUT/README.md``: a Hugging Face dataset card, written at the end of each run.

Its YAML front matter is what makes ``datasets.load_dataset(OUTPUT)`` work on the folder (and on
a Hub repository the folder is pushed to) without arguments: ``configs`` lists the data files
(``shards/*.tar`` for WebDataset, ``data/*.parquet`` for Parquet, ``metadata/*.parquet`` for
plain files; `datasets` runs one builder per repository, so the metadata of the other formats is
read with ``load_dataset("parquet", data_files=...)``), and ``dataset_info`` declares every column's type, so
`datasets` does not guess types from the first shard (a ``negative_prompt`` that is null in the
first samples and text later would fail the load). The body states the counts, the model, the
settings, how to read the data, and that a tiny random-init model drew noise where it did.

Everything comes from OUTPUT itself (``job.json``, the commit markers and one committed
metadata file's schema), like ``status`` and ``report``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from zimage_batch.output import layout
from zimage_batch.output.curation import card_lines
from zimage_batch.output.encoding import Encoding
from zimage_batch.output.features import UnsupportedType
from zimage_batch.output.formats import CardInput, get_format
from zimage_batch.output.status import OutputState, load_output
from zimage_batch.output.throughput import images_of
from zimage_batch.storage import Storage

CARD_KEY = layout.DATASET_CARD
METADATA_FILES = f"{layout.METADATA}*.parquet"


def write_dataset_card(output: str | Storage | OutputState) -> str:
    """Render the card of OUTPUT (or of OUTPUT as already read) and store it as OUTPUT/README.md;
    returns its location."""
    state = output if isinstance(output, OutputState) else load_output(output)
    state.storage.put_bytes(CARD_KEY, render_card(state).encode("utf-8"))
    return state.storage.url(CARD_KEY)


def metadata_schema(state: OutputState) -> pa.Schema | None:
    """The schema every committed ``metadata/<shard>.parquet`` shares (None before the first commit)."""
    if not state.markers:
        return None
    with state.storage.open_read(layout.metadata_key(state.markers[-1].shard)) as f:
        return pq.read_schema(f).remove_metadata()


def data_features(state: OutputState, metadata: pa.Schema) -> list[dict[str, Any]]:
    """The ``features`` of the default config: what `datasets` yields for each sample (as the
    job's output format declares them)."""
    job = state.job.get("job", {})
    ext = Encoding.of_job(job).ext
    card = CardInput(state.storage, state.markers[-1].shard, metadata, ext)
    return get_format(job.get("format", "files")).features(card)


def front_matter(state: OutputState, metadata: pa.Schema | None) -> dict[str, Any]:
    """The card's YAML: tags, the configs and their features."""
    job = state.job.get("job", {})
    fmt = job.get("format", "files")
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": get_format(fmt).data_files}]}]
    card: dict[str, Any] = {
        "pretty_name": f"zimage-batch: {job.get('model', '?')}",
        "tags": ["synthetic", "text-to-image", "zimage-batch"],
        "configs": configs,
    }
    if metadata is not None:
        try:
            features = data_features(state, metadata)
            card["dataset_info"] = [{"config_name": "default", "features": features}]
        except UnsupportedType:  # a pass-through column of a type datasets cannot declare: let it infer
            pass
    return card


def _counts(state: OutputState) -> dict[str, int]:
    markers = state.markers
    return {
        "rows ok": sum(m.ok for m in markers),
        "rows with an error": sum(m.error for m in markers),
        "images": sum(images_of(m) for m in markers),
        "shards committed": len(markers),
    }


def render_card(state: OutputState) -> str:
    """The whole README.md."""
    metadata = metadata_schema(state)
    record = state.job
    job = record.get("job", {})
    model, fmt = str(job.get("model", "?")), job.get("format", "files")
    lines = ["---", yaml.safe_dump(front_matter(state, metadata), sort_keys=False, allow_unicode=True).rstrip(), "---",
             "", f"# Images generated with {model}", ""]
    if state.model_draws_noise:
        lines += [f"> **Warning:** `{model}` is a tiny random-init checkpoint (for tests and demos): "
                  "these images are noise.", ""]
    lines += [f"Written by zimage-batch with `{model}` (variant `{job.get('variant')}`), "
              f"as `{fmt}` ({Encoding.of_job(job).format.name}). Card updated "
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value:,} |" for name, value in _counts(state).items()]
    lines += ["", "## Settings", "", "Job defaults; a manifest row's own values override them (see each sample's metadata).",
              "", "```json", json.dumps({"seed": job.get("seed"), **(record.get("defaults") or {})}, indent=2,
                                         ensure_ascii=False), "```", ""]
    lines += _usage(fmt, Encoding.of_job(job))
    lines += card_lines(job, sum(m.filtered for m in state.markers))
    if metadata is not None:
        lines += ["", "## Metadata columns", "", "| column | type |", "|---|---|"]
        lines += [f"| `{f.name}` | {f.type} |" for f in metadata]
    return "\n".join(lines) + "\n"


def _usage(fmt: str, encoding: Encoding) -> list[str]:
    reads = get_format(fmt).loading(encoding.ext)
    return ["## Loading", "", "```python", "from datasets import load_dataset", "", *reads,
            f'meta = load_dataset("parquet", data_files="path/to/this/folder/{METADATA_FILES}", split="train")',
            "```", "", "The metadata as one table: `duckdb -c \"SELECT count(*) FROM 'metadata/*.parquet'\"`. "
            "Only committed shards are ever visible under `shards/`, `data/` and `metadata/`."]
