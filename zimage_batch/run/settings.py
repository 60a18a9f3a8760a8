"""What a worker is given: the resolved job seen from one variant, typed, as it crosses Ray."""

from __future__ import annotations

import dataclasses
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
    """Everything a `ShardRunner` needs: the job as the driver resolved it (`job`: never mutated;
    local paths absolute), and what it means for the variant this worker runs."""

    job: JobSpec  # the resolved job: every setting as job.json records it (less runtime_env)
    model: str  # the model source of this variant (the job's, `models.<variant>`, or its family's)
    variant: str  # the variant this worker runs
    job_variant: str  # the job's own variant: rows with an empty `variant` belong to it
    fingerprint: str
    defaults: dict[str, Any] = field(default_factory=dict)  # this variant's values for empty row fields
    control: ControlJob | None = None  # the ControlNet and the rows' condition defaults (variants that run one)
    masks: MaskJob = MaskJob()  # the rows' mask defaults: derived masks and outpainting (edit manifests)
    curation: Curation | None = None  # scores, keep, tries, embeddings (a curated job)
    template: TemplateSpec | None = None  # the rows of a job without a manifest (inputs/templates.py)
    run: str | None = None  # the run's id, which holds OUTPUT's lease: commits are fenced by it

    @classmethod
    def for_variant(cls, job: JobSpec, variant: str, job_variant: str, fingerprint: str,
                    defaults: dict[str, Any]) -> WorkerSettings:
        """The view of `job` (resolved) for the workers of `variant`."""
        settings = job.to_dict()
        return cls(
            job=dataclasses.replace(job, runtime_env={}),  # its env_vars may be credentials: Ray has them already
            model=source_for_variant(job.model, job.models, variant, job_variant),
            variant=variant,
            job_variant=job_variant,
            fingerprint=fingerprint,
            defaults=dict(defaults),
            control=ControlJob.from_mapping(settings) if "controlnet" in get_variant(variant).tasks else None,
            masks=MaskJob.from_mapping(settings),
            curation=curation if (curation := job.curation()).active else None,
        )
