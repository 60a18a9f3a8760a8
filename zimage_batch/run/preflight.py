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

from zimage_batch.curate.sources import resolve_scorers
from zimage_batch.curate.spec import CurationError
from zimage_batch.generate.expansion import DEFAULT_INSTRUCTIONS
from zimage_batch.inputs.columns import KNOWN_COLUMNS, misspelled, typo_message
from zimage_batch.inputs.manifest import Manifest, ManifestError, open_manifest
from zimage_batch.inputs.mask_spec import MaskJob, uses_words
from zimage_batch.inputs.templates import TemplateManifest, TemplateSpec, make_template, read_slot_file
from zimage_batch.inputs.validation import Limits, validate_manifest
from zimage_batch.jobspec import JobError, JobSpec
from zimage_batch.model.adapter_fit import check_adapters_fit
from zimage_batch.model.adapters import adapter_records, resolve_adapters
from zimage_batch.model.addons import resolve_addon
from zimage_batch.model.controlnet import check_controlnet_fits
from zimage_batch.model.prompt_model import resolve_prompt_model
from zimage_batch.model.segmenter import check_segmenter
from zimage_batch.model.sources import ResolvedModel, guess_variant, resolve_model, source_for_variant
from zimage_batch.model.variants import get_variant
from zimage_batch.output.encoding import Encoding
from zimage_batch.output.formats import get_format
from zimage_batch.redact import redact_env_vars
from zimage_batch.run.settings import WorkerSettings
from zimage_batch.source import made_portable

# Bytes per pixel of a stored image, generously: raw RGB for PNG; lossy formats far less.
_BYTES_PER_PIXEL = {"png": 3.0, "jpeg": 1.0, "webp": 1.0}


def absolute(path: str | None) -> str | None:
    """A local path as an absolute one (workers may run in another folder); URIs unchanged."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class ResolvedJob:
    """The job as it runs, computed once: settings with the variant filled in and local manifest
    and output paths absolute, generation defaults for each variant its rows use, fingerprint."""

    spec: JobSpec  # a private copy: never mutated once resolved
    fingerprint: str
    defaults: dict[str, dict[str, Any]]  # variant -> the values rows that leave a column empty get
    template: TemplateSpec | None = None  # a job without a manifest: its template, slot values loaded

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
        for_workers = dataclasses.replace(spec, model=made_portable(spec.model),
                                          models={k: made_portable(v) for k, v in spec.models.items()},
                                          prompt_expansion=spec.prompt_expansion and made_portable(spec.prompt_expansion))
        settings = WorkerSettings.for_variant(for_workers, variant, self.variant, self.fingerprint, self.defaults[variant])
        return dataclasses.replace(settings, template=self.template)


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


def prepare(job: JobSpec, check_output: Callable[[], None] | None = None,
            warn: Callable[[str], None] | None = None) -> Prepared:
    """Check manifest and model without writing anything.

    Order: manifest and job defaults (no model, no network beyond the manifest), then each
    variant's model source, then `check_output` (an unusable OUTPUT fails before any
    download), then the job's model itself. `warn` takes the warnings (columns that look misspelled)."""
    manifest, resolved = check_manifest(job, warn)
    spec = resolved.spec
    for variant in resolved.defaults:
        source_for_variant(spec.model, spec.models, variant, resolved.variant)  # each variant needs a model
    if check_output is not None:
        check_output()
    if spec.curation().active:  # scorer sources fetched and checked before the model downloads
        resolved = with_scorers(resolved, manifest)
    adapters = resolve_adapters(spec.loras)  # LoRA sources fetched and hashed before the model downloads
    model = resolve_model(spec.model, resolved.variant)
    check_adapters_fit(adapters, model.path)  # keys and shapes against the transformer's config
    if spec.controlnet:
        resolved = with_controlnet(resolved, model.path)
    if spec.prompt_expansion:
        resolved = with_prompt_expansion(resolved)
    if manifest.kind == "edit" and uses_words(manifest.schema.names, MaskJob.from_mapping(spec.to_dict())):
        resolved = with_segmenter(resolved)
    return Prepared(manifest, resolved, model)


def with_scorers(job: ResolvedJob, manifest: Manifest) -> ResolvedJob:
    """The scorer checkpoints fetched and checked before any worker starts (a missing or pickle
    source, a head that does not fit the CLIP scorer, a classifier without an nsfw label are
    refused here), and the job with their identities (`scorer_ids`), which the fingerprint covers."""
    spec = job.spec
    curation = spec.curation()
    if curation.judges and curation.max_tries > 1 and (manifest.kind == "edit" or spec.controlnet):
        raise JobError("max_tries > 1 redraws text-to-image rows only; an edit or ControlNet job keeps or "
                       "filters each image on its first draw (set max_tries: 1)")
    try:
        ids = {name: addon.identity for name, addon in resolve_scorers(curation).items()}
    except CurationError as exc:
        raise JobError(str(exc)) from None
    spec = dataclasses.replace(spec, scorer_ids=ids)
    return dataclasses.replace(job, spec=spec, fingerprint=spec.fingerprint())


def with_prompt_expansion(job: ResolvedJob) -> ResolvedJob:
    """The expansion model fetched and checked (a causal LM, safetensors, no remote code) before
    any worker starts; the job with its identity and its instructions as they will be used (the
    default's text too), which the fingerprint covers."""
    spec = job.spec
    addon = resolve_prompt_model(spec.prompt_expansion)  # type: ignore[arg-type] - set by the caller's check
    spec = dataclasses.replace(spec, prompt_expansion_id=addon.identity,
                               prompt_expansion_instructions=spec.prompt_expansion_instructions or DEFAULT_INSTRUCTIONS)
    return dataclasses.replace(job, spec=spec, fingerprint=spec.fingerprint())


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


def check_manifest(job: JobSpec, warn: Callable[[str], None] | None = None) -> tuple[Manifest, ResolvedJob]:
    """The job's defaults and every manifest row, checked without a model (what `validate` runs);
    returns the manifest and the job resolved for the variants its rows run on. Columns that look
    like a misspelled known one go to `warn`, or are refused with `strict_columns`."""
    resolved = resolve(job)
    if job.template:
        template = load_template(resolved.spec)
        manifest: Manifest = TemplateManifest(template)
        resolved = dataclasses.replace(resolved, template=template)
    else:
        manifest = open_manifest(job.manifest)  # type: ignore[arg-type] - validate() requires one
        check_column_names(manifest, job.strict_columns, warn)
    d = resolved.defaults[resolved.variant]
    check_defaults(resolved.variant, d)
    spec = resolved.spec
    if manifest.kind == "prompt" and spec.control not in (None, "none"):
        raise JobError(f"control: {spec.control} derives each row's condition from its source image, and "
                       f"{spec.manifest} is a prompt manifest (no source column); give control_image instead")
    if spec.prompt_expansion and manifest.kind == "edit":
        raise JobError(f"prompt_expansion rewrites text-to-image prompts, and {spec.manifest} is an edit manifest "
                       "(its prompts are edit instructions); run expansion on prompt manifests only")
    if spec.prompt_expansion and "prompt_original" in manifest.schema.names:
        raise JobError(f"{manifest.uri}: column 'prompt_original' is the metadata column of the prompt before "
                       "expansion (prompt_expansion); rename it to keep it")
    masks = MaskJob.from_mapping(spec.to_dict())
    refusal = masks.refusal_on_prompt_manifest(str(spec.manifest)) if manifest.kind == "prompt" else None
    if refusal:
        raise JobError(refusal)
    limits = Limits(resolved.variant, d["width"], d["height"], d["num_inference_steps"], d["guidance_scale"],
                    tuple(spec.loras), controlnet=bool(spec.controlnet), control=spec.control,
                    control_image=spec.control_image, default_num_images=d["num_images"], masks=masks)
    return manifest, resolved.with_variants(validate_manifest(manifest, limits))


def check_column_names(manifest: Manifest, strict: bool, warn: Callable[[str], None] | None) -> None:
    """Unknown columns within a typo of a known one: a warning each, or (strict) one refusal."""
    typos = misspelled(manifest.schema.names, KNOWN_COLUMNS)
    if typos and strict:
        more = f" (and {len(typos) - 1} more)" if len(typos) > 1 else ""
        raise ManifestError(f"{manifest.uri}: {typo_message(*typos[0])}{more}; strict_columns is set: rename it, "
                            "or set strict_columns=false to keep it as data")
    for column, meant in typos if warn else ():
        warn(f"warning: {typo_message(column, meant)}")


def load_template(spec: JobSpec) -> TemplateSpec:
    """The job's template with its slots' values (lists, or text files read here, on the driver:
    the values travel to the workers in their settings)."""
    slots = {name: read_slot_file(name, values) if isinstance(values, str) else values
             for name, values in spec.slots.items()}
    return make_template(spec.template_name, spec.template or "", slots, spec.expand, spec.samples, spec.seed)


def check_defaults(variant: str, defaults: dict[str, Any]) -> None:
    """The job's own sizes must suit its variant (rows that leave a value empty use them; the
    declared bounds, `strength`'s too, were checked with the job: jobspec._check_bounds)."""
    v = get_variant(variant)
    for name in ("width", "height"):
        if not v.min_side <= defaults[name] <= v.max_side:
            raise JobError(f"{name} {defaults[name]} is beyond the {v.name} model's limits ({v.min_side}..{v.max_side})")


def scratch_needed(job: ResolvedJob) -> int:
    """Local disk that one shard of `job` takes while staged before upload (webdataset and
    parquet; files upload each image at once): at raw size this is about what a worker's two
    shards in flight take with real images."""
    spec = job.spec
    if not get_format(spec.format).stages_locally:
        return 0
    d = job.defaults[job.variant]
    per_image = d["width"] * d["height"] * _BYTES_PER_PIXEL.get(Encoding.of_job(spec).format.name, 3.0) + 1024
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
