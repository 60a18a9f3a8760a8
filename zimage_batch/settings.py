"""Each generation setting declared once: its name, type, default (per variant where the variant
decides it), bounds, and where it appears.

    SETTINGS ─► JobSpec fields and defaults (jobspec.py), fingerprint fields
             ─► manifest columns, their types and bounds (inputs/columns.py, inputs/validation.py)
             ─► request fields and batch keys (generate/requests.py)
             ─► metadata columns, their order and Arrow types (metadata_schema.py), row records (run/rows.py)

The LoRA spec (`lora`) and the mask settings (`mask`, `mask_grow`, ...) are declared here too:
their JobSpec fields, manifest columns, metadata columns and fingerprint membership derive from
the table; their own checks stay in inputs/lora_spec.py and inputs/mask_spec.py.

Adding a setting is one entry here plus its use in the engine. This module imports no stage
(only pyarrow), so every stage may read it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyarrow as pa

# a manifest column's type family
STRING, INTEGER, NUMBER, BOOL_OR_NUMBER = "string", "integer", "number", "boolean or number"
PROMPT, EDIT = ("prompt", "edit"), ("edit",)  # the manifests a column belongs to

_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}

# How a fingerprint field is hashed (`Setting.added`; JobSpec's own fields say it too). Fields
# added after jobs were first written are left out at their old value, so an OUTPUT written
# before they existed keeps its fingerprint. Two rules, as earlier versions hashed them:
ALWAYS = ""  # hashed whatever its value (the fields jobs were first written with)
NOT_DEFAULT = "not_default"  # hashed only when not its default (num_images; give every new setting this)
SET = "set"  # hashed only when set: truthy and not its default (lora, the mask settings, the curation
# fields: hashing an empty "" or a 0 would change the fingerprint of a job that sets nothing)
ADDED_RULES = (ALWAYS, NOT_DEFAULT, SET)


def hashed(added: str, value: Any, default: Any) -> bool:
    """Whether a fingerprint field's value goes into the hash, by its `added` rule: the one place
    that decides it (JobSpec.fingerprint)."""
    if added == NOT_DEFAULT:
        return value != default
    if added == SET:
        return bool(value) and value != default
    return True


@dataclass(frozen=True)
class Setting:
    """One generation setting."""

    name: str
    type: type  # int | float | str | bool: the job setting's and the request field's type
    default: Any = None  # the job setting's default; None: the variant's or the model's (see `per_variant`)
    doc: str = ""
    per_variant: bool = False  # None means the variant's value (`Variant.<name>`)
    per_model_size: bool = False  # None means the model's default side (64 for tiny models, else 1024)
    minimum: float | None = None  # a row's value (and the job's) must be >= minimum (> when min_exclusive)
    min_exclusive: bool = False
    maximum: float | None = None  # a row's value must be <= maximum
    one_range: bool = False  # refused in one message: "must be in (minimum, maximum]"
    bound_note: str = ""  # said after the bound in a refusal ("(0 or false: off)")
    column: str | None = None  # the manifest column's type family; None: not a column
    manifests: tuple[str, ...] = PROMPT  # the manifests it is a column of
    aliases: tuple[str, ...] = ()  # other names tools use for the column (typo warnings)
    group: str = "sampler"  # where JobSpec lists it: sampler | control | images | lora | mask
    row_default: bool = True  # a row that leaves the column empty takes the job's value (JobSpec.defaults)
    request: bool = False  # an optional field of every request kind in `requests`
    requests: tuple[str, ...] = ("text-to-image", "edit", "control")
    batch_key: bool = False  # rows that differ in it cannot share a denoising loop (sampler_key)
    metadata: pa.DataType | None = None  # the metadata column's Arrow type; None: not in the metadata
    metadata_after: str | None = None  # its metadata column follows this one (default: declaration order)
    fingerprint: bool = True  # part of the job fingerprint (in its group's fingerprint fields)
    added: str = ALWAYS  # declared after jobs were first written: when it is hashed (NOT_DEFAULT | SET),
    # so an OUTPUT written before keeps its fingerprint (give every new setting added=NOT_DEFAULT)

    def __post_init__(self) -> None:
        if self.added not in ADDED_RULES:
            raise ValueError(f"{self.name}: added must be one of {ADDED_RULES}, got {self.added!r}")

    @property
    def optional(self) -> bool:
        """Whether the job setting may be None."""
        return self.default is None

    def annotation(self) -> str:
        """The job setting's type, as a dataclass annotation."""
        return _TYPE_NAMES[self.type] + (" | None" if self.optional else "")

    def hashed(self, value: Any) -> bool:
        """Whether the job's `value` of this setting goes into its fingerprint (by `added`)."""
        return hashed(self.added, value, self.default)

    def refusal(self, value: Any) -> str | None:
        """The first of `refusals()` a job's `value` (not None) is refused by, or None."""
        for comparison, message in self.refusals():
            if comparison == "in":
                refused = not self.minimum < value <= self.maximum  # type: ignore[operator]
            else:
                refused = _BREAKS[comparison](value, self.maximum if comparison == "gt" else self.minimum)
            if refused:
                return message
        return None

    def refusals(self) -> list[tuple[str, str]]:
        """(comparison, message) for the bounds of a value: `lt` / `le` / `gt` against the bound,
        in the words manifest validation uses ("must be >= 0", "must be in (0, 1]")."""
        note = f" {self.bound_note}" if self.bound_note else ""
        low, high = _number(self.minimum), _number(self.maximum)
        if self.one_range:
            return [("in", f"must be in ({low}, {high}]{note}")]
        found = []
        if self.minimum is not None:
            found.append(("le" if self.min_exclusive else "lt",
                          f"must be {'>' if self.min_exclusive else '>='} {low}{note if self.maximum is None else ''}"))
        if self.maximum is not None:
            found.append(("gt", f"must be <= {high}{note}"))
        return found


_BREAKS = {"lt": operator.lt, "le": operator.le, "gt": operator.gt}  # value against the bound: refused


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


#: The most images one row may ask for (`num_images`, column or job setting).
MAX_NUM_IMAGES = 64
#: Output sides are multiples of this (the VAE's and the transformer's patch).
SIZE_STEP = 16
#: diffusers' controlnet_conditioning_scale default
DEFAULT_CONTROL_SCALE = 0.75


def _mask(name: str, kind: type, default: Any, doc: str, column: str, metadata: pa.DataType | None = None,
          aliases: tuple[str, ...] = ()) -> Setting:
    """A mask setting: an edit manifest's column and a job setting; hashed only when set
    (`added=SET`); a row resolves it itself (inputs/mask_spec.row_mask), so it is no row default."""
    return Setting(name, kind, default, doc, column=column, manifests=EDIT, aliases=aliases, group="mask",
                   row_default=False, metadata=metadata, added=SET)


SETTINGS: tuple[Setting, ...] = (
    Setting("seed", int, 0, "job seed: rows without a seed derive theirs from it and their id",
            minimum=0, column=INTEGER, row_default=False, metadata=pa.int64()),
    # sizes: multiples of SIZE_STEP within the variant's sides (Variant.min_side..max_side)
    Setting("width", int, None, per_model_size=True, column=INTEGER, batch_key=True, metadata=pa.int64()),
    Setting("height", int, None, per_model_size=True, column=INTEGER, batch_key=True, metadata=pa.int64()),
    Setting("num_inference_steps", int, None, per_variant=True, minimum=0, min_exclusive=True, maximum=1000,
            column=INTEGER, aliases=("steps", "num_steps"), batch_key=True, metadata=pa.int64()),
    Setting("guidance_scale", float, None, per_variant=True, minimum=0, column=NUMBER,
            aliases=("cfg", "cfg_scale", "guidance"), batch_key=True, metadata=pa.float64()),
    Setting("negative_prompt", str, None, column=STRING, aliases=("negative", "neg_prompt"), request=True,
            metadata=pa.string(), metadata_after="cfg_normalization"),
    Setting("cfg_truncation", float, 1.0, "CFG stops once the normalised time passes it (1: never)",
            minimum=0, column=NUMBER, request=True, batch_key=True, metadata=pa.float64()),
    Setting("cfg_normalization", float, 0.0, "CFG output's norm capped at this multiple of the text one (0: off)",
            minimum=0, bound_note="(0 or false: off)", column=BOOL_OR_NUMBER, request=True, batch_key=True,
            metadata=pa.float64()),
    Setting("strength", float, 0.6, "img2img: how much of the source is redrawn", minimum=0, min_exclusive=True,
            maximum=1, one_range=True, column=NUMBER, manifests=EDIT),
    Setting("control_image", str, None, "one condition image for every row", column=STRING,
            aliases=("controlnet_image", "conditioning_image"), group="control", row_default=False,
            metadata=pa.string()),
    Setting("control", str, None, "canny | tile: derived from each edit row's source; none", column=STRING,
            manifests=EDIT, group="control", row_default=False, metadata=pa.string()),
    Setting("control_scale", float, DEFAULT_CONTROL_SCALE, "the ControlNet's hints scaled by it",
            minimum=0, column=NUMBER, aliases=("controlnet_conditioning_scale",), group="control",
            row_default=False, request=True, requests=("control",), batch_key=True, metadata=pa.float64()),
    Setting("canny_low", float, 100.0, "OpenCV Canny thresholds for control: canny", minimum=0, group="control",
            row_default=False),
    Setting("canny_high", float, 200.0, minimum=0, group="control", row_default=False),
    Setting("num_images", int, 1, "images per row; image k uses seed + k", minimum=1, maximum=MAX_NUM_IMAGES,
            bound_note="(MAX_NUM_IMAGES)", column=INTEGER, aliases=("num_images_per_prompt",), group="images",
            added=NOT_DEFAULT),
    # LoRA: the adapter spec of rows whose `lora` is empty (inputs/lora_spec.py parses and checks
    # it; a row resolves it itself, so it is no row default). A request holds the parsed adapter
    # set, not the spec, so it is no declared request field. The adapters (`loras`: name ->
    # source) are a mapping in JobSpec, not a setting.
    Setting("lora", str, None, "name[:scale],... | none: the adapters of rows whose `lora` is empty",
            column=STRING, group="lora", row_default=False, metadata=pa.string(), added=SET),
    # derived masks and outpainting (edit manifests; inputs/mask_spec.py reads them and refuses
    # bad ones): the defaults of the rows' columns of the same names. `mask`'s metadata column is
    # the edit lineage's (metadata_schema.EDIT_METADATA_COLUMNS: every edit row's, a given mask's
    # URI too), and `aspect`'s is `outpaint` (which holds the row's W:H then), so neither declares one.
    _mask("mask", str, None, "alpha: the source's transparent area is repainted (a row's: also a mask URI)",
          STRING, aliases=("mask_image",)),
    _mask("mask_grow", int, 0, "pixels: the mask dilated (negative: eroded)", INTEGER, pa.int64()),
    _mask("mask_blur", int, 0, "pixels: the mask's edge blurred", INTEGER, pa.int64()),
    _mask("outpaint", str, None, "WxH: the canvas the source is placed on", STRING, pa.string()),
    _mask("aspect", str, None, "W:H: the smallest canvas of that aspect ratio holding the source", STRING),
    _mask("anchor", str, None, "where the source sits on the canvas: center (None) | top | bottom | left | right",
          STRING, pa.string()),
    _mask("mask_prompt", str, None, "words: the mask is where CLIPSeg finds them", STRING, pa.string()),
    _mask("mask_threshold", float, None, "CLIPSeg probability from which a pixel repaints (None: 0.4)", NUMBER,
          pa.float64()),
    _mask("mask_invert", bool, False, "repaint where the words are not", BOOL_OR_NUMBER, pa.bool_()),
)


def settings() -> tuple[Setting, ...]:
    """The declared settings (read at call time, so a test may add one)."""
    return SETTINGS


def setting(name: str) -> Setting:
    return next(s for s in settings() if s.name == name)


def select(keep: Callable[[Setting], bool]) -> tuple[Setting, ...]:
    return tuple(s for s in settings() if keep(s))


def job_settings(group: str) -> tuple[Setting, ...]:
    """The job settings of one group, in JobSpec's order."""
    return select(lambda s: s.group == group)


def fingerprint_fields(group: str) -> tuple[str, ...]:
    """The settings of one group the job fingerprint covers (`Setting.fingerprint`), in JobSpec's
    order: every group's fingerprint fields come from here (jobspec.py, inputs/control.py,
    inputs/mask_spec.py); `Setting.hashed` says whether a value of one is hashed."""
    return tuple(s.name for s in job_settings(group) if s.fingerprint)


def row_default_settings() -> tuple[Setting, ...]:
    """The settings whose job value a row that leaves the column empty takes (JobSpec.defaults)."""
    return select(lambda s: s.row_default)


def column_types(kind: str) -> dict[str, str]:
    """The declared columns of every manifest (`prompt`) or of edit manifests only (`edit`) ->
    their type families."""
    manifests = PROMPT if kind == "prompt" else EDIT
    return {s.name: s.column for s in settings() if s.column is not None and s.manifests == manifests}


def column_aliases() -> dict[str, str]:
    """Other names for the declared columns -> the column."""
    return {alias: s.name for s in settings() for alias in s.aliases}


def request_settings(kind: str) -> tuple[Setting, ...]:
    """The optional request fields the declaration adds to a request kind, in order."""
    return select(lambda s: s.request and kind in s.requests)


def batch_key_names(kind: str) -> tuple[str, ...]:
    """The fields of a request kind its batch key holds, in order."""
    return tuple(s.name for s in select(lambda s: s.batch_key and kind in s.requests))


def metadata_settings(group: str = "sampler") -> dict[str, pa.DataType]:
    """The metadata columns of one group's settings, in metadata order."""
    columns: list[tuple[str, pa.DataType]] = []
    for s in select(lambda s: s.metadata is not None and s.group == group):
        columns.append((s.name, s.metadata))  # type: ignore[arg-type]
    for s in select(lambda s: s.metadata_after is not None and s.group == group):
        columns.remove((s.name, s.metadata))
        at = [name for name, _ in columns].index(s.metadata_after) + 1  # type: ignore[arg-type]
        columns.insert(at, (s.name, s.metadata))
    return dict(columns)


# ---------------------------------------------------------------------- declared dataclass fields
@dataclass(frozen=True)
class Here:
    """A class-body marker: the declared settings `chosen` go here (see `with_settings`)."""

    chosen: Callable[[], Iterable[Setting]]


def with_settings(cls: type) -> type:
    """Put the declared settings in the dataclass-to-be `cls` where its `Here` markers are (a
    marker is a ClassVar annotation with a `Here` value): each as a field of the setting's type
    and default. Apply it under @dataclass."""
    own = cls.__dict__.get("__annotations__", {})
    annotations: dict[str, Any] = {}
    for name, annotation in own.items():
        marker = cls.__dict__.get(name)
        if not isinstance(marker, Here):
            annotations[name] = annotation
            continue
        delattr(cls, name)
        for s in marker.chosen():
            annotations[s.name] = s.annotation()
            setattr(cls, s.name, s.default)
    cls.__annotations__ = annotations
    return cls
