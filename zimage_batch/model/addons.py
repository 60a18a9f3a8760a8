"""Add-on weights (ControlNet, LoRA): one source (`Source.parse` reads it) to a local file or
folder, and the identity the job fingerprint records.

    tiny:<version>                      a tiny random-init ControlNet (1.0 | 2.0 | 2.1), built once
    /path/net.safetensors               a single-file checkpoint, as the add-ons are published
    /path/folder/                       a diffusers folder (config.json + *.safetensors)
    s3://bucket/nets/net.safetensors    copied once into the verified, ETag-keyed model cache
    s3://bucket/nets/folder/            likewise, the whole folder
    org/repo/file.safetensors           one file of a hub repository (honours HF_HUB_OFFLINE)
    org/repo                            a hub repository in the diffusers layout

Only safetensors are read; pickle weights are refused by name before anything is fetched.
The identity is what decides the pixels: the sha256 of local bytes (remembered per file size
and modification time, so a 3 GB file is hashed once per machine), the cache entry of an S3
copy (a hash of its keys, ETags and sizes) or the commit of a hub snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from zimage_batch.model.cache import fetch_s3_file, fetch_s3_folder
from zimage_batch.model.checkpoint import ModelSourceError, refuse_pickles
from zimage_batch.source import Source
from zimage_batch.text import first_line

SAFETENSORS = ".safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt"]  # *.txt: a segmenter's tokenizer merges


@dataclass(frozen=True)
class ResolvedAddon:
    """An add-on's weights on this machine."""

    origin: Source  # the source as written, with the identity of its bytes
    path: str  # a local .safetensors file or a diffusers folder

    @property
    def source(self) -> str:
        """What the user wrote."""
        return self.origin.text

    @property
    def identity(self) -> str:
        """sha256:<hex> | s3:<cache entry> | hub:<repo>@<commit>[/<file>] (what the fingerprint names)."""
        return self.origin.identity or ""

    @property
    def single_file(self) -> bool:
        return not os.path.isdir(self.path)


def resolve_addon(source: str | Source, what: str = "controlnet") -> ResolvedAddon:
    """Fetch (if needed) and check the add-on weights named by `source`."""
    text = str(source).strip()
    if not text:
        raise ModelSourceError(f"{what} source is empty")
    refuse_pickles([text], f"{what} {text}")
    origin = Source.try_parse(text)
    addon = _fetch(origin, what) if origin is not None else None
    if addon is None:
        raise ModelSourceError(
            f"{what} source {text!r} is not a local .safetensors file or folder, an s3:// URI, "
            "a hub id (org/repo or org/repo/file.safetensors) or tiny:<version>"
        )
    return addon


def _fetch(origin: Source, what: str) -> ResolvedAddon | None:
    """The weights of `origin` here, checked, with their identity; None for a source an add-on
    cannot be (a local path that does not exist, a hub file that is not safetensors)."""
    if origin.kind == "tiny":
        from zimage_batch.model.tiny_controlnet import tiny_controlnet_file

        path = tiny_controlnet_file(origin.location)
        return ResolvedAddon(origin.identified(sha256_of(path)), str(path))
    if origin.kind == "s3":
        from zimage_batch.model.sources import cache_root

        if origin.names_file:
            path = fetch_s3_file(origin.location, cache_root() / "s3")
            entry = path.parent
        else:
            path = entry = fetch_s3_folder(origin.location, cache_root() / "s3")
        _check_local(path, what, origin.text)
        return ResolvedAddon(origin.identified(f"s3:{Path(entry).name}"), str(path))  # the entry: a hash of keys, ETags, sizes
    if origin.kind == "local" and os.path.exists(origin.location):
        _check_local(Path(origin.location), what, origin.text)
        return ResolvedAddon(origin.identified(sha256_of(origin.location)), origin.location)
    if origin.kind == "hub" and (origin.hub_file is None or origin.names_file):
        path, identity = _from_hub(origin, what)
        _check_local(path, what, origin.text)
        return ResolvedAddon(origin.identified(identity), str(path))
    return None


def _check_local(path: Path, what: str, source: str) -> None:
    """A single file must be safetensors (its header parses); a folder must hold safetensors
    weights and no pickles."""
    path = Path(path)
    if path.is_dir():
        names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
        refuse_pickles(names, f"{what} {source}")
        if not any(n.endswith(SAFETENSORS) for n in names):
            raise ModelSourceError(f"{what} {source} holds no .safetensors weights")
        return
    if path.suffix != SAFETENSORS:
        raise ModelSourceError(f"{what} {source} is not a .safetensors file (only safetensors weights are read)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - the library raises several kinds for a bad header
        raise ModelSourceError(f"{what} {source} is not a readable safetensors file ({type(exc).__name__})") from None


def _from_hub(origin: Source, what: str) -> tuple[Path, str]:
    """org/repo/file.safetensors: that file; org/repo: the repository's diffusers files."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, file = origin.hub_repo, origin.hub_file
    try:
        if file:
            path = Path(hf_hub_download(repo, file))
        else:
            path = Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline with an empty cache, unknown repo or file, no network
        reason = first_line(exc, 300)
        raise ModelSourceError(f"cannot fetch {what} {origin.text!r} from the hub: {type(exc).__name__}: {reason}") from None
    snapshot = next((p for p in [path, *path.parents] if p.parent.name == "snapshots"), None)
    commit = snapshot.name if snapshot else sha256_of(path)
    tail = f"/{file}" if file else ""
    return path, f"hub:{repo}@{commit}{tail}"


# ---------------------------------------------------------------------- identity of local bytes
def sha256_of(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of a file, or of a folder's files (relative names and contents), remembered
    in the cache per (path, size, mtime) so that large weights are hashed once."""
    path = Path(path).resolve()
    if path.is_dir():
        entries = sorted((str(p.relative_to(path)), file_sha256(p)) for p in path.rglob("*")
                         if p.is_file() and not p.name.startswith("."))
        return "sha256:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return "sha256:" + file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, remembered in the cache per (path, size, mtime, inode) so that
    large weights are hashed once per node, whichever process asks (the driver, the workers)."""
    from zimage_batch.model.sources import cache_root

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\x00{stat.st_size}\x00{stat.st_mtime_ns}\x00{stat.st_ino}".encode()).hexdigest()
    memo = cache_root() / "sha256" / f"{key[:32]}.txt"
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: hash again next time
    return value


def resolve_pinned(source: str, identity: str | None, what: str = "controlnet") -> ResolvedAddon:
    """`resolve_addon` on a worker's node: the weights must be the ones the run's fingerprint
    names (`identity`, resolved by the driver), or the worker refuses to start."""
    addon = resolve_addon(source, what)
    if identity and addon.identity != identity:
        raise ModelSourceError(f"{what} {source} changed since the run started ({addon.identity} here, "
                               f"{identity} in the job); run again to start over with it")
    return addon
