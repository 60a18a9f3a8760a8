"""Preflight: everything a run refuses before anything is written, and the job resolved once.

    JobSpec ─► resolve ─► ResolvedJob (variant, local paths absolute, defaults per variant, fingerprint)
    manifest ─► check_manifest (defaults, every row) ─► model sources ─► OUTPUT writable ─► model

Nothing here writes to OUTPUT or starts Ray; the checks never change the JobSpec they are given.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from zimage_batch.inputs.manifest import Limits, Manifest, open_manifest, validate_manifest
from zimage_batch.inputs.mask_spec import MaskJob, uses_words
from zimage_batch.jobspec import JobError, JobSpec, redact_env_vars
from zimage_batch.model.adapter_fit import check_adapters_fit
from zimage_batch.model.adapters import adapter_records, resolve_adapters
from zimage_batch.model.addons import resolve_addon
from zimage_batch.model.controlnet import check_controlnet_fits
from zimage_batch.model.segmenter import check_segmenter
from zimage_batch.model.sources import ResolvedModel, guess_variant, resolve_model, source_for_variant
from zimage_batch.model.variants import get_variant
from zimage_batch.run.settings import WorkerSettings

# Bytes per pixel of a stored image, generously: raw RGB for PNG; lossy formats far less.
_BYTES_PER_PIXEL = {"png": 3.0, "jpeg": 1.0, "webp": 1.0}


def absolute(path: str | None) -> str | None:
    """A local path as an absolute one (workers may run in another folder); URIs unchanged."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _local_model_folder(source: str) -> str:
    """A model source that is a folder here, made absolute; hub ids, tiny: and URIs unchanged."""
    if "://" in source or source.startswith("tiny:") or not os.path.isdir(source):
        return source
    return os.path.abspath(source)


@dataclass(frozen=True)
class ResolvedJob:
    """The job as it runs, computed once: settings with the variant filled in and local manifest
    and output paths absolute, generation defaults for each variant its rows use, fingerprint."""

    spec: JobSpec  # a private copy: never mutated once resolved
    fingerprint: str
    defaults: dict[str, dict[str, Any]]  # variant -> the values rows that leave a column empty get

    @property
    def variant(self) -> str:
        return self.spec.variant  # type: ignore[return-value] - always set by resolve()

    def with_variants(self, variants: Iterable[str]) -> ResolvedJob:
        """The same job with defaults for `variants` too (variants the manifest's rows name)."""
        more = {v: self.spec.defaults(v) for v in variants if v not in self.defaults}
        return dataclasses.replace(self, defaults={**self.defaults, **more}) if more else self

    def worker_settings(self, variant: str) -> WorkerSettings:
        """What a `ShardRunner` for `variant` is given: the job (local model folders absolute,
        for workers that run in another folder), its fingerprint and the variant's defaults."""
        spec = self.spec
        for_workers = dataclasses.replace(spec, model=_local_model_folder(spec.model),
                                          models={k: _local_model_folder(v) for k, v in spec.models.items()})
        return WorkerSettings.for_variant(for_workers, variant, self.variant, self.fingerprint, self.defaults[variant])


def resolve(job: JobSpec, variants: Iterable[str] = ()) -> ResolvedJob:
    """Resolve `job` (left as it is): variant from the model when unset, absolute local paths,
    defaults for the job's variant and `variants`, the fingerprint."""
    variant = job.variant or guess_variant(job.model)
    spec = dataclasses.replace(job, variant=variant, manifest=absolute(job.manifest), output=absolute(job.output),
                               models=dict(job.models), runtime_env=dict(job.runtime_env))
    defaults = {v: spec.defaults(v) for v in dict.fromkeys([variant, *variants])}
    return ResolvedJob(spec, spec.fingerprint(), defaults)


@dataclass(frozen=True)
class Prepared:
    """What preflight hands the run: the manifest, the resolved job and the job's model."""

    manifest: Manifest
    job: ResolvedJob
    model: ResolvedModel


def prepare(job: JobSpec, check_output: Callable[[], None] | None = None) -> Prepared:
    """Check manifest and model without writing anything.

    Order: manifest and job defaults (no model, no network beyond the manifest), then each
    variant's model source, then `check_output` (an unusable OUTPUT fails before any
    download), then the job's model itself."""
    manifest, resolved = check_manifest(job)
    spec = resolved.spec
    for variant in resolved.defaults:
        source_for_variant(spec.model, spec.models, variant, resolved.variant)  # each variant needs a model
    if check_output is not None:
        check_output()
    adapters = resolve_adapters(spec.loras)  # LoRA sources fetched and hashed before the model downloads
    model = resolve_model(spec.model, resolved.variant)
    check_adapters_fit(adapters, model.path)  # keys and shapes against the transformer's config
    if spec.controlnet:
        resolved = with_controlnet(resolved, model.path)
    if manifest.kind == "edit" and uses_words(manifest.schema.names, MaskJob.from_mapping(spec.to_dict())):
        resolved = with_segmenter(resolved)
    return Prepared(manifest, resolved, model)


def with_segmenter(job: ResolvedJob) -> ResolvedJob:
    """Masks from words: the CLIPSeg weights fetched and checked before any worker starts, and
    the job with their identity (`segmenter_id`), which the fingerprint covers."""
    spec = job.spec
    source = MaskJob.from_mapping(spec.to_dict()).segmenter_source
    segmenter = resolve_addon(source, "segmenter")
    check_segmenter(segmenter.path, source)
    spec = dataclasses.replace(spec, segmenter_id=segmenter.identity)
    return dataclasses.replace(job, spec=spec, fingerprint=spec.fingerprint())


def with_controlnet(job: ResolvedJob, model_dir: str) -> ResolvedJob:
    """The ControlNet fetched and checked against the model before any worker starts, and the
    job with its identity (`controlnet_id`), which the fingerprint covers."""
    spec = job.spec
    controlnet = resolve_addon(spec.controlnet)
    check_controlnet_fits(controlnet.path, model_dir, spec.controlnet)
    spec = dataclasses.replace(spec, controlnet_id=controlnet.identity)
    return dataclasses.replace(job, spec=spec, fingerprint=spec.fingerprint())


def check_manifest(job: JobSpec) -> tuple[Manifest, ResolvedJob]:
    """The job's defaults and every manifest row, checked without a model (what `validate` runs);
    returns the manifest and the job resolved for the variants its rows run on."""
    manifest = open_manifest(job.manifest)
    resolved = resolve(job)
    d = resolved.defaults[resolved.variant]
    check_defaults(resolved.variant, d)
    spec = resolved.spec
    if manifest.kind == "prompt" and spec.control not in (None, "none"):
        raise JobError(f"control: {spec.control} derives each row's condition from its source image, and "
                       f"{spec.manifest} is a prompt manifest (no source column); give control_image instead")
    masks = MaskJob.from_mapping(spec.to_dict())
    if manifest.kind == "prompt" and (masks.derives or masks.mask_grow or masks.mask_blur or masks.anchor):
        raise JobError(f"mask, mask_grow, mask_blur, outpaint, aspect and anchor edit source images, and "
                       f"{spec.manifest} is a prompt manifest (no source column); leave them unset")
    limits = Limits(resolved.variant, d["width"], d["height"], d["num_inference_steps"], d["guidance_scale"],
                    tuple(spec.loras), controlnet=bool(spec.controlnet), control=spec.control,
                    control_image=spec.control_image, default_num_images=d["num_images"], masks=masks)
    return manifest, resolved.with_variants(validate_manifest(manifest, limits))


def check_defaults(variant: str, defaults: dict[str, Any]) -> None:
    """The job's own defaults must suit its variant (rows that leave a value empty use them)."""
    v = get_variant(variant)
    for name in ("width", "height"):
        if not v.min_side <= defaults[name] <= v.max_side:
            raise JobError(f"{name} {defaults[name]} is beyond the {v.name} model's limits ({v.min_side}..{v.max_side})")
    if not 0 < defaults["strength"] <= 1:
        raise JobError(f"strength must be in (0, 1], got {defaults['strength']}")


def scratch_needed(job: ResolvedJob) -> int:
    """Local disk that one shard of `job` takes while staged before upload (webdataset and
    parquet; files upload each image at once): at raw size this is about what a worker's two
    shards in flight take with real images."""
    spec = job.spec
    if spec.format == "files":
        return 0
    d = job.defaults[job.variant]
    per_image = d["width"] * d["height"] * _BYTES_PER_PIXEL.get(spec.image_format, 3.0) + 1024
    return int(spec.shard_size * per_image)


def job_record(job: ResolvedJob, model: ResolvedModel | None = None) -> dict[str, Any]:
    """What job.json holds: the job as resolved (local paths absolute), its defaults and
    fingerprint, and whether the model is a tiny random-init checkpoint (whose images are noise)."""
    return {
        "fingerprint": job.fingerprint,
        "job": redact_env_vars(job.spec.to_dict()),
        "defaults": job.defaults[job.variant],
        "output_fields": list(job.spec.output_fields()),
        "model_draws_noise": bool(model and model.draws_noise),
    } | ({"adapters": adapter_records(job.spec.loras)} if job.spec.loras else {})  # each LoRA's source and sha256
