"""Tiny random-init Z-Image checkpoints in the official diffusers folder layout.

They draw noise (the weights are random) but exercise every real code path: diffusers'
own `ZImagePipeline.from_pretrained` / `ZImageOmniPipeline.from_pretrained` load them.
Everything is built locally, the tokenizer included; nothing comes from the hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from zimage_batch.model.variants import get_variant

TINY_README = "Tiny random-init Z-Image checkpoint built by zimage-batch for tests and demos. It draws noise.\n"

# A Qwen3-style chat template: the fields ZImagePipeline passes (add_generation_prompt, enable_thinking).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Enough text in a few scripts for the byte-level BPE to learn some merges.
_CORPUS = [
    "a photo of a cat sitting on a red sofa, studio lighting, high detail",
    "a watercolor painting of mountains at sunrise with mist over a quiet lake",
    "portrait of an astronaut in a sunflower field, cinematic, 35mm film",
    "一只可爱的小猫坐在窗台上，阳光明媚，高清摄影",
    "夕阳下的古老城市，街道上有行人和自行车，电影感",
    "un chat noir sur un toit de Paris la nuit, style impressionniste",
    "Ein roter Apfel auf einem Holztisch, Stillleben, weiches Licht",
    "東京の夜景、ネオンの光、雨に濡れた道路",
    "user assistant system think image prompt photo painting render",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 600) -> int:
    """Train a byte-level BPE tokenizer on a built-in corpus and save it as a Qwen2 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config["padding_side"] = "right"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return len(fast)


def _components(variant: str, vocab_size: int, seed: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    hidden = 32
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            torch_dtype="float32",
        )
    )
    siglip = siglip_processor = None
    if get_variant(variant).needs_siglip:
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        siglip = Siglip2VisionModel(
            Siglip2VisionConfig(
                hidden_size=hidden,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                patch_size=16,
                num_patches=64,
            )
        )
        try:
            from transformers import Siglip2ImageProcessorPil as ProcessorClass
        except ImportError:  # older transformers
            from transformers import Siglip2ImageProcessor as ProcessorClass
        siglip_processor = ProcessorClass(patch_size=16, max_num_patches=64)
    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=hidden,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=hidden,
        siglip_feat_dim=hidden if siglip is not None else None,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 128, 128],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=get_variant(variant).scheduler_shift, use_dynamic_shifting=False
    )
    parts = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler}
    if siglip is not None:
        parts |= {"siglip": siglip, "siglip_processor": siglip_processor}
    return parts


def make_tiny_model(out_dir: str | os.PathLike, variant: str = "turbo", seed: int = 0) -> Path:
    """Write a tiny checkpoint of `variant` to `out_dir` (built in a temp folder, then renamed)."""
    spec = get_variant(variant)
    out = Path(out_dir)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" is no news in a run's output
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        vocab_size = build_tokenizer(tmp / "tokenizer")
        parts = _components(variant, vocab_size, seed)
        for name, module in parts.items():
            module.save_pretrained(tmp / name)  # safetensors for models
        index = {
            "_class_name": spec.pipeline_class,
            "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        if spec.needs_siglip:
            index |= {
                "siglip": ["transformers", "Siglip2VisionModel"],
                "siglip_processor": ["transformers", "Siglip2ImageProcessor"],
            }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "README.md").write_text(TINY_README + f"variant: {variant}\n")
        if out.exists():
            out.rmdir()  # only an empty folder may be replaced
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
