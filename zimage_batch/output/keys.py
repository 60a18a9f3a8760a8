"""Storage keys derived from manifest ids.

A manifest ``id`` is any non-empty string: it may hold ``/``, ``../``, an absolute path, dots,
NUL, control or bidi characters (U+202E), or be thousands of characters long. None of that may
reach a file name or an object key: an output must never escape ``images/<shard>/``, and
WebDataset splits a tar member name at its first dot into sample key and extension, so the key
must not hold dots either.

:func:`safe_key` therefore keeps a readable slug of the id (``[A-Za-z0-9_-]`` only, at most 64
characters) and appends a hash of the *whole* id, which makes the key unique per id: ids that
differ only in case, or that slug the same way (``a/b`` and ``a_b``), get different keys. The
original id is kept in the metadata, never recovered from the key.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["safe_key", "sample_key", "SLUG_MAX", "HASH_HEX", "KEY_RE"]

SLUG_MAX = 64
HASH_HEX = 16

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")
_UNDERSCORE_RUN = re.compile(r"_{2,}")

# What every key produced by safe_key matches (writers accept exactly this alphabet).
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\Z")


def safe_key(row_id: str) -> str:
    """Map a manifest id to ``<slug>-<hash>``, safe as a file stem and a WebDataset key.

    ``hash`` is the first 16 hex digits of the SHA-256 of the id's UTF-8 bytes; ``slug`` keeps
    ``[A-Za-z0-9_-]`` from the id, turns every other run of characters into one ``_``, and is
    cut to 64 characters; leading and trailing ``_``/``-`` are dropped. An empty slug leaves
    just the hash. The result has no dots or slashes, is never empty and never starts with
    ``-`` or ``.``; it is deterministic and depends on nothing but the id.
    """
    if not isinstance(row_id, str):
        raise TypeError(f"row id must be a str, got {type(row_id).__name__}")
    # surrogatepass: a lone surrogate (possible in a Python str) must still hash, not crash.
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_HEX]
    slug = _UNSAFE_RUN.sub("_", row_id)
    slug = _UNDERSCORE_RUN.sub("_", slug)
    slug = slug.strip("_-")[:SLUG_MAX].rstrip("_-")
    return f"{slug}-{digest}" if slug else digest


def sample_key(row_id: str, image_index: int | None = None) -> str:
    """The key of one image: ``safe_key(id)``, then ``_<k>`` for image k of a job that uses
    num_images. Unique per (id, image_index): a safe key ends in hex digits, never ``_<k>``."""
    key = safe_key(row_id)
    return key if image_index is None else f"{key}_{int(image_index)}"
