"""Does an adapter file load into this model? Answered from its safetensors header and the
transformer's config alone: no weights are read (only the small `.alpha` scalars the community
formats carry) and the transformer is built on the meta device, so this runs in the driver
before any model loads.

The keys go through diffusers' own `ZImagePipeline.lora_state_dict` conversion (diffusers/PEFT
keys, and the community `lora_unet_` / `diffusion_model.` formats), then each LoRA matrix must
name a linear layer of the transformer with matching sides: `lora_A` is (rank, in_features),
`lora_B` is (out_features, rank).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from zimage_batch.model.adapters import ResolvedAdapter
from zimage_batch.model.checkpoint import ModelSourceError

PREFIX = "transformer."  # diffusers' LoRA keys for the denoiser
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_LOKR_KEY = re.compile(r"^(?P<module>.+)\.lokr_\w+$")


def check_adapters_fit(adapters: dict[str, ResolvedAdapter], model_dir: str) -> None:
    """Refuse the first adapter that does not fit the transformer in `model_dir`."""
    for adapter in adapters.values():
        check_adapter_fits(adapter, model_dir)


def check_adapter_fits(adapter: ResolvedAdapter, model_dir: str) -> None:
    """Refuse an adapter whose keys or shapes do not fit the transformer in `model_dir`,
    naming the adapter, its source and the first offending key."""
    what = f"adapter {adapter.name!r} ({adapter.source})"
    keys = _converted_keys(adapter.path, what)
    layers = linear_layers(str(Path(model_dir) / "transformer"))
    ranks: dict[str, int] = {}
    for key, shape in sorted(keys.items()):
        problem = _key_problem(key, shape, layers, ranks)
        if problem:
            raise ModelSourceError(f"{what} does not fit this model: {problem}")


def _key_problem(key: str, shape: tuple[int, ...], layers: dict[str, tuple[int, int]], ranks: dict[str, int]) -> str | None:
    """Why one converted key does not fit, or None."""
    if not key.startswith(PREFIX):
        return f"key {key!r} is not for the transformer"
    name = key[len(PREFIX):]
    match = _LORA_KEY.match(name) or _LOKR_KEY.match(name)
    if match is None:
        return f"key {key!r} is not a LoRA weight"
    module = match["module"]
    if module not in layers:
        return f"key {key!r} names {module!r}, which is not a linear layer of this transformer"
    kind = match.groupdict().get("kind")
    in_features, out_features = layers[module]
    if kind in ("lora_A.weight", "lora_B.weight") and len(shape) != 2:
        return f"key {key!r} has shape {list(shape)}, not a matrix"
    if kind == "lora_A.weight":
        expected: tuple[int, ...] | None = (ranks.setdefault(module, shape[0]), in_features)
    elif kind == "lora_B.weight":
        expected = (out_features, ranks.setdefault(module, shape[1]))
    elif kind in ("lora_B.bias", "lora_magnitude_vector"):
        expected = (out_features,)
    else:  # LoKr factors: diffusers checks their sides when it loads them
        expected = None
    if expected is not None and tuple(shape) != expected:
        return (f"key {key!r} has shape {list(shape)}, the layer needs {list(expected)} "
                f"({module}: {in_features} -> {out_features}, rank {ranks.get(module)})")
    return None


def _converted_keys(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """The file's keys after diffusers' conversion, with their shapes (meta tensors)."""
    import torch
    from diffusers import ZImagePipeline
    from safetensors import SafetensorError, safe_open

    try:
        state: dict[str, Any] = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith(".alpha"):  # a scalar the conversion reads
                    state[key] = f.get_tensor(key)
                else:
                    shape = f.get_slice(key).get_shape()
                    state[key] = torch.empty(shape, device="meta")
    except (SafetensorError, OSError) as exc:
        raise ModelSourceError(f"{what} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    if not state:
        raise ModelSourceError(f"{what} holds no tensors")
    try:
        converted = ZImagePipeline.lora_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - diffusers' conversion refuses layouts it does not know
        raise ModelSourceError(f"{what}: diffusers cannot read its keys ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not any(key.startswith(PREFIX) for key in converted):
        raise ModelSourceError(
            f"{what} holds no LoRA weights for the transformer (keys such as {next(iter(converted))!r}; "
            f"diffusers loads keys starting '{PREFIX}', 'diffusion_model.' or 'lora_unet_')"
        )
    return {key: tuple(value.shape) for key, value in converted.items()}


@lru_cache(maxsize=8)
def linear_layers(transformer_dir: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer of the transformer whose config is in
    `transformer_dir`, built on the meta device (no memory, no weights read)."""
    import diffusers
    import torch

    config = json.loads((Path(transformer_dir) / "config.json").read_text())
    model_class = getattr(diffusers, config.get("_class_name", "ZImageTransformer2DModel"))
    with torch.device("meta"):
        model = model_class.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
