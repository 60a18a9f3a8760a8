"""CLIPSeg on the worker (issue 28): where the words of each row's `mask_prompt` are in its
source, as a probability per source pixel, for a window of rows at once.

As transformers runs it: `CLIPSegProcessor` (texts padded to the longest, images resized to the
model's size), `CLIPSegForImageSegmentation`, a sigmoid of the logits, then each map resized
(bilinear) to its source's size. Thresholding, inverting, growing and blurring are the CPU's
(inputs/masks.py). It runs on the model thread, beside the model, on the same device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

BATCH = 16  # rows per forward pass


class Segmenter:
    """A CLIPSeg model and processor loaded from a folder (safetensors weights only)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.device = device
        self.processor = CLIPSegProcessor.from_pretrained(path)
        self.model = CLIPSegForImageSegmentation.from_pretrained(path, use_safetensors=True).to(device).eval()

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image], prompts: list[str]) -> list[np.ndarray]:
        """Per row, float32 HxW in [0, 1] at its image's size: where its prompt is."""
        found: list[np.ndarray] = []
        for start in range(0, len(images), BATCH):
            part, words = images[start : start + BATCH], prompts[start : start + BATCH]
            inputs = self.processor(text=words, images=part, padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits.reshape(len(part), *inputs["pixel_values"].shape[-2:])
            maps = torch.sigmoid(logits.float())
            for image, probability in zip(part, maps):
                sized = torch.nn.functional.interpolate(probability[None, None], size=(image.height, image.width),
                                                        mode="bilinear", align_corners=False)
                found.append(sized[0, 0].cpu().numpy())
        return found
