"""The URIs a manifest's image columns may hold: local paths, file:// and s3://."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

URI_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"  # a URI's scheme (a local path has none)
READABLE_SCHEMES = r"^(s3|file)://"
NOT_READABLE = "must be a local path, a file:// URI or an s3:// URI"


def foreign_uris(uris: pa.Array) -> pa.Array:
    """True where a URI names a scheme other than s3:// and file://."""
    return pc.and_(pc.match_substring_regex(uris, URI_SCHEME), pc.invert(pc.match_substring_regex(uris, READABLE_SCHEMES)))
