"""LoRA adapter sources: one source (`Source.parse` reads it) names a `.safetensors` file; this
turns it into a local file and its sha256, which job.json records (a changed file is a different job).

    /path/style.safetensors               a local file
    /path/folder/                         a local folder holding one .safetensors file
                                          (or diffusers' pytorch_lora_weights.safetensors)
    s3://bucket/loras/style.safetensors   copied once into the model cache (ETag-keyed, verified)
    s3://bucket/loras/style/              an S3 folder, then as a local folder
    org/repo/file.safetensors             a file of a hub repository (honours HF_HUB_OFFLINE)
    org/repo                              a hub repository, then as a local folder

Pickle weights (.bin, .pt, .ckpt, ...) are refused before anything is fetched or read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_batch.model.addons import file_sha256
from zimage_batch.model.cache import fetch_s3_file, fetch_s3_folder
from zimage_batch.model.checkpoint import ModelSourceError, refuse_pickles
from zimage_batch.model.sources import cache_root
from zimage_batch.source import Source
from zimage_batch.text import first_line

SUFFIX = ".safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


@dataclass(frozen=True)
class ResolvedAdapter:
    """A declared adapter, fetched: its name, its source (as written, identified by the file's
    sha256) and the local file."""

    name: str
    origin: Source
    path: str

    @property
    def source(self) -> str:
        """What the user wrote."""
        return self.origin.text

    @property
    def sha256(self) -> str:
        """Hex sha256 of the file."""
        return (self.origin.identity or "").removeprefix("sha256:")

    def record(self) -> dict[str, str]:
        """What job.json keeps of it."""
        return {"source": self.source, "sha256": self.sha256, "file": os.path.basename(self.path)}


def resolve_adapters(loras: dict[str, str]) -> dict[str, ResolvedAdapter]:
    """Every declared adapter, fetched (if needed) and hashed, by name."""
    return {name: resolve_adapter(name, source) for name, source in sorted(loras.items())}


def adapter_records(loras: dict[str, str]) -> dict[str, dict[str, str]]:
    """job.json's `adapters`: source and sha256 of each declared adapter."""
    return {name: adapter.record() for name, adapter in resolve_adapters(loras).items()}


def resolve_adapter(name: str, source: str) -> ResolvedAdapter:
    """Fetch (if needed) the file `source` names and hash it."""
    what = f"adapter {name!r} ({source})"
    refuse_pickles([source], what)
    origin = Source.try_parse(source)
    path = _adapter_file(origin, what) if origin is not None else None
    if origin is None or path is None:
        raise ModelSourceError(
            f"{what}: no such file or folder, and not an s3:// URI or a hub file (org/repo/file{SUFFIX})"
        )
    if not path.name.endswith(SUFFIX):
        raise ModelSourceError(f"refusing {what}: only {SUFFIX} files are loaded, not {path.name}")
    return ResolvedAdapter(name, origin.identified("sha256:" + file_sha256(path)), str(path))


def _adapter_file(origin: Source, what: str) -> Path | None:
    """The local file `origin` names (fetched into the cache from S3 or the hub); None when it
    names nothing an adapter can be (a local path that does not exist, tiny weights)."""
    if origin.kind == "s3":
        root = cache_root() / "s3"
        if origin.names_file:
            return fetch_s3_file(origin.location, root)
        return _one_file(fetch_s3_folder(origin.location, root), what)
    if origin.kind == "local" and os.path.isfile(origin.location):
        return Path(origin.location)
    if origin.kind == "local" and os.path.isdir(origin.location):
        return _one_file(Path(origin.location), what)
    if origin.kind == "hub":
        return _hub_file(origin, what)
    return None


def check_recorded(adapters: dict[str, ResolvedAdapter], recorded: dict[str, Any]) -> None:
    """Refuse adapters whose file differs from the one job.json recorded (a worker on another
    node, or an S3 object replaced while the job runs, must not draw other pixels)."""
    for name, adapter in adapters.items():
        before = (recorded.get(name) or {}).get("sha256")
        if before and before != adapter.sha256:
            raise ModelSourceError(
                f"adapter {name!r} ({adapter.source}) is not the file this job recorded "
                f"(sha256 {adapter.sha256[:12]}..., job.json has {before[:12]}...); it changed while the job ran"
            )


def _one_file(folder: Path, what: str) -> Path:
    """The adapter file of a folder: diffusers' default name, else its only .safetensors file."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    refuse_pickles(names, what)
    candidates = [n for n in names if n.endswith(SUFFIX)]
    if DIFFUSERS_WEIGHT_NAME in candidates:
        return folder / DIFFUSERS_WEIGHT_NAME
    if len(candidates) == 1:
        return folder / candidates[0]
    if not candidates:
        raise ModelSourceError(f"{what}: the folder holds no {SUFFIX} file")
    raise ModelSourceError(
        f"{what}: the folder holds {len(candidates)} {SUFFIX} files ({', '.join(candidates[:3])}); name one of them"
    )


def _hub_file(origin: Source, what: str) -> Path:
    """A file (org/repo/path/file.safetensors) or a repository (org/repo) from the hub."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, filename = origin.hub_repo, origin.hub_file
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        return _one_file(Path(snapshot_download(repo_id, allow_patterns=[f"*{SUFFIX}"])), what)
    except ModelSourceError:
        raise
    except Exception as exc:  # offline with an empty cache, unknown repo or file, no network
        reason = first_line(exc, 300)
        raise ModelSourceError(
            f"{what} is not a local file, and the hub cannot give it: {type(exc).__name__}: {reason}"
        ) from None


def adapter_files(loras: dict[str, str], recorded: dict[str, Any]) -> dict[str, str]:
    """On a worker: each declared adapter fetched on this node and checked against the sha256
    that job.json `recorded` when the run began; name -> local .safetensors file."""
    resolved = resolve_adapters(loras)
    check_recorded(resolved, recorded)
    return {name: adapter.path for name, adapter in resolved.items()}
