"""The job description: a YAML job file plus command-line flags, resolved into one object.

Its fingerprint covers everything that changes the pixels or the layout of OUTPUT (model,
variant, generation defaults, output format); it leaves out how the job runs (workers, batch
size, cluster address), so a resumed run may use a different cluster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from zimage_batch.curate.spec import Curation, CurationError, curation_of
from zimage_batch.inputs.columns import suggestion
from zimage_batch.inputs.control import CONTROL_FIELDS, DERIVED, NONE
from zimage_batch.inputs.lora_spec import NO_ADAPTER, LoraSpecError, check_adapter_name, format_lora, parse_lora, undeclared
from zimage_batch.inputs.mask_spec import MaskJob, MaskSettingError
from zimage_batch.inputs.mask_spec import fingerprint_fields as mask_fingerprint_fields
from zimage_batch.model.variants import VARIANTS, get_variant
from zimage_batch.output.encoding import IMAGE_FORMATS as IMAGE_ENCODINGS
from zimage_batch.output.formats import FORMAT_NAMES as FORMATS
from zimage_batch.settings import (
    ALWAYS,
    MAX_NUM_IMAGES,
    SET,
    SIZE_STEP,
    Here,
    fingerprint_fields,
    hashed,
    job_settings,
    row_default_settings,
    select,
    settings,
    with_settings,
)
from zimage_batch.source import Source, made_portable

IMAGE_FORMATS = tuple(IMAGE_ENCODINGS)  # png, jpeg, webp


class JobError(ValueError):
    """The job file or flags are invalid."""


@dataclass
@with_settings
class JobSpec:
    manifest: str | None = None
    output: str | None = None
    model: str = "Tongyi-MAI/Z-Image-Turbo"  # tiny:<variant> only when asked (it draws noise)
    variant: str | None = None  # None: inferred from the model source
    models: dict[str, str] = field(default_factory=dict)  # other variants' sources, for rows naming them
    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    # the job seed, then the generation defaults for rows that leave a value empty (None: the
    # variant's / model's): declared in zimage_batch/settings.py
    _sampler_settings: ClassVar[Here] = Here(lambda: job_settings("sampler"))
    # LoRA adapters: name -> source, and the spec of rows whose `lora` is empty (declared).
    # The fingerprint has only whether `loras` is empty: job.json records each adapter's sha256
    # instead, so a changed file is a different job, a new adapter for new rows is not (ledger.py).
    loras: dict[str, str] = field(default_factory=dict)
    _lora_settings: ClassVar[Here] = Here(lambda: job_settings("lora"))
    # ControlNet Union: the weights, and the defaults of the rows' control columns
    controlnet: str | None = None  # a .safetensors file or diffusers folder: local, s3://, hub, tiny:<version>
    # the rows' condition defaults: declared in zimage_batch/settings.py
    _control_settings: ClassVar[Here] = Here(lambda: job_settings("control"))
    controlnet_id: str | None = None  # resolved by the run (sha256 or cache identity), not a setting
    # images per row (a row's `num_images` overrides it); image k uses seed + k
    _image_settings: ClassVar[Here] = Here(lambda: job_settings("images"))
    # Curation (curate/spec.py): scores computed on the worker, a keep rule that redraws, embeddings
    scores: list[str] = field(default_factory=list)  # clip | aesthetic | nsfw
    scorers: dict[str, str] = field(default_factory=dict)  # scorer -> source (default: the hub's)
    keep: str | None = None  # e.g. "clip_score >= 0.28 and nsfw_score < 0.2"
    max_tries: int = 1  # draws per image; try t of image k uses seed + k + t * num_images
    embeddings: bool = False  # store the CLIP image embedding (float16 list) in the metadata
    dedup_within_row: float | None = None  # redraw an image this close (cosine) to a kept one of its row
    scorer_ids: dict[str, str] = field(default_factory=dict)  # resolved by the run: each scorer's identity
    # Prompt templates (inputs/templates.py): the rows of a job without a manifest. Like a
    # manifest, they are not in the fingerprint: committed rows are checked by their digest.
    template: str | None = None  # a prompt with {slot} placeholders
    template_name: str = "template"  # the id prefix of its rows
    slots: dict[str, Any] = field(default_factory=dict)  # slot -> [values] | a text file, one value a line
    expand: str = "product"  # product | sample
    samples: int | None = None  # expand: sample: combinations drawn with the job seed
    # Prompt expansion (generate/expansion.py): a causal LM rewrites each prompt on the workers
    prompt_expansion: str | None = None  # its source: a local, s3:// or hub folder of a transformers causal LM
    prompt_expansion_id: str | None = None  # resolved by the run (sha256, S3 cache entry or hub commit)
    prompt_expansion_instructions: str | None = None  # the system prompt (None: the default, written for Z-Image)
    max_new_tokens: int = 256  # the most tokens an expansion adds
    caption: str = "expanded"  # expanded | original: the caption (WebDataset .txt) of an expanded row
    # derived inpaint masks and outpainting (edit manifests; inputs/mask_spec.py): the defaults
    # of the rows' columns of the same names, declared in zimage_batch/settings.py
    _mask_settings: ClassVar[Here] = Here(lambda: job_settings("mask"))
    segmenter: str | None = None  # CLIPSeg weights (None: CIDAS/clipseg-rd64-refined); a folder: local, s3://, hub
    segmenter_id: str | None = None  # resolved by the run (sha256, cache entry or hub commit), not a setting
    # how the job runs (not part of the fingerprint)
    max_source_pixels: int = 64_000_000  # edit manifests: larger source images become error rows
    workers: int | None = None
    batch_size: int | None = None
    shard_size: int = 1000
    address: str | None = None
    device: str | None = None
    attention_backend: str | None = None
    compile: bool = False
    low_vram: str = "auto"  # on | off | auto: text encoder and transformer take turns on cards under 30 GB
    max_attempts: int = 3
    grace_period: float = 60.0
    speculate: bool = True  # idle workers run second copies of the last shards; the first commit wins
    # one writer per OUTPUT: the run's lease lasts lease_ttl seconds unless renewed, every
    # lease_renew_interval seconds; wait: wait for another run's lease instead of refusing
    lease_ttl: float = 120.0
    lease_renew_interval: float = 20.0
    wait: bool = False
    stall_timeout: float | None = None  # seconds a busy worker may go without progress; None: derived
    progress_interval: float = 10.0
    report: bool = True  # write OUTPUT/report.html when the run ends
    strict_columns: bool = False  # refuse manifest columns that look like a misspelled known one
    gpu_seconds_per_image: float | None = None  # for the cost line: device seconds one image takes
    overwrite: bool = False
    # run on an S3 store that ignores If-None-Match: * (one writer at a time; no exactly-once guarantee)
    unsafe_allow_overwriting_commits: bool = False
    runtime_env: dict[str, Any] = field(default_factory=dict)

    OUTPUT_FIELDS = ("model", "variant", "models", "format", "image_format", "quality", *fingerprint_fields("sampler"),
                     *fingerprint_fields("lora"), "loras", *fingerprint_fields("images"), "scores", "scorer_ids",
                     "keep", "max_tries", "embeddings", "dedup_within_row")
    # JobSpec's own fields (not declared settings) added after jobs were first written: hashed
    # only when set (settings.SET), so an OUTPUT written before they existed keeps its
    # fingerprint. A declared setting says how it is hashed in its `added` (settings.py).
    ADDED_FIELDS = ("loras", "scores", "scorer_ids", "keep", "max_tries", "embeddings", "dedup_within_row",
                    "segmenter_id")
    # With a ControlNet these decide the pixels too; without one they are left out (so, too, the
    # fingerprints of jobs from before ControlNets are what they were).
    CONTROL_FIELDS = CONTROL_FIELDS
    # With prompt expansion these decide the prompts (and so the pixels); without, left out. The
    # model's identity, not its source, and the instructions as resolved (the default's text too).
    EXPANSION_FIELDS = ("prompt_expansion_id", "prompt_expansion_instructions", "max_new_tokens", "caption")
    RESOLVED_FIELDS = ("controlnet_id", "scorer_ids", "prompt_expansion_id", "segmenter_id")  # worked out by the run

    def output_fields(self) -> tuple[str, ...]:
        """The fields the fingerprint covers for this job (the mask settings when any is set)."""
        masks = mask_fingerprint_fields()
        masks = masks if any(getattr(self, name) for name in masks) else ()
        return (self.OUTPUT_FIELDS + (self.CONTROL_FIELDS if self.controlnet else ())
                + (self.EXPANSION_FIELDS if self.prompt_expansion else ()) + masks)

    def fingerprint(self) -> str:
        """Hash of the fields that decide what OUTPUT holds. Of `loras` only whether there are
        any (the metadata then has a `lora` column): job.json's per-adapter sha256 covers the
        files, so adding an adapter for new rows keeps the job. The ControlNet's identity is
        `controlnet_id` (its sha256, S3 cache entry or hub commit). Fields added after jobs were
        first written are hashed only when set (`num_images` when not 1, `max_tries` likewise),
        so the fingerprints of jobs from before them stay as they were: `_hashed` decides. The
        scorers' identities (`scorer_ids`) stand for their sources."""
        payload = {}
        for name in self.output_fields():
            value = bool(self.loras) if name == "loras" else getattr(self, name)
            if _hashed(name, value):
                payload[name] = value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every setting; put some in canonical form (absolute local paths, the lora spec)."""
        _validate(self)

    def _validate_curation(self) -> None:
        """Scores known, keep safe and naming computed scores, max_tries >= 1; scores kept in a
        fixed order and local scorer sources as absolute paths."""
        try:
            curation = curation_of(self.to_dict())
        except CurationError as exc:
            raise JobError(str(exc)) from None
        self.scores = list(curation.scores)
        self.scorers = {k: made_portable(v) for k, v in self.scorers.items()}

    def curation(self) -> Curation:
        """The job's curation settings, with the scorers' identities once the run resolved them."""
        return dataclasses.replace(curation_of(self.to_dict()), ids=dict(self.scorer_ids))

    # ------------------------------------------------------------------ resolved defaults
    def resolved_variant(self) -> str:
        return self.variant or "turbo"

    def default_size(self) -> int:
        model = Source.try_parse(self.model)
        return 64 if model is not None and model.kind == "tiny" else 1024

    def defaults(self, variant: str | None = None) -> dict[str, Any]:
        """Values for rows (of `variant`, default the job's) that leave a column empty."""
        v = get_variant(variant or self.resolved_variant())
        size = self.default_size()
        values = {}
        for s in row_default_settings():
            value = getattr(self, s.name)
            if value is None:
                value = size if s.per_model_size else getattr(v, s.name) if s.per_variant else None
            values[s.name] = s.type(value) if value is not None and s.type is float else value
        return values


def _hashed(name: str, value: Any) -> bool:
    """Whether the fingerprint hashes `value` of field `name`: a declared setting by its `added`
    rule, JobSpec's own fields by theirs (settings.SET for ADDED_FIELDS, else ALWAYS)."""
    declared = next((s for s in settings() if s.name == name), None)
    if declared is not None:
        return declared.hashed(value)
    rule = SET if name in JobSpec.ADDED_FIELDS else ALWAYS
    return hashed(rule, value, _default(name))


def _default(name: str) -> Any:
    """A JobSpec field's default (a new one of a mutable default)."""
    f = _FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _validate(job: JobSpec) -> None:
    """Every setting checked, some put in canonical form (absolute local paths, the lora spec)."""
    if job.manifest and job.template:
        raise JobError("a job takes a manifest or a template, not both")
    if not job.manifest and not job.template:
        raise JobError("no manifest: give --manifest or 'manifest:' in the job file (or a 'template:' with 'slots:')")
    if not job.output:
        raise JobError("no output: give --output or 'output:' in the job file")
    if job.format not in FORMATS:
        raise JobError(f"format must be one of {'|'.join(FORMATS)}, got {job.format!r}")
    if job.image_format not in IMAGE_FORMATS:
        raise JobError(f"image_format must be one of {'|'.join(IMAGE_FORMATS)}, got {job.image_format!r}")
    if not isinstance(job.models, dict) or not set(job.models) <= set(VARIANTS):
        raise JobError(f"models maps variants ({'|'.join(VARIANTS)}) to model sources, got {job.models!r}")
    job.models = {k: str(v) for k, v in job.models.items()}
    _check_adapters(job)
    if job.variant is not None and job.variant not in VARIANTS:
        raise JobError(f"variant must be one of {'|'.join(VARIANTS)}, got {job.variant!r}")
    for name in ("shard_size", "max_attempts"):
        if getattr(job, name) < 1:
            raise JobError(f"{name} must be >= 1")
    if not 1 <= job.num_images <= MAX_NUM_IMAGES:
        raise JobError(f"num_images must be in 1..{MAX_NUM_IMAGES}, got {job.num_images}")
    sizes_and_steps = select(lambda s: s.type is int and (s.per_model_size or s.per_variant))
    for name in ("workers", "batch_size", *(s.name for s in sizes_and_steps)):
        value = getattr(job, name)
        if value is not None and value < 1:
            raise JobError(f"{name} must be >= 1")
    for name in (s.name for s in job_settings("sampler") if s.per_model_size):
        value = getattr(job, name)
        if value is not None and value % SIZE_STEP:
            raise JobError(f"{name} must be a multiple of {SIZE_STEP}, got {value}")
    for name in (*_floats("sampler"), "grace_period", "progress_interval", "gpu_seconds_per_image"):
        value = getattr(job, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise JobError(f"{name} must be a finite number >= 0, got {value!r}")
    _check_lease_settings(job.lease_ttl, job.lease_renew_interval, job.stall_timeout)
    if not 0 <= job.seed < 2**63:
        raise JobError(f"seed must be in 0..2**63-1, got {job.seed}")
    if job.max_source_pixels < 1:
        raise JobError("max_source_pixels must be >= 1")
    if not 1 <= job.quality <= 100:
        raise JobError("quality must be in 1..100")
    _check_control(job)
    _check_bounds(job)
    job._validate_curation()
    _check_prompt_settings(job)
    _check_masks(job)
    low_vram = str(job.low_vram).lower()
    job.low_vram = {True: "on", False: "off"}.get(_SWITCH.get(low_vram), low_vram)  # type: ignore[arg-type]
    if job.low_vram not in ("on", "off", "auto"):
        raise JobError(f"low_vram must be on, off or auto, got {job.low_vram!r}")


def _check_bounds(job: JobSpec) -> None:
    """Each declared setting's job value within its declared bounds, as a manifest's column is
    (settings.Setting.refusals: "strength must be in (0, 1], got 2.0")."""
    for s in settings():
        value = getattr(job, s.name)
        refusal = None if value is None else s.refusal(value)
        if refusal:
            raise JobError(f"{s.name} {refusal}, got {value!r}")


def _floats(group: str) -> tuple[str, ...]:
    """The declared number settings of `group` (finite and >= 0, as every one is)."""
    return tuple(s.name for s in job_settings(group) if s.type is float)


def _check_adapters(job: JobSpec) -> None:
    """`loras` maps valid names to sources; `lora` parses, names declared adapters, and is
    kept in canonical form ('b:1,a:0.5' and 'a:0.5,b' are one job)."""
    if not isinstance(job.loras, dict):
        raise JobError(f"loras maps adapter names to sources (a .safetensors file), got {job.loras!r}")
    try:
        for name, source in job.loras.items():
            check_adapter_name(name)
            if not isinstance(source, str) or not source:
                raise JobError(f"loras.{name} needs a source (a .safetensors file, folder, s3:// or hub file)")
        # local files as absolute paths (workers may start elsewhere); others as written
        job.loras = {k: made_portable(v) for k, v in job.loras.items()}
        adapters = parse_lora(job.lora)
    except LoraSpecError as exc:
        raise JobError(f"lora: {exc}") from None
    missing = undeclared(adapters or (), job.loras)
    if missing:
        raise JobError(f"lora names adapters the job does not declare ({', '.join(missing)}); "
                       f"add them with --set loras.NAME=SOURCE or under 'loras:' in the job file")
    job.lora = None if adapters is None else (format_lora(adapters) or NO_ADAPTER)


def _check_control(job: JobSpec) -> None:
    # Local paths as absolute ones: workers (on this machine) may run in another folder.
    if job.control_image and "://" not in job.control_image:
        job.control_image = os.path.abspath(os.path.expanduser(job.control_image))
    if job.controlnet:
        job.controlnet = made_portable(job.controlnet)  # a local one absolute; a hub id, s3:// or tiny: as written
    if job.control is not None and job.control not in (*DERIVED, NONE):
        raise JobError(f"control must be {', '.join(DERIVED)} or {NONE}, got {job.control!r}")
    if not job.controlnet and (job.control_image or job.control not in (None, NONE)):
        raise JobError("control and control_image need a ControlNet: set controlnet: SOURCE (--set controlnet=...)")
    if job.control_image and job.control not in (None, NONE):
        raise JobError("control_image and control both name the rows' condition; set one of them")
    for name in _floats("control"):
        value = getattr(job, name)
        if not (math.isfinite(value) and value >= 0):
            raise JobError(f"{name} must be a finite number >= 0, got {value!r}")
    if job.canny_low > job.canny_high:
        raise JobError(f"canny_low ({job.canny_low}) must not exceed canny_high ({job.canny_high})")


def _check_masks(job: JobSpec) -> None:
    """The mask and outpaint defaults (inputs/mask_spec.py); a local segmenter folder made absolute."""
    if job.segmenter:
        job.segmenter = made_portable(job.segmenter)  # a local folder absolute; a hub id or s3:// as written
    try:
        MaskJob.from_mapping(job.to_dict()).check()
    except MaskSettingError as exc:
        raise JobError(str(exc)) from None


def _check_lease_settings(ttl: float, renew_interval: float, stall_timeout: float | None) -> None:
    """The lease's timing, and how long a busy worker may go without progress."""
    for name, value in (("lease_ttl", ttl), ("lease_renew_interval", renew_interval), ("stall_timeout", stall_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise JobError(f"{name} must be a positive number of seconds, got {value!r}")
    if renew_interval >= ttl:
        raise JobError(f"lease_renew_interval ({renew_interval:g} s) must be shorter than "
                       f"lease_ttl ({ttl:g} s), or the lease expires between renewals")


def _check_prompt_settings(job: JobSpec) -> None:
    """The template's and prompt expansion's settings (inputs/templates.py checks the template itself)."""
    if not isinstance(job.slots, dict) or (job.slots and not job.template):
        raise JobError("slots maps slot names to values (a list, or a text file) for a 'template:'")
    if job.template and not job.template_name.strip():
        raise JobError("template_name (the id prefix of the template's rows) must not be empty")
    if job.caption not in ("expanded", "original"):
        raise JobError(f"caption must be expanded or original, got {job.caption!r}")
    if not 1 <= job.max_new_tokens <= 4096:
        raise JobError(f"max_new_tokens must be in 1..4096, got {job.max_new_tokens}")
    if job.prompt_expansion is not None and not str(job.prompt_expansion).strip():
        raise JobError("prompt_expansion needs a source (a causal LM folder: local, s3://, a hub id or tiny:prompt)")


_FIELDS = {f.name: f for f in dataclasses.fields(JobSpec)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or --set value into the field's type."""
    if name not in _FIELDS:
        return value
    kind = str(_FIELDS[name].type)
    if value is None:
        if "None" not in kind:
            raise JobError(f"{name} needs a value")
        return value
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            return value if isinstance(value, bool) else _SWITCH[str(value).lower()]
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError, KeyError):
        raise JobError(f"{name}: cannot use {value!r} ({kind})") from None
    return value


_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _resolve_relative_paths(values: dict[str, Any], base: str) -> None:
    """Local paths in a job file are relative to the job file's folder."""
    for name in ("manifest", "output", "model", "controlnet", "control_image", "prompt_expansion", "segmenter"):
        value = values.get(name)
        if not isinstance(value, str) or "://" in value or os.path.isabs(value):
            continue
        if name in ("manifest", "output", "control_image") or value.startswith(("./", "../")):  # else a hub id, tiny:
            values[name] = os.path.normpath(os.path.join(base, value))
    slots = values.get("slots")
    if isinstance(slots, dict):  # slot files beside the job file
        values["slots"] = {k: os.path.normpath(os.path.join(base, v)) if isinstance(v, str) and "://" not in v
                           and not os.path.isabs(v) else v for k, v in slots.items()}
    loras = values.get("loras")
    if isinstance(loras, dict):  # adapter files: ./ ../ or a path that exists beside the job file (else a hub file)
        values["loras"] = {k: _beside(base, v) for k, v in loras.items()}
    scorers = values.get("scorers")
    if isinstance(scorers, dict):  # likewise scorer checkpoints (else hub ids)
        values["scorers"] = {k: _beside(base, v) for k, v in scorers.items()}


def _beside(base: str, value: Any) -> Any:
    if not isinstance(value, str) or "://" in value or os.path.isabs(value) or value.startswith("~"):
        return value
    path = os.path.normpath(os.path.join(base, value))
    return path if value.startswith(("./", "../")) or os.path.exists(path) else value


# Settings whose --set value is the text as written ("{concept}, {style}" is not YAML's mapping)
TEXT_SETTINGS = ("template", "template_name", "prompt_expansion_instructions")


def _yaml_value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise JobError(f"--set {key}: cannot read {raw!r} ({str(exc).splitlines()[0]}); quote it as YAML") from None


def load_job(job_file: str | None, overrides: dict[str, Any], settings: list[str]) -> JobSpec:
    """Job file, then flags, then `--set key=value` pairs; later wins."""
    values: dict[str, Any] = {}
    if job_file:
        try:
            with open(job_file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise JobError(f"{job_file}: cannot read job file ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise JobError(f"{job_file}: a job file is a mapping of settings")
        defaults = loaded.pop("defaults", None) or {}
        if not isinstance(defaults, dict):
            raise JobError(f"{job_file}: 'defaults' is a mapping of settings")
        values.update(defaults)
        values.update(loaded)
        _resolve_relative_paths(values, os.path.dirname(os.path.abspath(job_file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep:
            raise JobError(f"--set takes key=value, got {setting!r}")
        key = key.strip().removeprefix("defaults.")
        value = raw if key in TEXT_SETTINGS else _yaml_value(key, raw)
        if key.startswith("slots."):  # --set slots.style=[a,b] or --set slots.style=FILE
            values["slots"] = {**(values.get("slots") or {}), key.split(".", 1)[1]: value}
        elif key.startswith(("models.", "loras.", "scorers.")):  # --set models.base=SOURCE, --set loras.style=SOURCE
            mapping, name = key.split(".", 1)
            values[mapping] = {**(values.get(mapping) or {}), name: raw}
        else:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        named = [f"{name} (did you mean '{meant}'?)" if (meant := suggestion(name, _FIELDS, aliases=False)) else name
                 for name in unknown]
        raise JobError(f"unknown job setting(s): {', '.join(named)}")
    resolved = sorted(set(values) & set(JobSpec.RESOLVED_FIELDS))
    if resolved:
        raise JobError(f"{', '.join(resolved)} is worked out by the run, not a job setting")
    job = JobSpec(**{k: _coerce(k, v) for k, v in values.items()})
    job.validate()
    return job
