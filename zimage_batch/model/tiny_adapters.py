"""Tiny random LoRA adapters matching a tiny checkpoint's transformer, for tests and demos.

PEFT initialises `lora_B` to zero, which would make a fresh adapter change nothing; these draw
both matrices at random, so an adapter visibly moves the pixels. Each adapter is seeded by its
name (the same name gives the same file), and its rank (4 or 8) and target layers (attention
only, or attention and feed-forward) follow from the name too, so that adapters in one job differ
in shape as real ones do.

Two key layouts, each one diffusers loads:
    diffusers   transformer.layers.0.attention.to_q.lora_A.weight / .lora_B.weight
    kohya       lora_unet_layers_0_attention_to_q.lora_down.weight / .lora_up.weight / .alpha
                (the community format; diffusers converts it, folding alpha/rank into the weights)
The kohya file of a name holds the same adapter as its diffusers file: alpha is rank/2 and the
down matrix is doubled, so after diffusers' conversion the weights are bit for bit the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMATS = ("diffusers", "kohya")
ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FEED_FORWARD = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
BLOCKS = ("layers", "noise_refiner", "context_refiner")


def adapter_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def tiny_adapter_weights(model_dir: str | os.PathLike, name: str, rank: int | None = None,
                         feed_forward: bool | None = None) -> dict:
    """{module: (A, B)}: a random LoRA for the transformer in `model_dir` (diffusers layout);
    rank and feed-forward layers follow from the name unless given."""
    import torch

    from zimage_batch.model.adapter_fit import linear_layers

    layers = linear_layers(str(Path(model_dir) / "transformer"))
    seed = adapter_seed(name)
    rank = rank or (4 if seed % 2 else 8)
    feed_forward = bool((seed >> 1) % 2) if feed_forward is None else feed_forward
    targets = ATTENTION + (FEED_FORWARD if feed_forward else ())
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for module, (in_features, out_features) in sorted(layers.items()):
        if module.split(".")[0] in BLOCKS and module.split(".", 2)[-1] in targets:
            a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            b = torch.randn(out_features, rank, generator=generator) * 0.5 / rank**0.5
            weights[module] = (a, b)
    return weights


def make_tiny_adapter(model_dir: str | os.PathLike, out_file: str | os.PathLike, name: str, fmt: str = "diffusers",
                      **shape: int | bool | None) -> Path:
    """Write adapter `name` for the tiny model in `model_dir` to `out_file` in layout `fmt`
    (`shape`: rank=, feed_forward= to fix what the name would choose)."""
    import torch
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"adapter format must be one of {'|'.join(FORMATS)}, got {fmt!r}")
    state = {}
    for module, (a, b) in tiny_adapter_weights(model_dir, name, **shape).items():
        if fmt == "diffusers":
            state[f"transformer.{module}.lora_A.weight"] = a
            state[f"transformer.{module}.lora_B.weight"] = b
        else:
            rank = a.shape[0]
            key = "lora_unet_" + module.replace(".", "_")
            state[f"{key}.lora_down.weight"] = a * 2
            state[f"{key}.lora_up.weight"] = b
            state[f"{key}.alpha"] = torch.tensor(rank / 2)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    info = {"format": "pt", "zimage_batch": json.dumps({"tiny_adapter": name, "layout": fmt})}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=info)
    os.replace(tmp, out)
    return out
