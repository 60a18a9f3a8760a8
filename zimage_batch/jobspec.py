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
from typing import Any

import yaml

from zimage_batch.inputs.lora_spec import NO_ADAPTER, LoraSpecError, check_adapter_name, format_lora, parse_lora, undeclared
from zimage_batch.inputs.manifest import MAX_NUM_IMAGES
from zimage_batch.model.variants import VARIANTS, get_variant
from zimage_batch.output.layout import FORMATS

IMAGE_FORMATS = ("png", "jpeg", "webp")


class JobError(ValueError):
    """The job file or flags are invalid."""


@dataclass
class JobSpec:
    manifest: str | None = None
    output: str | None = None
    model: str = "Tongyi-MAI/Z-Image-Turbo"  # tiny:<variant> only when asked (it draws noise)
    variant: str | None = None  # None: inferred from the model source
    models: dict[str, str] = field(default_factory=dict)  # other variants' sources, for rows naming them
    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    seed: int = 0  # job seed: rows without a seed derive theirs from it and their id
    # generation defaults for rows that leave a value empty (None: the variant's / model's)
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    cfg_truncation: float = 1.0
    cfg_normalization: float = 0.0
    strength: float = 0.6  # img2img default
    # LoRA adapters (SPEC §2, §3): name -> source, and the spec of rows whose `lora` is empty.
    # The fingerprint has only whether `loras` is empty: job.json records each adapter's sha256
    # instead, so a changed file is a different job, a new adapter for new rows is not (ledger.py).
    loras: dict[str, str] = field(default_factory=dict)
    lora: str | None = None
    # ControlNet Union (SPEC §2, §3): the weights, and the defaults of the rows' control columns
    controlnet: str | None = None  # a .safetensors file or diffusers folder: local, s3://, hub, tiny:<version>
    control_image: str | None = None  # one condition image for every row
    control: str | None = None  # canny | tile: derived from each edit row's source; none
    control_scale: float = 0.75  # diffusers' controlnet_conditioning_scale default
    canny_low: float = 100.0  # OpenCV Canny thresholds for control: canny
    canny_high: float = 200.0
    controlnet_id: str | None = None  # resolved by the run (sha256 or cache identity), not a setting
    num_images: int = 1  # images per row (a row's `num_images` overrides it); image k uses seed + k
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
    progress_interval: float = 10.0
    report: bool = True  # write OUTPUT/report.html when the run ends
    gpu_seconds_per_image: float | None = None  # for the cost line: device seconds one image takes
    overwrite: bool = False
    # run on an S3 store that ignores If-None-Match: * (one writer at a time; no exactly-once guarantee)
    unsafe_allow_overwriting_commits: bool = False
    runtime_env: dict[str, Any] = field(default_factory=dict)

    OUTPUT_FIELDS = (
        "model",
        "variant",
        "models",
        "format",
        "image_format",
        "quality",
        "seed",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "cfg_truncation",
        "cfg_normalization",
        "strength",
        "lora",
        "loras",
        "num_images",
    )
    # Settings added after jobs were first written: hashed only when set, so an OUTPUT written
    # before they existed keeps its fingerprint.
    ADDED_OUTPUT_FIELDS = ("lora", "loras")
    # With a ControlNet these decide the pixels too; without one they are left out (so, too, the
    # fingerprints of jobs from before ControlNets are what they were).
    CONTROL_FIELDS = ("controlnet_id", "control_image", "control", "control_scale", "canny_low", "canny_high")
    RESOLVED_FIELDS = ("controlnet_id",)  # worked out by the run, never a setting

    def output_fields(self) -> tuple[str, ...]:
        """The fields the fingerprint covers for this job."""
        return self.OUTPUT_FIELDS + (self.CONTROL_FIELDS if self.controlnet else ())

    def fingerprint(self) -> str:
        """Hash of the fields that decide what OUTPUT holds. Of `loras` only whether there are
        any (the metadata then has a `lora` column): job.json's per-adapter sha256 covers the
        files, so adding an adapter for new rows keeps the job. The ControlNet's identity is
        `controlnet_id` (its sha256, S3 cache entry or hub commit). `num_images` counts only
        when it is not 1, so the fingerprints of jobs from before it stay as they were."""
        payload = {}
        for name in self.output_fields():
            value = bool(self.loras) if name == "loras" else getattr(self, name)
            if name == "num_images" and value == 1:
                continue
            if name not in self.ADDED_OUTPUT_FIELDS or value:
                payload[name] = value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if not self.manifest:
            raise JobError("no manifest: give --manifest or 'manifest:' in the job file")
        if not self.output:
            raise JobError("no output: give --output or 'output:' in the job file")
        if self.format not in FORMATS:
            raise JobError(f"format must be one of {'|'.join(FORMATS)}, got {self.format!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise JobError(f"image_format must be one of {'|'.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not isinstance(self.models, dict) or not set(self.models) <= set(VARIANTS):
            raise JobError(f"models maps variants ({'|'.join(VARIANTS)}) to model sources, got {self.models!r}")
        self.models = {k: str(v) for k, v in self.models.items()}
        self._validate_adapters()
        if self.variant is not None and self.variant not in VARIANTS:
            raise JobError(f"variant must be one of {'|'.join(VARIANTS)}, got {self.variant!r}")
        for name in ("shard_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise JobError(f"{name} must be >= 1")
        if not 1 <= self.num_images <= MAX_NUM_IMAGES:
            raise JobError(f"num_images must be in 1..{MAX_NUM_IMAGES}, got {self.num_images}")
        for name in ("workers", "batch_size", "width", "height", "num_inference_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise JobError(f"{name} must be >= 1")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 16:
                raise JobError(f"{name} must be a multiple of 16, got {value}")
        for name in ("guidance_scale", "cfg_truncation", "cfg_normalization", "strength", "grace_period",
                     "progress_interval", "gpu_seconds_per_image"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise JobError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("lease_ttl", "lease_renew_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise JobError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.lease_renew_interval >= self.lease_ttl:
            raise JobError(f"lease_renew_interval ({self.lease_renew_interval:g} s) must be shorter than "
                           f"lease_ttl ({self.lease_ttl:g} s), or the lease expires between renewals")
        if not 0 <= self.seed < 2**63:
            raise JobError(f"seed must be in 0..2**63-1, got {self.seed}")
        if self.max_source_pixels < 1:
            raise JobError("max_source_pixels must be >= 1")
        if not 1 <= self.quality <= 100:
            raise JobError("quality must be in 1..100")
        self._validate_control()
        low_vram = str(self.low_vram).lower()
        self.low_vram = {True: "on", False: "off"}.get(_SWITCH.get(low_vram), low_vram)  # type: ignore[arg-type]
        if self.low_vram not in ("on", "off", "auto"):
            raise JobError(f"low_vram must be on, off or auto, got {self.low_vram!r}")

    def _validate_adapters(self) -> None:
        """`loras` maps valid names to sources; `lora` parses, names declared adapters, and is
        kept in canonical form ('b:1,a:0.5' and 'a:0.5,b' are one job)."""
        if not isinstance(self.loras, dict):
            raise JobError(f"loras maps adapter names to sources (a .safetensors file), got {self.loras!r}")
        try:
            for name, source in self.loras.items():
                check_adapter_name(name)
                if not isinstance(source, str) or not source:
                    raise JobError(f"loras.{name} needs a source (a .safetensors file, folder, s3:// or hub file)")
            # local files as absolute paths (workers may start elsewhere); others as written
            self.loras = {k: os.path.abspath(os.path.expanduser(v)) if os.path.exists(os.path.expanduser(v)) else v
                          for k, v in self.loras.items()}
            adapters = parse_lora(self.lora)
        except LoraSpecError as exc:
            raise JobError(f"lora: {exc}") from None
        missing = undeclared(adapters or (), self.loras)
        if missing:
            raise JobError(f"lora names adapters the job does not declare ({', '.join(missing)}); "
                           f"add them with --set loras.NAME=SOURCE or under 'loras:' in the job file")
        self.lora = None if adapters is None else (format_lora(adapters) or NO_ADAPTER)
    def _validate_control(self) -> None:
        # Local paths as absolute ones: workers (on this machine) may run in another folder.
        if self.control_image and "://" not in self.control_image:
            self.control_image = os.path.abspath(os.path.expanduser(self.control_image))
        if self.controlnet and "://" not in self.controlnet and os.path.exists(os.path.expanduser(self.controlnet)):
            self.controlnet = os.path.abspath(os.path.expanduser(self.controlnet))  # not a hub id
        if self.control is not None and self.control not in ("canny", "tile", "none"):
            raise JobError(f"control must be canny, tile or none, got {self.control!r}")
        if not self.controlnet and (self.control_image or self.control not in (None, "none")):
            raise JobError("control and control_image need a ControlNet: set controlnet: SOURCE (--set controlnet=...)")
        if self.control_image and self.control not in (None, "none"):
            raise JobError("control_image and control both name the rows' condition; set one of them")
        for name in ("control_scale", "canny_low", "canny_high"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise JobError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.canny_low > self.canny_high:
            raise JobError(f"canny_low ({self.canny_low}) must not exceed canny_high ({self.canny_high})")

    # ------------------------------------------------------------------ resolved defaults
    def resolved_variant(self) -> str:
        return self.variant or "turbo"

    def default_size(self) -> int:
        return 64 if self.model.startswith("tiny:") else 1024

    def defaults(self, variant: str | None = None) -> dict[str, Any]:
        """Values for rows (of `variant`, default the job's) that leave a column empty."""
        v = get_variant(variant or self.resolved_variant())
        size = self.default_size()
        return {
            "width": self.width or size,
            "height": self.height or size,
            "num_inference_steps": self.num_inference_steps or v.num_inference_steps,
            "guidance_scale": v.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "cfg_truncation": self.cfg_truncation,
            "cfg_normalization": float(self.cfg_normalization),
            "strength": self.strength,
            "num_images": self.num_images,
        }


def redact_env_vars(settings: dict[str, Any], mark: str = "<set>") -> dict[str, Any]:
    """`settings` (a job as a dict) with the values of runtime_env.env_vars replaced by `mark`:
    only the names are shown or stored, the values may be credentials."""
    env_vars = (settings.get("runtime_env") or {}).get("env_vars")
    if not env_vars:
        return settings
    return {**settings, "runtime_env": {**settings["runtime_env"], "env_vars": {k: mark for k in env_vars}}}


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
    for name in ("manifest", "output", "model", "controlnet", "control_image"):
        value = values.get(name)
        if not isinstance(value, str) or "://" in value or os.path.isabs(value) or value.startswith("tiny:"):
            continue
        if name in ("manifest", "output", "control_image") or value.startswith(("./", "../")):  # else maybe a hub id
            values[name] = os.path.normpath(os.path.join(base, value))
    loras = values.get("loras")
    if isinstance(loras, dict):  # adapter files: ./ ../ or a path that exists beside the job file (else a hub file)
        values["loras"] = {k: _beside(base, v) for k, v in loras.items()}


def _beside(base: str, value: Any) -> Any:
    if not isinstance(value, str) or "://" in value or os.path.isabs(value) or value.startswith("~"):
        return value
    path = os.path.normpath(os.path.join(base, value))
    return path if value.startswith(("./", "../")) or os.path.exists(path) else value


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
        value = yaml.safe_load(raw) if raw else None
        if key.startswith(("models.", "loras.")):  # --set models.base=SOURCE, --set loras.style=SOURCE
            mapping, name = key.split(".", 1)
            values[mapping] = {**(values.get(mapping) or {}), name: raw}
        else:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise JobError(f"unknown job setting(s): {', '.join(unknown)}")
    resolved = sorted(set(values) & set(JobSpec.RESOLVED_FIELDS))
    if resolved:
        raise JobError(f"{', '.join(resolved)} is worked out by the run, not a job setting")
    job = JobSpec(**{k: _coerce(k, v) for k, v in values.items()})
    job.validate()
    return job
