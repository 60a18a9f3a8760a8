"""The prompt-expansion model (`prompt_expansion: SOURCE`): a transformers causal LM folder.

Sources take the add-on forms (model/addons.py: a local folder, s3:// folder, hub repository),
safetensors only, no remote code; the identity (sha256, S3 cache entry, hub commit) goes into
the job's fingerprint. The folder must hold a `config.json` of a causal LM that transformers
itself implements and a tokenizer with a chat template; this is read without loading weights,
so a wrong source is refused before any worker starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from zimage_batch.model.addons import ResolvedAddon, resolve_addon, resolve_pinned
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.source import Source

WHAT = "prompt_expansion"
#: The default: Qwen3-4B-Instruct-2507 (Apache-2.0), the instruct sibling of the Qwen3-4B that is
#: Z-Image's own text encoder, the size Z-Image users run beside it (about 8 GB in bf16).
DEFAULT_PROMPT_MODEL = "Qwen/Qwen3-4B-Instruct-2507"


TINY_NAME = "prompt"
TINY_SOURCE = f"tiny:{TINY_NAME}"  # the tiny random LM, built once into the cache (tests and demos)
TINY_PROMPT_VERSION = "v1"  # bump when the tiny LM changes, so stale caches are rebuilt


def resolve_prompt_model(source: str, identity: str | None = None) -> ResolvedAddon:
    """Fetch and check the expansion model; with `identity` (on a worker), the very weights the job names."""
    origin = Source.try_parse(source)
    if origin is not None and origin.kind == "tiny":
        if origin.location != TINY_NAME:
            raise ModelSourceError(f"{WHAT} {source}: the tiny prompt model is {TINY_SOURCE}")
        return ResolvedAddon(origin.identified(f"{TINY_SOURCE}-{TINY_PROMPT_VERSION}"), str(_tiny_prompt_model()))
    addon = resolve_pinned(source, identity, WHAT) if identity else resolve_addon(source, WHAT)
    check_causal_lm(Path(addon.path), source)
    return addon


def check_causal_lm(path: Path, source: str) -> None:
    """`path` must be a folder with the config of a causal LM transformers implements (no remote
    code) and a tokenizer that has a chat template."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path.is_dir():
        raise ModelSourceError(f"{WHAT} {source} is a single file; give the model's folder (config.json, "
                               "tokenizer files, .safetensors weights)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelSourceError(f"{WHAT} {source} is not a transformers model folder (no readable config.json)") from None
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if config.get("auto_map"):
        raise ModelSourceError(f"{WHAT} {source} needs remote code (auto_map in config.json), which is never run")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            architectures and not any(a.endswith("ForCausalLM") for a in architectures)):
        raise ModelSourceError(f"{WHAT} {source} is not a causal LM (model_type {model_type!r}, architectures "
                               f"{', '.join(architectures) or 'none'}); give a text-generation model such as "
                               f"{DEFAULT_PROMPT_MODEL}")
    if not _has_chat_template(path):
        raise ModelSourceError(f"{WHAT} {source} has no chat template (an instruct model's tokenizer has one)")


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _tiny_prompt_model() -> Path:
    """tiny:prompt: built into a temporary folder beside its place, then renamed into it (another
    process building it at the same time leaves the same folder)."""
    import os
    import shutil
    import tempfile

    from zimage_batch.model.sources import cache_root

    path = cache_root() / "tiny" / f"prompt-lm-{TINY_PROMPT_VERSION}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        building = tempfile.mkdtemp(prefix=".prompt-lm-", dir=path.parent)
        try:
            make_tiny_prompt_model(building)
            os.rename(building, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return path


def make_tiny_prompt_model(directory: str, seed: int = 0) -> str:
    """A tiny random-init Qwen3 causal LM with a locally trained tokenizer and a Qwen3-style chat
    template, saved with save_pretrained (safetensors); nothing comes from the hub. It writes noise."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from zimage_batch.model.tiny import build_tokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         tie_word_embeddings=False, initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # special tokens score 0: greedy decoding writes text rather than stopping at once
        model.get_output_embeddings().weight[tokenizer.all_special_ids] = 0.0
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text("Tiny random-init prompt-expansion model built by zimage-batch for tests. "
                                   "It writes noise.\n")
    return str(out)
