"""One text-encoder pass per distinct prompt.

A row's images share their prompt (`num_images`), and dataset manifests repeat prompts across
rows. The engine encodes each distinct text of a batch once, and keeps the last batch's
embeddings: a row's images, and rows repeating a prompt, are cut into consecutive batches, so a
batch often starts with the prompts the one before it ended with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RecentPrompts:
    """The embeddings of the previous batch's texts, and how many texts were encoded."""

    def __init__(self) -> None:
        self.recent: dict[str, torch.Tensor] = {}
        self.encoded = 0  # texts the text encoder ran on

    def encode(self, texts: list[str], encode: Callable[[list[str]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """`encode` of each text, called once (or not at all) for the batch's distinct new texts."""
        known = dict(self.recent)
        fresh = [t for t in dict.fromkeys(texts) if t not in known]
        if fresh:
            known.update(zip(fresh, encode(fresh)))
            self.encoded += len(fresh)
        self.recent = {t: known[t] for t in dict.fromkeys(texts)}
        return [known[t] for t in texts]
