"""Batch sizes from each batch's own shape against the device's memory (cut the
same way on every rerun).

A job's rows need not share the job's default size (dataset jobs mix aspect-ratio buckets, and a
model folder's default is 1024² while its rows may be 64²), so each batch key gets the size its
own width × height allows. The device's free memory is measured once, after the model loaded
and warmed up, so the same rows are cut into the same batches on every attempt and rerun.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: CPU: pixels of one batch (16 images of 256², 64 of 128²), and the most images a batch holds.
CPU_BATCH_PIXELS = 256 * 256 * 16
CPU_MAX_BATCH = 64
#: CUDA, measured on an H200 in bf16 at 1024²: about 2.4 GiB of activations a row when the VAE
#: decodes the whole batch (3 GiB is assumed, with 2 GiB free as headroom); with low_vram, where
#: the VAE decodes one row at a time, about 0.1 GiB a row (0.25 assumed) on top of 2.5 GiB.
CUDA_GIB_PER_MEGAPIXEL = {False: 3.0, True: 0.25}
CUDA_HEADROOM_GIB = {False: 2.0, True: 2.5}
CUDA_MAX_BATCH = 16


@dataclass(frozen=True)
class BatchSizer:
    """The batch size of each shape: `fixed` (--batch-size) when given, else from memory."""

    fixed: int | None
    cuda: bool
    low_vram: bool
    free_bytes: int = 0  # CUDA: free device memory with the model loaded, measured once

    @classmethod
    def measure(cls, fixed: int | None, device: str, low_vram: bool) -> BatchSizer:
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        free = torch.cuda.mem_get_info(torch.device(device))[0] if cuda and not fixed else 0
        return cls(fixed, cuda, low_vram, int(free))

    def size(self, width: int, height: int) -> int:
        """Images per batch at width × height."""
        if self.fixed:
            return self.fixed
        pixels = max(int(width) * int(height), 1)
        if not self.cuda:
            return int(max(1, min(CPU_MAX_BATCH, CPU_BATCH_PIXELS // pixels)))
        per_image = CUDA_GIB_PER_MEGAPIXEL[self.low_vram] * 2**30 * pixels / (1024 * 1024)
        room = self.free_bytes - CUDA_HEADROOM_GIB[self.low_vram] * 2**30
        return int(max(1, min(CUDA_MAX_BATCH, room // max(per_image, 1))))
