"""Batch sizes: an out-of-memory batch is split in halves, and the default batch size follows free memory."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch


def test_out_of_memory_splits_the_batch(monkeypatch):
    from zimage_batch.generate.engine import Engine
    from zimage_batch.generate.requests import GenerationRequest
    from zimage_batch.model.sources import resolve_model

    engine = Engine(resolve_model("tiny:turbo").path, "turbo", device="cpu")
    requests = [GenerationRequest(f"prompt {i}", i, 64, 64, 4, 0.0) for i in range(6)]
    expected = engine.generate(requests, batch_size=6)
    real = engine._generate_batch
    sizes: list[int] = []
    failed_attempts: list[weakref.ref] = []

    def tight_memory(batch):
        # The halves must get the failed attempt's memory back: nothing may keep its frame alive.
        assert all(ref() is None for ref in failed_attempts), "a failed attempt's activations are still held"
        sizes.append(len(batch))
        if len(batch) > 2:
            activations = torch.empty(1024)
            failed_attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(batch)

    monkeypatch.setattr(engine, "_generate_batch", tight_memory)
    images = engine.generate(requests, batch_size=6)
    assert sizes == [6, 3, 1, 2, 3, 1, 2]
    for got, want in zip(images, expected):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    def never_fits(batch):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine, "_generate_batch", never_fits)
    with pytest.raises(torch.OutOfMemoryError):
        engine.generate(requests[:1], batch_size=1)


def test_default_batch_size_follows_free_memory_and_image_size(monkeypatch):
    from zimage_batch.run.batching import BatchSizer

    def default_batch_size(width: int, height: int, device: str = "cpu", low_vram: bool = False) -> int:
        return BatchSizer.measure(None, device, low_vram).size(width, height)  # free memory measured now

    assert default_batch_size(64, 64) == 64 and default_batch_size(1024, 1024) == 1  # CPU
    free = {"bytes": 40 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    assert default_batch_size(1024, 1024, "cuda") == 12  # (40 - 2) GiB / 3 GiB a row
    assert default_batch_size(512, 512, "cuda") == 16  # capped
    assert default_batch_size(1024, 1024, "cpu") == 1  # a CPU job on a GPU machine ignores the GPU
    free["bytes"] = 4 * 2**30  # a 16 GB card with the transformer loaded
    assert default_batch_size(1024, 1024, "cuda") == 1
    assert default_batch_size(1024, 1024, "cuda", low_vram=True) == 6  # (4 - 2.5) GiB / 0.25 GiB a row
