"""Scorer checkpoints: each source fetched and checked like any add-on (local file or folder,
s3:// through the verified cache, hub repository or file; safetensors only, never remote code),
then checked for what its scorer needs, from its config and safetensors header alone:

    clip       a folder whose config.json is a CLIPModel's (model_type clip)
    aesthetic  one .safetensors file: Linear layers `layers.<i>.weight/bias` that chain from the
               CLIP projection dim down to one output (the LAION improved aesthetic predictor)
    nsfw       a folder with an image-classification config that has a label named nsfw
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from zimage_batch.curate.spec import Curation, CurationError
from zimage_batch.model.addons import ResolvedAddon, resolve_addon, resolve_pinned
from zimage_batch.model.checkpoint import ModelSourceError

_LAYER_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


def resolve_scorers(curation: Curation, pinned: bool = False) -> dict[str, ResolvedAddon]:
    """Each checkpoint the job's curation needs, fetched and checked (on the driver first; with
    `pinned`, on a worker: the bytes must be the ones the run's fingerprint names)."""
    resolved = {}
    for name in curation.checkpoints:
        source, what = curation.sources[name], f"scorers.{name}"
        resolved[name] = resolve_pinned(source, curation.ids.get(name), what) if pinned else resolve_addon(source, what)
    clip_dim = _clip_projection_dim(resolved["clip"]) if "clip" in resolved else None
    if "aesthetic" in resolved:
        aesthetic_widths(resolved["aesthetic"], clip_dim)
    if "nsfw" in resolved:
        nsfw_label(_config(resolved["nsfw"]), resolved["nsfw"].source)
    return resolved


def _config(addon: ResolvedAddon) -> dict:
    path = Path(addon.path) / "config.json"
    if addon.single_file or not path.is_file():
        raise ModelSourceError(f"{addon.source} is not a transformers checkpoint folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ModelSourceError(f"{addon.source}: config.json does not parse") from None


def _clip_projection_dim(addon: ResolvedAddon) -> int:
    config = _config(addon)
    if config.get("model_type") != "clip":
        raise ModelSourceError(f"scorers.clip {addon.source} is not a CLIPModel checkpoint "
                               f"(model_type {config.get('model_type')!r})")
    return int(config.get("projection_dim") or 512)


def nsfw_label(config: Mapping, source: str) -> int:
    """The class index of the label named nsfw (any case) in an image classifier's config."""
    labels = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    found = [i for i, label in labels.items() if label.lower() == "nsfw"]
    if not found:
        raise ModelSourceError(f"scorers.nsfw {source} has no label named nsfw (labels: {sorted(labels.values())})")
    return found[0]


def aesthetic_widths(addon: ResolvedAddon, clip_dim: int | None) -> list[int]:
    """The head's widths, input first, from its safetensors header; refuses another layout or an
    input that is not the CLIP projection dim."""
    if not addon.single_file:
        raise ModelSourceError(f"scorers.aesthetic {addon.source} is a folder; give the head's .safetensors file")
    from safetensors import safe_open

    with safe_open(addon.path, "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    return chain_widths(shapes, addon.source, clip_dim)


def chain_widths(shapes: Mapping[str, list[int]], source: str, clip_dim: int | None) -> list[int]:
    layers = sorted({int(m.group(1)) for key in shapes if (m := _LAYER_KEY.fullmatch(key))})
    if not layers or len(layers) * 2 != len(shapes):
        raise ModelSourceError(f"scorers.aesthetic {source} is not in the LAION aesthetic predictor layout "
                               "(layers.<i>.weight and layers.<i>.bias of Linear layers only)")
    widths = [shapes[f"layers.{layers[0]}.weight"][1]]
    for i in layers:
        out, into = shapes[f"layers.{i}.weight"]
        if into != widths[-1] or list(shapes[f"layers.{i}.bias"]) != [out]:
            raise ModelSourceError(f"scorers.aesthetic {source}: layers.{i} does not follow the layer before it")
        widths.append(out)
    if widths[-1] != 1:
        raise ModelSourceError(f"scorers.aesthetic {source} ends in {widths[-1]} outputs, not one score")
    if clip_dim is not None and widths[0] != clip_dim:
        raise CurationError(f"scorers.aesthetic {source} reads {widths[0]}-dim embeddings; "
                            f"the CLIP scorer makes {clip_dim}-dim ones")
    return widths
