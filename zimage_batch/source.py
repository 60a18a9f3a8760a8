"""Where weights come from: one string names a model, adapter, ControlNet, scorer, segmenter or
prompt model; `Source.parse` is the one place that reads it.

    tiny:<name>                         tiny random-init weights built here (they draw noise)
    s3://bucket/prefix/                 an S3 folder, copied once into the verified model cache
    s3://bucket/prefix/net.safetensors  one S3 object, likewise
    /path, ./path, ~/path, path         a local file or folder (made absolute)
    org/repo                            a Hugging Face hub repository
    org/repo/path/file.safetensors      one file of a hub repository

A path that exists here is local, even when it reads like a hub id. Which kinds (and which tiny
names) a use accepts, and the identity of the bytes (sha256, S3 cache entry, hub commit), are
worked out where the weights are fetched (model/); job files, job.json and fingerprints keep
the text as written. This module imports no stage package: any stage may use it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["tiny", "hub", "s3", "local"]
TINY_PREFIX = "tiny:"
S3_PREFIX = "s3://"
SAFETENSORS = ".safetensors"


class SourceError(ValueError):
    """Text that names no source (empty, or a URI of a scheme other than s3)."""


@dataclass(frozen=True)
class Source:
    """A parsed source: its kind, where it is, the text as written and, once its weights were
    fetched, their identity (what a job's fingerprint and job.json record)."""

    kind: SourceKind
    location: str  # tiny: the name after `tiny:`; hub: org/repo[/file]; s3: the URI; local: an absolute path
    text: str  # as written (messages, job files, job.json)
    identity: str | None = None  # sha256:<hex> | s3:<cache entry> | hub:<repo>@<commit>[/<file>] | tiny:<name>-<version>

    @classmethod
    def parse(cls, text: str | Source) -> Source:
        """The source `text` names (a `Source` is returned as it is); SourceError when it names none."""
        if isinstance(text, Source):
            return text
        if not isinstance(text, str) or not text:
            raise SourceError(f"a source is a non-empty string, got {text!r}")
        if text.startswith(TINY_PREFIX):
            return cls("tiny", text[len(TINY_PREFIX):], text)
        if text.startswith(S3_PREFIX):
            return cls("s3", text, text)
        if "://" in text:
            raise SourceError(f"{text!r} is a URI of another scheme than s3://")
        local = os.path.expanduser(text)
        if not os.path.exists(local) and _reads_as_hub_id(text):
            return cls("hub", text, text)
        return cls("local", os.path.abspath(local), text)

    @classmethod
    def try_parse(cls, text: str | Source | None) -> Source | None:
        """`parse`, or None for text that names no source (for checks that refuse it later)."""
        try:
            return cls.parse(text)  # type: ignore[arg-type] - None is refused by parse
        except SourceError:
            return None

    def identified(self, identity: str) -> Source:
        """This source with the identity of the bytes it gave."""
        return dataclasses.replace(self, identity=identity)

    @property
    def draws_noise(self) -> bool:
        """Tiny random-init weights (their images, masks and prompts are noise)."""
        return self.kind == "tiny"

    @property
    def hub_repo(self) -> str | None:
        """org/repo of a hub source."""
        return "/".join(self.location.split("/")[:2]) if self.kind == "hub" else None

    @property
    def hub_file(self) -> str | None:
        """The file inside the repository a hub source names (None: the whole repository)."""
        if self.kind != "hub":
            return None
        return "/".join(self.location.split("/")[2:]) or None

    @property
    def names_file(self) -> bool:
        """Whether an S3 or hub source names one .safetensors file rather than a folder (local
        sources are files or folders as the disk says)."""
        if self.kind == "s3":
            return self.location.endswith(SAFETENSORS)
        return self.kind == "hub" and bool(self.hub_file) and self.location.endswith(SAFETENSORS)

    @property
    def portable(self) -> str:
        """The text that names the same weights from any folder on this node: a local path that
        exists, made absolute; anything else as written."""
        if self.kind == "local" and os.path.exists(self.location):
            return self.location
        return self.text

    def __str__(self) -> str:
        return self.text


def made_portable(text: str) -> str:
    """`text` as workers in another folder read it (`Source.portable`); text that names no
    source as it is, for the use that fetches it to refuse."""
    source = Source.try_parse(text)
    return source.portable if source is not None else text


def _reads_as_hub_id(text: str) -> bool:
    """org/repo or org/repo/path/file: every part non-empty, not a relative or home path."""
    parts = text.split("/")
    return len(parts) >= 2 and all(parts) and not text.startswith((".", "/", "~"))
