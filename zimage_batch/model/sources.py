"""Model sources: one string names a checkpoint (`Source.parse` reads it); this turns it into a
local folder.

    tiny:<variant>          a tiny random-init checkpoint, built once into the cache
    s3://bucket/prefix/     copied once into a local cache keyed by the objects' ETags
    /path/to/folder         a local diffusers folder
    Org/Name                a hub id, downloaded once into the Hugging Face cache (honours HF_HUB_OFFLINE)

Only safetensors weights are accepted; no source ever runs remote code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zimage_batch.model.cache import fetch_s3_folder
from zimage_batch.model.checkpoint import ModelSourceError, check_checkpoint, check_pipeline_class, read_model_index
from zimage_batch.model.tiny import TINY_README, make_tiny_model
from zimage_batch.model.variants import VARIANTS, variant_for_hub_id
from zimage_batch.source import Source
from zimage_batch.storage import StorageError, open_storage
from zimage_batch.text import first_line

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]
TINY_VERSION = "v1"  # bump when the tiny layout changes so stale caches are rebuilt


@dataclass(frozen=True)
class ResolvedModel:
    origin: Source  # the source as the job names it
    path: str  # local checkpoint folder
    variant: str

    @property
    def source(self) -> str:
        """What the user wrote."""
        return self.origin.text

    @property
    def draws_noise(self) -> bool:
        """A tiny random-init checkpoint (tiny:<variant>, or a folder `make-tiny-model` wrote)."""
        readme = Path(self.path) / "README.md"
        return self.origin.draws_noise or (readme.is_file() and readme.read_text(errors="replace").startswith(TINY_README))


def cache_root() -> Path:
    """Where zimage-batch keeps tiny checkpoints and S3 model copies."""
    root = os.environ.get("ZIMAGE_BATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "zimage-batch"
    )
    return Path(root)


def resolve_model(source: str | Source, variant: str | None = None) -> ResolvedModel:
    """Fetch (if needed) and check the checkpoint named by `source`."""
    origin = Source.try_parse(source)
    if origin is not None and origin.kind == "tiny":
        tiny_variant = guess_variant(origin)
        path = _tiny_checkpoint(tiny_variant)
        check_pipeline_class(path, variant or tiny_variant, origin.text)
        return ResolvedModel(origin, str(path), variant or tiny_variant)
    path = _checkpoint_folder(origin) if origin is not None else None
    if origin is None or path is None:
        raise ModelSourceError(f"model source {str(source)!r} is not a folder, an s3:// prefix, a hub id or tiny:<variant>")
    check_checkpoint(path)
    variant = variant or infer_variant(origin.text, path)
    check_pipeline_class(path, variant, origin.text)
    return ResolvedModel(origin, str(path), variant)


def _checkpoint_folder(origin: Source) -> Path | None:
    """The local folder of an S3 folder (cached), a local folder or a hub repository; None for
    anything else (a local file or none, a file in a hub repository)."""
    if origin.kind == "s3":
        return fetch_s3_folder(origin.location, cache_root() / "s3")
    if origin.kind == "local" and os.path.isdir(origin.location):
        return Path(origin.location)
    if origin.kind == "hub" and origin.hub_file is None:
        return _hub_checkpoint(origin.location)
    return None


def guess_variant(source: str | Source) -> str:
    """The variant of `source` without fetching its weights (at most its model_index.json)."""
    origin = Source.try_parse(source)
    if origin is None:
        return "turbo"  # fetching the model later says what is wrong with it
    if origin.kind == "tiny":
        if origin.location not in VARIANTS:
            raise ModelSourceError(f"unknown tiny model {origin.text!r}; use tiny:{'|tiny:'.join(VARIANTS)}")
        return origin.location
    if origin.kind == "s3":
        storage = open_storage(origin.location)
        try:
            index = storage.get_json("model_index.json")
        except (FileNotFoundError, StorageError):
            return "turbo"  # fetching the model later says what is wrong with it
        try:
            readme = storage.get_bytes("README.md").decode(errors="replace")
        except (FileNotFoundError, StorageError):
            readme = None
        return _variant_from_index(index, readme) or "turbo"
    folder = Path(origin.location)
    if origin.kind == "local" and folder.is_dir():
        return infer_variant(origin.text, folder) if (folder / "model_index.json").is_file() else "turbo"
    return variant_for_hub_id(origin.text) or "turbo"


def _variant_from_index(index: dict, readme: str | None) -> str | None:
    """omni from the pipeline's parts; turbo or base only from a `variant:` line in the README."""
    if index.get("_class_name") == VARIANTS["omni"].pipeline_class or "siglip" in index:
        return "omni"
    if readme is not None:
        for line in readme.splitlines():
            if line.startswith("variant:") and line.split(":", 1)[1].strip() in VARIANTS:
                return line.split(":", 1)[1].strip()
    return None


def source_for_variant(model: str, models: dict[str, str], variant: str, job_variant: str) -> str:
    """The model source that runs rows of `variant`: `models[variant]` when the job names one,
    else the job's model for its own variant, else the same family (tiny:<v>, the variant's hub id)."""
    if variant in models:
        return models[variant]
    if variant == job_variant:
        return model
    origin = Source.try_parse(model)
    if origin is not None and origin.kind == "tiny":
        return f"tiny:{variant}"
    if variant_for_hub_id(model) and VARIANTS[variant].hub_id:
        return VARIANTS[variant].hub_id
    raise ModelSourceError(
        f"rows ask for variant {variant!r} but the job names no model for it; add it with --set models.{variant}=SOURCE"
    )


def infer_variant(source: str, path: Path) -> str:
    """Best guess of a checkpoint's variant when the job does not say."""
    by_hub = variant_for_hub_id(source)
    if by_hub:
        return by_hub
    index = read_model_index(path)
    readme = Path(path) / "README.md"
    return _variant_from_index(index, readme.read_text(errors="replace") if readme.is_file() else None) or "turbo"


def _tiny_checkpoint(variant: str) -> Path:
    path = cache_root() / "tiny" / f"{variant}-{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        try:
            make_tiny_model(path, variant)
        except OSError:
            # Another process finished the same build first: its complete folder is as good as ours.
            if not (path / "model_index.json").is_file():
                raise
    return path


def _hub_checkpoint(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline with an empty cache, unknown repo, no network
        raise ModelSourceError(_hub_failure(repo_id, exc, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)) from None


def _hub_failure(repo_id: str, exc: BaseException, offline: bool, cache: str) -> str:
    """One line that says what to do when a hub model cannot be had: what HF_HUB_OFFLINE does,
    the other sources `--model` takes, and tiny:turbo to try the pipeline without one."""
    others = ("or give --model a local diffusers folder or an s3:// folder; "
              "to try the pipeline without the real weights, --model tiny:turbo (random weights, draws noise)")
    if offline:
        return (f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, so it "
                f"cannot be downloaded: fetch it once online (hf download {repo_id}), point HF_HOME at a cache "
                f"that holds it, {others}")
    return (f"cannot fetch {repo_id!r} from the hub ({type(exc).__name__}: {first_line(exc, 200)}): check the "
            f"id and the network (HF_HUB_OFFLINE=1 uses only the Hugging Face cache), {others}")
