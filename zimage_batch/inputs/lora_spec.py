"""The `lora` column and job setting: which declared adapters a row uses, at what scale.

    style                 one adapter at scale 1.0
    style:0.8,detail:1.2  several, each with its own scale
    none                  no adapter (also when the job's `lora` setting names some)
    (empty or null)       the job's `lora` setting

A spec resolves to a canonical adapter set: (name, scale) pairs sorted by name, so `a,b` and
`b,a` are one set (one batch key, one metadata value). Scales are finite numbers in
[-MAX_SCALE, MAX_SCALE]: negative scales are allowed (diffusers and PEFT take them; "slider"
adapters are used that way), but beyond ±10 an adapter swamps the model, and such a value is a
typo (`style:08`) far more often than intent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

AdapterSet = tuple[tuple[str, float], ...]  # canonical: sorted by name, each name once

NO_ADAPTER = "none"
MAX_SCALE = 10.0
#: Adapter names: PEFT keeps them as module names (no dots), and ':' ',' separate specs.
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class LoraSpecError(ValueError):
    """A `lora` spec that cannot be used; the message says why."""


def check_adapter_name(name: str) -> None:
    """A name a job may declare under `loras:`."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.lower() == NO_ADAPTER:
        raise LoraSpecError(
            f"adapter name {name!r} must be letters, digits, '_' or '-' (not starting with a digit or '-'), "
            f"at most 64 characters, and not {NO_ADAPTER!r}"
        )


def parse_lora(spec: str | None) -> AdapterSet | None:
    """The adapter set a spec names; None for an empty spec (the job's setting applies)."""
    if spec is None or not spec.strip():
        return None
    if spec.strip().lower() == NO_ADAPTER:
        return ()
    scales: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, raw = (part.strip() for part in item.partition(":"))
        if not name:
            raise LoraSpecError(f"{spec!r} is not name or name:scale[,name:scale...]")
        if name in scales:
            raise LoraSpecError(f"{spec!r} names adapter {name!r} twice")
        scales[name] = _scale(spec, name, raw) if sep else 1.0
    return tuple(sorted(scales.items()))


def _scale(spec: str, name: str, raw: str) -> float:
    try:
        scale = float(raw)
    except ValueError:
        raise LoraSpecError(f"{spec!r}: the scale of {name!r} is not a number ({raw!r})") from None
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise LoraSpecError(f"{spec!r}: the scale of {name!r} must be a finite number in -{MAX_SCALE:g}..{MAX_SCALE:g}")
    return scale


def format_lora(adapters: AdapterSet) -> str | None:
    """The metadata value of an adapter set: 'detail:1.0,style:0.8'; None when no adapter."""
    return ",".join(f"{name}:{float(scale)!r}" for name, scale in adapters) or None


def resolve_lora(spec: str | None, default: str | None) -> AdapterSet:
    """A row's adapter set: its own spec, else the job's `lora` setting, else none."""
    row = parse_lora(spec)
    if row is not None:
        return row
    return parse_lora(default) or ()


def undeclared(adapters: AdapterSet, declared: Iterable[str]) -> list[str]:
    """The names in `adapters` that the job does not declare."""
    known = set(declared)
    return [name for name, _ in adapters if name not in known]


def check_lora_column(values: pa.Array, declared: Iterable[str], fail_if: Callable[[str, pa.Array, str], None]) -> None:
    """Manifest validation of a `lora` column: each distinct value is parsed once; rows with a
    malformed spec or a bad scale, then rows naming undeclared adapters, are reported through
    `fail_if` (the first problem's reason, every row that has one of its kind)."""
    if pa.types.is_null(values.type):
        return
    declared = sorted(declared)
    unusable: dict[str, str] = {}  # spec -> why
    missing: dict[str, list[str]] = {}  # spec -> undeclared names
    for spec in pc.unique(values).to_pylist():
        try:
            names = undeclared(parse_lora(spec) or (), declared)
        except LoraSpecError as exc:
            unusable[spec] = str(exc)
            continue
        if names:
            missing[spec] = names
    if unusable:
        fail_if("lora", pc.is_in(values, pa.array(list(unusable), values.type)),
                f"is not a usable adapter spec ({next(iter(unusable.values()))})")
    if missing:
        names = sorted({name for found in missing.values() for name in found})
        offer = f"declared: {', '.join(declared)}" if declared else "the job declares none"
        fail_if("lora", pc.is_in(values, pa.array(list(missing), values.type)),
                f"names adapters the job does not declare ({', '.join(names)}; {offer}; "
                "add them with --set loras.NAME=SOURCE)")
