"""From manifest rows to what the engine draws, and back to what the metadata records."""

from __future__ import annotations

from typing import Any

from zimage_batch.generate.requests import ControlRequest, EditRequest, GenerationRequest, infer_mode
from zimage_batch.inputs.control import control_request, row_control
from zimage_batch.inputs.lora_spec import format_lora, resolve_lora
from zimage_batch.inputs.manifest import derive_seed
from zimage_batch.model.variants import Variant
from zimage_batch.run.settings import WorkerSettings

Request = GenerationRequest | EditRequest | ControlRequest


def request_for_row(row: dict[str, Any], settings: WorkerSettings, variant: Variant, edit: bool) -> Request:
    """The request of one row: its own values, else the variant's defaults; an edit row's
    size, when the row and the job leave it empty, follows its source once that is loaded."""
    defaults = settings.defaults

    def value(name: str) -> Any:
        given = row.get(name)
        return defaults[name] if given is None else given

    seed = row.get("seed")
    common = dict(
        prompt=row["prompt"],
        seed=derive_seed(settings.seed, row["id"]) if seed is None else int(seed),
        num_inference_steps=int(value("num_inference_steps")),
        guidance_scale=float(value("guidance_scale")),
        negative_prompt=value("negative_prompt"),
        cfg_truncation=float(value("cfg_truncation")),
        cfg_normalization=float(value("cfg_normalization")),
        lora=resolve_lora(row.get("lora"), settings.lora),
    )
    control = row_control(row, settings.control) if settings.control else None
    if control:  # ControlNet text-to-image, or ControlNet inpaint for an edit row with a mask
        width, height = (row.get("width") or settings.width, row.get("height") or settings.height)
        if not edit:
            width, height = int(value("width")), int(value("height"))
        return control_request(common, width, height, control, inpaint=edit and bool(row.get("mask")))
    if edit:
        mode = infer_mode(row.get("mode"), bool(row.get("mask")), variant)
        width, height = row.get("width") or settings.width, row.get("height") or settings.height
        return EditRequest(width=width, height=height, mode=mode, strength=float(value("strength")), **common)
    return GenerationRequest(width=int(value("width")), height=int(value("height")), **common)


def row_record(row: dict[str, Any], request: Request, settings: WorkerSettings) -> dict[str, Any]:
    """What made a row's image: the metadata's settings columns, and each sample's JSON."""
    return {
        "id": row["id"],
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "cfg_truncation": request.cfg_truncation,
        "cfg_normalization": request.cfg_normalization,
        "variant": settings.variant,
        "model": settings.model,
    } | ({"lora": format_lora(request.lora)} if settings.loras else {})  # the adapters that drew it


def error_outcome(reason: str, duration_ms: float = 0.0) -> dict[str, Any]:
    """A row's outcome when it has no image."""
    return {"status": "error", "error": reason, "image": None, "sha256": None, "duration_ms": duration_ms}
