"""Loading a Z-Image ControlNet Union (`ZImageControlNetModel`) beside a loaded transformer.

A diffusers folder loads with `from_pretrained`. The official single `.safetensors` file loads
with `from_single_file`, which would fetch its config from the hub; here the config is read off
the file itself and the transformer it is for, so nothing is downloaded:

    control_in_dim              the control patch embedder's width / 4 (16: 1.0; 33: 2.x)
    control_layers_places       one control layer every n_layers / (control layers) blocks
                                (6 on a 30-layer model: 0, 5, ..., 25; 15: 0, 2, ..., 28)
    add_control_noise_refiner   refiner blocks with a non-zero before_proj: 2.1
                                ("control_noise_refiner"); none, or a zero before_proj: 2.0
                                ("control_layers"); plain refiner blocks: 1.0 (None)
    dim, heads, norms, patches  the transformer's (a file for another model is refused)

as diffusers' own `infer_diffusers_model_type` tells the published versions apart.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from zimage_batch.model.checkpoint import ModelSourceError

EMBEDDER = "control_all_x_embedder.2-1.weight"
SHARED_CONFIG = ("dim", "n_heads", "n_kv_heads", "norm_eps", "qk_norm", "all_patch_size", "all_f_patch_size")


def load_controlnet(path: str, transformer: Any, dtype: Any, device: str | None = None) -> Any:
    """The ControlNet at `path` (a .safetensors file or a diffusers folder), sharing the
    transformer's embedders and refiners as diffusers' ControlNet pipelines do."""
    from diffusers import ZImageControlNetModel

    if Path(path).is_dir():
        folder = Path(path) / "controlnet" if (Path(path) / "controlnet" / "config.json").is_file() else Path(path)
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a diffusers ControlNet folder (no config.json)")
        model = ZImageControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    else:
        config = single_file_config(path, dict(transformer.config))
        with tempfile.TemporaryDirectory(prefix="zimage-controlnet-") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            model = ZImageControlNetModel.from_single_file(path, config=tmp, torch_dtype=dtype, local_files_only=True)
    check_matches(dict(model.config), dict(transformer.config), path)
    model = ZImageControlNetModel.from_transformer(model, transformer)
    return (model.to(device) if device else model).eval()


def single_file_config(path: str, transformer_config: dict) -> dict:
    """The ZImageControlNetModel config of a single-file checkpoint for this transformer."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        if EMBEDDER not in keys:
            raise ModelSourceError(f"{path} is not a Z-Image ControlNet (no {EMBEDDER})")
        width, in_features = f.get_slice(EMBEDDER).get_shape()
        before = "control_noise_refiner.0.before_proj.weight"
        refiner_before_zero = bool((f.get_tensor(before) == 0).all()) if before in keys else None
    layers = _block_indices(keys, "control_layers.")
    refiners = _block_indices(keys, "control_noise_refiner.")
    n_layers = int(transformer_config["n_layers"])
    if not layers or layers != list(range(len(layers))) or n_layers % len(layers):
        raise ModelSourceError(f"{path}: {len(layers)} control layers do not spread evenly over the model's "
                               f"{n_layers}; give a diffusers folder with its config.json")
    if refiner_before_zero is False:
        mode = "control_noise_refiner"  # 2.1
    elif refiners and refiner_before_zero is None and not any("_proj." in k for k in keys if k.startswith("control_noise_r")):
        mode = None  # 1.0: plain transformer blocks refine the control context
    else:
        mode = "control_layers"  # 2.0
    n_refiners = len(refiners) or int(transformer_config["n_refiner_layers"])
    config = {name: transformer_config[name] for name in SHARED_CONFIG}
    return config | {
        "_class_name": "ZImageControlNetModel",
        "dim": int(width),
        "control_in_dim": int(in_features) // (2 * 2 * 1),
        "control_layers_places": [i * (n_layers // len(layers)) for i in range(len(layers))],
        "control_refiner_layers_places": None if mode is None else list(range(n_refiners)),
        "add_control_noise_refiner": mode,
        "n_refiner_layers": n_refiners,
    }


def check_matches(config: dict, transformer_config: dict, path: str) -> None:
    """The ControlNet must be built for this transformer: same width and heads, and hints only
    for layers the transformer has."""
    for name in ("dim", "n_heads"):
        if config[name] != transformer_config[name]:
            raise ModelSourceError(f"ControlNet {path} is for a model with {name}={config[name]}, "
                                   f"not this model's {transformer_config[name]}")
    if max(config["control_layers_places"]) >= transformer_config["n_layers"]:
        raise ModelSourceError(f"ControlNet {path} adds to layers up to {max(config['control_layers_places'])}; "
                               f"the model has {transformer_config['n_layers']}")


def input_width(controlnet: Any) -> int:
    """The control context's channels: 16 (1.0: the control latents as they are) or 33 (2.x)."""
    return int(controlnet.config.control_in_dim)


def _block_indices(keys: list[str], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def check_controlnet_fits(path: str, model_dir: str, source: str) -> None:
    """Refuse a ControlNet that cannot load beside the model in `model_dir` (no weights loaded)."""
    transformer = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    if Path(path).is_dir():
        folder = Path(path) / "controlnet" if (Path(path) / "controlnet" / "config.json").is_file() else Path(path)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            raise ModelSourceError(f"controlnet {source} is not a diffusers ControlNet folder "
                                   "(no readable config.json)") from None
        if config.get("_class_name") != "ZImageControlNetModel":
            raise ModelSourceError(f"controlnet {source} holds a {config.get('_class_name')!r}, not a ZImageControlNetModel")
    else:
        config = single_file_config(path, transformer)
    check_matches(config, transformer, source)
