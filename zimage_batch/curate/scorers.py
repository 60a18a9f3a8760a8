"""The scores of a batch of decoded images, on the worker's device, before they are encoded.

Each scorer is the checkpoint's own transformers classes with its own processor, as a reader
would run it on the stored image (so a score equals the one computed from the PNG read back):

    clip_score       cosine of CLIPModel's projected text and image embeddings (raw, in [-1, 1];
                     prompts are cut to the text model's length, 77 tokens for ViT-L/14)
    aesthetic_score  the LAION improved aesthetic predictor on the L2-normalised image embedding
    nsfw_score       softmax probability of the classifier's label named nsfw

The CLIP image embedding (L2-normalised) is kept too, for `embeddings: true` and dedup.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from zimage_batch.curate.sources import aesthetic_widths, nsfw_label, resolve_scorers
from zimage_batch.curate.spec import SCORE_COLUMNS, Curation


@dataclass
class Scored:
    """One image's scores (metadata column -> value) and its CLIP image embedding."""

    scores: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None  # float32, unit length


class AestheticHead(torch.nn.Module):
    """The LAION improved aesthetic predictor: Linear layers in a row (its Dropouts are no-ops
    when scoring), weights `layers.<i>.weight/bias` as in its nn.Sequential."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from safetensors.torch import load_file

        tensors = load_file(path)
        self.indices = sorted({int(k.split(".")[1]) for k in tensors})
        self.layers = torch.nn.ModuleDict({str(i): torch.nn.Linear(*tensors[f"layers.{i}.weight"].shape[::-1])
                                           for i in self.indices})
        self.load_state_dict(tensors)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings / embeddings.norm(dim=-1, keepdim=True)
        for i in self.indices:
            x = self.layers[str(i)](x)
        return x[:, 0]


class Scorers:
    """The checkpoints of a job's curation, loaded once per worker; `score` runs a batch."""

    def __init__(self, curation: Curation, device: str | torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification, AutoProcessor, CLIPModel

        self.curation, self.device = curation, torch.device(device)
        self.seconds = 0.0  # time spent scoring, for the cost figures
        found = resolve_scorers(curation, pinned=True)
        self.clip = self.clip_processor = self.head = self.nsfw = self.nsfw_processor = None
        if "clip" in found:
            self.clip_processor = AutoProcessor.from_pretrained(found["clip"].path)
            self.clip = CLIPModel.from_pretrained(found["clip"].path, use_safetensors=True).to(self.device).eval()
        if "aesthetic" in found:
            aesthetic_widths(found["aesthetic"], self.clip.config.projection_dim if self.clip else None)
            self.head = AestheticHead(found["aesthetic"].path).to(self.device).eval()
        if "nsfw" in found:
            self.nsfw_processor = AutoImageProcessor.from_pretrained(found["nsfw"].path)
            self.nsfw = AutoModelForImageClassification.from_pretrained(
                found["nsfw"].path, use_safetensors=True).to(self.device).eval()
            self.nsfw_index = nsfw_label(self.nsfw.config.to_dict(), found["nsfw"].source)

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Scored]:
        """Scores of RGB uint8 images (H, W, 3) drawn for `prompts`, one `Scored` per image."""
        from PIL import Image

        started = time.perf_counter()
        pictures = [Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB") for image in images]
        results = [Scored() for _ in pictures]
        scores = set(self.curation.scores)
        if self.clip is not None:
            text, image = self.clip_embeddings(pictures, prompts)
            cosine = (text * image).sum(dim=-1)
            aesthetic = self.head(image) if self.head is not None and "aesthetic" in scores else None
            for n, result in enumerate(results):
                result.embedding = image[n].float().cpu().numpy()
                if "clip" in scores:
                    result.scores[SCORE_COLUMNS["clip"]] = float(cosine[n])
                if aesthetic is not None:
                    result.scores[SCORE_COLUMNS["aesthetic"]] = float(aesthetic[n])
        if self.nsfw is not None and "nsfw" in scores:
            inputs = self.nsfw_processor(images=pictures, return_tensors="pt").to(self.device)
            probabilities = self.nsfw(**inputs).logits.float().softmax(dim=-1)[:, self.nsfw_index]
            for n, result in enumerate(results):
                result.scores[SCORE_COLUMNS["nsfw"]] = float(probabilities[n])
        self.seconds += time.perf_counter() - started
        return results

    def clip_embeddings(self, pictures: Sequence, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIPModel's projected, L2-normalised text and image embeddings."""
        length = self.clip.config.text_config.max_position_embeddings
        inputs = self.clip_processor(text=list(prompts), images=list(pictures), return_tensors="pt", padding=True,
                                     truncation=True, max_length=length).to(self.device)
        out = self.clip(**inputs)
        return out.text_embeds.float(), out.image_embeds.float()
