"""Tiny random-init scorer checkpoints, built locally (nothing comes from the hub), that
transformers loads with its own classes: for tests and demos, like the tiny Z-Image models.

    clip       a CLIPModel folder with its CLIPProcessor (a byte-level CLIP tokenizer, 32x32 images)
    aesthetic  one .safetensors file in the LAION improved aesthetic predictor layout, over the
               tiny CLIP's projection dim
    nsfw       a ViTForImageClassification folder with labels {0: normal, 1: nsfw}
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_SCORERS = ("clip", "aesthetic", "nsfw")
PROJECTION_DIM = 16  # the tiny CLIP's embedding size, which the tiny aesthetic head reads
IMAGE_SIZE = 32
MAX_TEXT_TOKENS = 32
# The LAION predictor's Linear layers sit at these indices of its nn.Sequential (Dropouts between);
# the full-size widths are 768 -> 1024 -> 128 -> 64 -> 16 -> 1, the tiny ones below.
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)
TINY_AESTHETIC_WIDTHS = (PROJECTION_DIM, 32, 16, 8, 4, 1)


def make_tiny_scorer(out: str | os.PathLike, kind: str, seed: int = 0) -> Path:
    """Write a tiny `kind` scorer to `out` (a folder; for `aesthetic`, a .safetensors file, or
    `aesthetic.safetensors` inside the folder `out`) and return its path."""
    import torch

    if kind not in TINY_SCORERS:
        raise ValueError(f"unknown scorer {kind!r} (tiny scorers: {', '.join(TINY_SCORERS)})")
    torch.manual_seed(seed)
    out = Path(out)
    if kind == "aesthetic":
        path = out if out.suffix == ".safetensors" else out / "aesthetic.safetensors"
        return _aesthetic(path)
    out.mkdir(parents=True, exist_ok=True)
    (_clip if kind == "clip" else _nsfw)(out)
    (out / "README.md").write_text(f"Tiny random-init {kind} scorer written by zimage-batch (tests and demos).\n")
    return out


def clip_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    """A CLIP tokenizer over single bytes (CLIP's byte-to-unicode alphabet, each also as a word
    end) and no merges: every prompt tokenizes, nothing is learned or downloaded."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable + [256 + n for n in range(256 - len(printable))]
    chars = [chr(c) for c in codes]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TEXT_TOKENS)


def _clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    ends = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TEXT_TOKENS,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=ends, pad_token_id=ends)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)).save_pretrained(out)


def _nsfw(out: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    ViTForImageClassification(config).save_pretrained(out)


def _aesthetic(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    widths = TINY_AESTHETIC_WIDTHS
    for n, index in enumerate(AESTHETIC_LAYERS):
        layer = torch.nn.Linear(widths[n], widths[n + 1])
        tensors[f"layers.{index}.weight"] = layer.weight.detach().contiguous()
        tensors[f"layers.{index}.bias"] = layer.bias.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
