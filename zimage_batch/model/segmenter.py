"""The CLIPSeg segmenter of masks from words (issue 28): its folder checked, and a tiny random
one built locally for tests and demos.

The weights are a transformers folder (`config.json` of a `clipseg` model, safetensors weights,
the processor's and tokenizer's files), from the sources add-ons take (model/addons.py): local,
s3://, or a hub repository (default `CIDAS/clipseg-rd64-refined`). `make_tiny_segmenter` writes a
random-init CLIPSeg with a byte-level CLIP tokenizer (no merges) and a 64 px image processor,
built here, nothing from the hub; transformers loads it like the published one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zimage_batch.model.checkpoint import ModelSourceError


def check_segmenter(path: str | os.PathLike, source: str) -> None:
    """A CLIPSeg folder: a config of model_type clipseg beside safetensors weights."""
    folder = Path(path)
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        raise ModelSourceError(f"segmenter {source} is not a folder with a config.json (a CLIPSeg model folder)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"segmenter {source}: unreadable config.json ({exc})") from None
    if model_type != "clipseg":
        raise ModelSourceError(f"segmenter {source} is a {model_type!r} model, not CLIPSeg")


def make_tiny_segmenter(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-init CLIPSeg folder that CLIPSegForImageSegmentation and
    CLIPSegProcessor load (its masks are noise: for tests and demos)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer
    from transformers import ViTImageProcessorPil as ImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab |= {c: 2 + i for i, c in enumerate(alphabet)}
    vocab |= {c + "</w>": 2 + len(alphabet) + i for i, c in enumerate(alphabet)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    images = ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406],
                            image_std=[0.229, 0.224, 0.225])
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=16, reduce_dim=16, extract_layers=[1, 2], decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out
