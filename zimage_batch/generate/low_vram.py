"""The low-VRAM profile: the text encoder and the transformer take turns on a small GPU.

A 16 GB card cannot hold the bf16 transformer (12.3 GB) and Qwen3-4B (8 GB) at once. Here the
transformer and everything small stay on the device and the text encoder waits on the CPU;
each shard's prompts are encoded ahead in one turn of the text encoder (`encode_ahead`), kept
on the CPU, and every batch then denoises from the cache with the transformer back in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

CacheKey = tuple[str, bool]  # (templated text, padded to the maximum length)


class TakingTurns:
    """Places a pipeline's parts for low VRAM and keeps the prompts encoded ahead."""

    def __init__(self, pipe: Any, device: str, offload_all: bool) -> None:
        """`offload_all`: the variant's reference path needs every part at once (omni), so it
        uses diffusers' model offload instead of taking turns."""
        self.pipe = pipe
        self.device = device
        self.on_cuda = str(device).startswith("cuda")
        self.swaps = 0  # how often the text encoder and the transformer traded places
        self.active = False  # True while the two take turns
        self._resident = ""  # which of the two is on the device ("" when unknown)
        self._cache: dict[CacheKey, torch.Tensor] = {}  # embeddings, on the CPU
        self._users: dict[CacheKey, int] = {}  # how many shards still need each entry
        if offload_all:
            if self.on_cuda:
                pipe.enable_model_cpu_offload(device=device)
            return
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "text_encoder":
                component.to(device)
        pipe.text_encoder.to("cpu")
        self.active, self._resident = True, "transformer"

    def bring(self, name: str) -> None:
        """Put `name` (text_encoder | transformer) on the device and the other on the CPU."""
        if not self.active or self._resident == name:
            return
        other = "transformer" if name == "text_encoder" else "text_encoder"
        self._resident = ""  # unknown until both moves succeed: a failed move is redone in full
        getattr(self.pipe, other).to("cpu")
        if self.on_cuda:
            torch.cuda.empty_cache()
        getattr(self.pipe, name).to(self.device)
        self._resident = name
        self.swaps += 1

    def lookup(self, keys: Sequence[CacheKey], encode: Callable[[list[str], bool], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Embeddings for `keys` on the device: cached ones from the cache, others encoded now
        by `encode` (one more turn of the text encoder; those are not kept)."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        fresh: dict[CacheKey, torch.Tensor] = {}
        for pad in {pad for _, pad in missing}:
            texts = [t for t, p in missing if p == pad]
            fresh.update(zip(((t, pad) for t in texts), encode(texts, pad)))
        return [fresh[k] if k in fresh else self._cache[k].to(self.device) for k in keys]

    def encode_ahead(self, keys: Sequence[CacheKey], encode: Callable[[list[str], bool], list[torch.Tensor]],
                     batch_size: int) -> None:
        """Encode `keys` now and keep them until `release(keys)`; all or nothing."""
        for key in keys:
            self._users[key] = self._users.get(key, 0) + 1
        try:
            missing = [key for key in keys if key not in self._cache]
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                for pad in {pad for _, pad in chunk}:
                    part = [k for k in chunk if k[1] == pad]
                    for key, embedding in zip(part, encode([t for t, _ in part], pad)):
                        self._cache[key] = embedding.to("cpu")
        except BaseException:
            self.release(keys)  # no counts or entries of ours stay
            raise

    def release(self, keys: Sequence[CacheKey]) -> None:
        """The shard that encoded `keys` ahead is done with them."""
        for key in keys:
            users = self._users.get(key, 0) - 1
            if users > 0:
                self._users[key] = users
            else:
                self._users.pop(key, None)
                self._cache.pop(key, None)
