"""The manifest's known columns and their type families, and the columns that look like a
misspelled known one (`widht`, `negtive_prompt`, `steps`).

The generation settings' columns (the LoRA spec and the mask settings too) come from their
declaration (zimage_batch/settings.py); the columns here are the row's identity and what an
edit row draws from.

A column the pipeline does not know is passed through into the metadata as data, so a typo in
an optional column would silently lose its value. Names within a small edit distance of a known
column, or of a common other name for one, are warned about (`validate`, `run`), or refused
with the job setting `strict_columns: true`.
"""

from __future__ import annotations

from typing import Iterable

from zimage_batch.settings import STRING, column_aliases, column_types


def prompt_columns() -> dict[str, str]:
    """The columns of a prompt manifest (edit manifests take them too) -> their type family."""
    return {"id": STRING, "prompt": STRING, "variant": STRING, **column_types("prompt")}


def edit_columns() -> dict[str, str]:
    """The columns of edit manifests only: the source, how it is edited, its mask (declared with
    the derived masks' settings: inputs/mask_spec.py)."""
    return {"source": STRING, "mode": STRING, **column_types("edit")}


PROMPT_COLUMNS = prompt_columns()
EDIT_COLUMNS = edit_columns()
KNOWN_COLUMNS = PROMPT_COLUMNS | EDIT_COLUMNS

# other names tools and tutorials use for the manifest's columns (the settings' own: declared with them)
ALIASES = {
    "init_image": "source",
    "input_image": "source",
    "source_image": "source",
    **column_aliases(),
}


def distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def suggestion(name: str, known: Iterable[str], aliases: bool = True) -> str | None:
    """The known name `name` most likely means, or None. Within 2 edits (1 for names of four
    letters or fewer, where 2 edits make most short words alike), case ignored; the columns'
    aliases too unless `aliases` is false."""
    lowered = name.strip().lower()
    best: tuple[int, str] | None = None
    candidates = [(k, k) for k in known] + ([(alias, target) for alias, target in ALIASES.items()] if aliases else [])
    for spelled, target in candidates:
        d = distance(lowered, spelled)
        if d <= (1 if len(spelled) <= 4 else 2) and (best is None or d < best[0]):
            best = (d, target)
    return best[1] if best else None


def misspelled(columns: Iterable[str], known: Iterable[str]) -> list[tuple[str, str]]:
    """(column, the known column it likely means) for each unknown column that looks like a typo."""
    known = list(known)
    found = []
    for column in columns:
        if column in known:
            continue
        meant = suggestion(column, known)
        if meant is not None:
            found.append((column, meant))
    return found


def typo_message(column: str, meant: str) -> str:
    return f"column '{column}' is passed through; did you mean '{meant}'?"
