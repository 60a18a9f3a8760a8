"""Prompt expansion: a causal LM rewrites each short prompt into the detailed one Z-Image draws.

It runs on the worker, on the model thread, before the text encoder: the shard's distinct
prompts in batches (left padding, so every row's new tokens start at the same position),
greedy decoding, so a rerun of a shard writes the same prompts. On CUDA in bf16, on CPU in fp32.
"""

from __future__ import annotations

from typing import Any

#: The system prompt for Z-Image (`prompt_expansion_instructions` replaces it). Z-Image's text
#: encoder reads long, concrete, natural-language prompts in English or Chinese and renders text
#: in quotes; Turbo draws similar images from short prompts, which is what this rewrite is for.
DEFAULT_INSTRUCTIONS = (
    "You expand short image prompts for Z-Image, a text-to-image model. Rewrite the user's prompt as one "
    "detailed paragraph of at most 80 words that a painter or photographer could follow: the subject and "
    "what it does, its setting, composition and camera or viewpoint, lighting, colours, materials and the "
    "medium or style. Keep everything the prompt asks for and add nothing that contradicts it; keep any "
    "text to be written in the image verbatim, in double quotes. Write in the prompt's language. Answer "
    "with the expanded prompt only, no preamble, lists or notes."
)
DEFAULT_MAX_NEW_TOKENS = 256
EXPANSION_BATCH = 16  # prompts one generate() call expands


class PromptExpander:
    """A loaded causal LM and its tokenizer; `expand()` turns prompts into expanded ones."""

    def __init__(self, path: str, device: str, instructions: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.instructions = instructions or DEFAULT_INSTRUCTIONS
        self.max_new_tokens = max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                          trust_remote_code=False).to(device).eval()

    def chat_text(self, prompt: str) -> str:
        """The model's input for one prompt: the instructions as the system message, the prompt as
        the user's, thinking off (Qwen3's chat template honours enable_thinking)."""
        messages = [{"role": "system", "content": self.instructions}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "max_new_tokens": self.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}

    def expand(self, prompts: list[str], batch_size: int = EXPANSION_BATCH) -> list[str]:
        """Each prompt expanded (the prompt itself where the model writes nothing)."""
        import torch

        expanded: list[str] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            inputs = self.tokenizer([self.chat_text(p) for p in batch], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **self.generate_kwargs())
            new = out[:, inputs["input_ids"].shape[1]:]
            for prompt, tokens in zip(batch, new):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                expanded.append(text or prompt)
        return expanded
