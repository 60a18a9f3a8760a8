"""What a worker is given: the settings of one job for one variant, typed, as they cross Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zimage_batch.curate.spec import Curation
from zimage_batch.inputs.control import ControlJob
from zimage_batch.inputs.mask_spec import MaskJob
from zimage_batch.inputs.templates import TemplateSpec
from zimage_batch.jobspec import JobSpec
from zimage_batch.model.sources import source_for_variant
from zimage_batch.model.variants import get_variant


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a `ShardRunner` needs, resolved by the driver once per variant."""

    manifest: str
    output: str
    model: str  # the model source of this variant (the job's, `models.<variant>`, or its family's)
    variant: str  # the variant this worker runs
    job_variant: str  # the job's own variant: rows with an empty `variant` belong to it
    fingerprint: str
    defaults: dict[str, Any] = field(default_factory=dict)  # this variant's values for empty row fields
    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    seed: int = 0  # the job seed: rows without a seed derive theirs from it and their id
    width: int | None = None  # the job's explicit size (edit rows without one follow their source)
    height: int | None = None
    batch_size: int | None = None
    device: str | None = None
    low_vram: str = "auto"
    attention_backend: str | None = None
    compile: bool = False
    max_source_pixels: int = 64_000_000
    loras: dict[str, str] = field(default_factory=dict)  # LoRA adapters: name -> source
    lora: str | None = None  # the adapter spec of rows whose `lora` is empty
    control: ControlJob | None = None  # the ControlNet and the rows' condition defaults (variants that run one)
    template: TemplateSpec | None = None  # the rows of a job without a manifest (inputs/templates.py)
    prompt_expansion: str | None = None  # the causal LM that rewrites each prompt (generate/expansion.py)
    prompt_expansion_id: str | None = None  # its identity, as the job's fingerprint names it
    prompt_expansion_instructions: str | None = None
    max_new_tokens: int = 256
    caption: str = "expanded"  # expanded | original: what an expanded row's caption is
    masks: MaskJob = MaskJob()  # the rows' mask defaults: derived masks and outpainting (edit manifests)
    run: str | None = None  # the run's id, which holds OUTPUT's lease: commits are fenced by it
    curation: Curation | None = None  # scores, keep, tries, embeddings (a curated job)

    @classmethod
    def for_variant(cls, job: JobSpec, variant: str, job_variant: str, fingerprint: str,
                    defaults: dict[str, Any]) -> WorkerSettings:
        return cls(
            manifest=job.manifest or "",
            output=job.output or "",
            model=source_for_variant(job.model, job.models, variant, job_variant),
            variant=variant,
            job_variant=job_variant,
            fingerprint=fingerprint,
            defaults=dict(defaults),
            format=job.format,
            image_format=job.image_format,
            quality=job.quality,
            seed=job.seed,
            width=job.width,
            height=job.height,
            batch_size=job.batch_size,
            device=job.device,
            low_vram=job.low_vram,
            attention_backend=job.attention_backend,
            compile=job.compile,
            max_source_pixels=job.max_source_pixels,
            loras=dict(job.loras),
            lora=job.lora,
            prompt_expansion=job.prompt_expansion,
            prompt_expansion_id=job.prompt_expansion_id,
            prompt_expansion_instructions=job.prompt_expansion_instructions,
            max_new_tokens=job.max_new_tokens,
            caption=job.caption,
            control=ControlJob.from_mapping(job.to_dict()) if "controlnet" in get_variant(variant).tasks else None,
            curation=curation if (curation := job.curation()).active else None,
            masks=MaskJob.from_mapping(job.to_dict()),
        )
