"""Tiny random-init ControlNet Union checkpoints matching the tiny Z-Image models (`tiny.py`).

Three shapes, as published by alibaba-pai (`Z-Image-Turbo-Fun-Controlnet-Union*`):

    1.0   control_in_dim 16 (the control latents as they are), no control refiner
    2.0   control_in_dim 33 (the pipelines pad the latents, or add mask + masked-image latents
          for inpaint), refiner hints from the control layers (its refiner blocks are in the
          file with a zero `before_proj`, and diffusers drops them)
    2.1   control_in_dim 33, its own control refiner blocks

Written as one `.safetensors` file in the official key layout (what `from_single_file` reads),
or with `folder=True` as a diffusers folder (`config.json` + weights, for `from_pretrained`).
diffusers zero-initialises the projections that feed the hints back (`before_proj`,
`after_proj`): a ControlNet built that way changes nothing, so here they get random weights,
and a control image moves the pixels.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from zimage_batch.model.checkpoint import ModelSourceError

VERSIONS = ("1.0", "2.0", "2.1")
TINY_CONTROLNET_VERSION = "v1"  # bump when the tiny layout changes so stale caches are rebuilt
# Random projections this strong make a condition move a tiny model's pixels by tens of levels
# (measured: two different conditions 34-122/255 apart at most), not a few.
PROJECTION_STD = 0.5
TINY_CONTROLNET_README = "Tiny random-init Z-Image ControlNet Union built by zimage-batch for tests and demos.\n"


def tiny_controlnet_config(version: str, refiner_blocks: bool | None = None) -> dict:
    """The ZImageControlNetModel config of a tiny ControlNet of `version` (the tiny transformer
    has dim 32, 2 layers, 1 noise-refiner layer, 2 heads). `refiner_blocks` builds 2.0 with its
    unused refiner blocks (as in the official single file)."""
    if version not in VERSIONS:
        raise ModelSourceError(f"unknown ControlNet version {version!r}; use one of {', '.join(VERSIONS)}")
    config = dict(control_layers_places=[0, 1], all_patch_size=[2], all_f_patch_size=[1], dim=32,
                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True)
    if version == "1.0":
        return config | dict(control_in_dim=16, control_refiner_layers_places=None, add_control_noise_refiner=None)
    mode = "control_noise_refiner" if version == "2.1" or refiner_blocks else "control_layers"
    return config | dict(control_in_dim=33, control_refiner_layers_places=[0], add_control_noise_refiner=mode)


def build_tiny_controlnet(version: str, seed: int = 0, refiner_blocks: bool = False) -> Any:
    """A tiny ZImageControlNetModel of `version` with every weight random and non-zero (but a
    2.0's refiner `before_proj`, which marks the version and which diffusers does not use)."""
    import torch
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    model = ZImageControlNetModel(**tiny_controlnet_config(version, refiner_blocks))
    for name, module in model.named_modules():
        if name.endswith(("before_proj", "after_proj")):  # diffusers' zero init would make the control a no-op
            torch.nn.init.normal_(module.weight, std=PROJECTION_STD)
            torch.nn.init.normal_(module.bias, std=0.01)
    if version == "2.0" and refiner_blocks:
        torch.nn.init.zeros_(model.control_noise_refiner[0].before_proj.weight)
        torch.nn.init.zeros_(model.control_noise_refiner[0].before_proj.bias)
    return model.eval()


def make_tiny_controlnet(out: str | os.PathLike, version: str = "2.1", seed: int = 0, folder: bool = False) -> Path:
    """Write a tiny ControlNet of `version`: a single `.safetensors` file at `out`, or with
    `folder` a diffusers folder. Written beside `out` first, then renamed into place."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists")
    if not folder and out.suffix != ".safetensors":
        raise ModelSourceError(f"a single-file ControlNet is a .safetensors file, not {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-controlnet-", dir=out.parent))
    try:
        if folder:
            build_tiny_controlnet(version, seed).save_pretrained(tmp / "net", safe_serialization=True)
            (tmp / "net" / "README.md").write_text(TINY_CONTROLNET_README + f"version: {version}\n")
            if out.exists():
                out.rmdir()  # only an empty folder may be replaced
            os.rename(tmp / "net", out)
        else:
            model = build_tiny_controlnet(version, seed, refiner_blocks=version == "2.0")
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, tmp / out.name, metadata={"format": "pt", "zimage_batch": f"tiny controlnet {version}"})
            os.rename(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_controlnet_file(version: str) -> Path:
    """`tiny:<version>`: the tiny single-file ControlNet of `version`, built once into the cache."""
    from zimage_batch.model.sources import cache_root

    if version not in VERSIONS:
        raise ModelSourceError(f"unknown tiny ControlNet tiny:{version}; use tiny:{' | tiny:'.join(VERSIONS)}")
    path = cache_root() / "tiny" / f"controlnet-{version}-{TINY_CONTROLNET_VERSION}.safetensors"
    if not path.is_file():
        try:
            make_tiny_controlnet(path, version)
        except FileExistsError:
            pass  # another process finished the same build first
    return path

