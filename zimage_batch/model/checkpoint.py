"""What a checkpoint must be before anything loads it: a diffusers folder of a Z-Image pipeline
that runs the job's variant, with safetensors weights only (pickle can run code when loaded)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from zimage_batch.model.variants import VARIANTS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelSourceError(ValueError):
    """The model source cannot be used (missing, unsafe, unknown)."""


def refuse_pickles(names: Iterable[str], what: str) -> None:
    """Refuse `what` if any of its file `names` holds pickle weights (the one pickle check)."""
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelSourceError(f"refusing {what}: pickle weights are not loaded, only safetensors ({', '.join(pickles[:3])})")


def check_checkpoint(path: Path) -> None:
    """Refuse folders that are not diffusers checkpoints or that carry pickle weights."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(f"{path} is not a diffusers checkpoint folder (no model_index.json)")
    refuse_pickles((str(p.relative_to(path)) for p in path.rglob("*")), f"checkpoint {path}")


def check_pipeline_class(path: Path, variant: str, source: str) -> None:
    """The checkpoint's pipeline must be a Z-Image one that runs `variant` (omni has parts turbo
    and base lack), or the workers would fail to load it after the job has started."""
    name = read_model_index(path).get("_class_name", "")
    omni_class = VARIANTS["omni"].pipeline_class
    if not str(name).startswith("ZImage"):
        raise ModelSourceError(f"{source} is not a Z-Image checkpoint: its model_index.json names {name!r}")
    if (name == omni_class) != (variant == "omni"):
        raise ModelSourceError(
            f"{source} holds a {name} checkpoint, which cannot run variant {variant!r} "
            f"(it needs a {VARIANTS[variant].pipeline_class} checkpoint); check --model and --variant"
        )


def read_model_index(path: Path | str) -> dict:
    """A checkpoint folder's model_index.json (which pipeline and parts it holds)."""
    index_path = Path(path) / "model_index.json"
    try:
        return json.loads(index_path.read_text())
    except ValueError as exc:
        raise ModelSourceError(f"{index_path} is not valid JSON ({exc})") from None
