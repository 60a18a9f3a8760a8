"""From manifest rows to what the engine draws, and back to what the metadata records.

A row draws `num_images` images (its column, else the job's setting); image k uses the row's
seed (given, or derived from the job seed and the id) plus k, so each one is reproducible alone.
A job that uses num_images carries `image_index` on every image and in every key."""

from __future__ import annotations

from typing import Any

from zimage_batch.generate.requests import ControlRequest, EditRequest, GenerationRequest, infer_mode
from zimage_batch.inputs.control import row_control
from zimage_batch.inputs.identity import derive_seed
from zimage_batch.inputs.lora_spec import format_lora, resolve_lora
from zimage_batch.inputs.mask_spec import row_mask
from zimage_batch.model.variants import Variant
from zimage_batch.run.loading import control_request
from zimage_batch.run.settings import WorkerSettings
from zimage_batch.settings import metadata_settings, request_settings

Request = GenerationRequest | EditRequest | ControlRequest
SEED_LIMIT = 2**63  # seeds are int64 in the metadata


def request_for_row(row: dict[str, Any], settings: WorkerSettings, variant: Variant, edit: bool) -> Request:
    """The request of one row: its own values, else the variant's defaults; an edit row's
    size, when the row and the job leave it empty, follows its source once that is loaded."""
    defaults = settings.defaults

    def value(name: str) -> Any:
        given = row.get(name)
        return defaults[name] if given is None else given

    seed = row.get("seed")
    seed = derive_seed(settings.job.seed, row["id"]) if seed is None else int(seed)
    common = dict(
        prompt=row["prompt"],
        seed=(seed + row.get("image_index", 0)) % SEED_LIMIT,  # image k: seed + k (given seeds: checked to fit)
        num_inference_steps=int(value("num_inference_steps")),
        guidance_scale=float(value("guidance_scale")),
        **{s.name: None if (v := value(s.name)) is None else s.type(v) for s in request_settings("text-to-image")},
        lora=resolve_lora(row.get("lora"), settings.job.lora),
    )
    control = row_control(row, settings.control) if settings.control else None
    has_mask = edit and row_mask(row, settings.masks) is not None  # given, or derived (alpha, words, a canvas)
    if control:  # ControlNet text-to-image, or ControlNet inpaint for an edit row with a mask
        width, height = (row.get("width") or settings.job.width, row.get("height") or settings.job.height)
        if not edit:
            width, height = int(value("width")), int(value("height"))
        return control_request(common, width, height, control, inpaint=has_mask)
    if edit:
        mode = infer_mode(row.get("mode"), has_mask, variant)
        width, height = row.get("width") or settings.job.width, row.get("height") or settings.job.height
        return EditRequest(width=width, height=height, mode=mode, strength=float(value("strength")), **common)
    return GenerationRequest(width=int(value("width")), height=int(value("height")), **common)


def images_of_row(row: dict[str, Any], settings: WorkerSettings) -> int:
    """How many images a manifest row draws."""
    given = row.get("num_images")
    return int(settings.defaults.get("num_images", 1) if given is None else given)


def expand_rows(rows: list[dict[str, Any]], settings: WorkerSettings,
                image_index: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """One entry per image to draw, in row order then image order: the row (with its
    `image_index` when the job uses num_images) and the position of the manifest row it comes from."""
    images, origin = [], []
    for position, row in enumerate(rows):
        for k in range(images_of_row(row, settings)):
            images.append({**row, "image_index": k} if image_index else row)
            origin.append(position)
    return images, origin


def row_record(row: dict[str, Any], request: Request, settings: WorkerSettings) -> dict[str, Any]:
    """What made a row's image: the metadata's settings columns, and each sample's JSON."""
    return {
        "id": row["id"],
        **({"image_index": row["image_index"]} if "image_index" in row else {}),
        "prompt": request.prompt,
        **({"prompt_original": row["prompt_original"]} if "prompt_original" in row else {}),  # before expansion
        **{name: getattr(request, name) for name in metadata_settings("sampler")},  # seed, size, sampler settings
        "variant": settings.variant,
        "model": settings.model,
    } | ({"lora": format_lora(request.lora)} if settings.job.loras else {})  # the adapters that drew it


def error_outcome(reason: str, duration_ms: float = 0.0) -> dict[str, Any]:
    """A row's outcome when it has no image."""
    return {"status": "error", "error": reason, "image": None, "sha256": None, "duration_ms": duration_ms}
