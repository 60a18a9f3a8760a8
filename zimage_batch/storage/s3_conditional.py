"""S3's conditional requests: create-only writes (commit markers), compare-and-swap on an
object's ETag (the OUTPUT lease), and the probes that tell whether a store enforces them
(s3rver, older MinIO and some hosted stores accept the headers and ignore them)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from zimage_batch.storage.base import PROBE_PREFIX, StorageError
from zimage_batch.storage.s3_client import error_code, http_status


class S3ConditionalWrites:
    """S3Storage's conditional requests: create-only writes (commit markers) and compare-and-swap
    on an object's ETag (the OUTPUT lease), and the probes that tell whether a store enforces them."""

    bucket: str
    uri: str
    client: Any
    _key: Callable[[str], str]
    exists: Callable[[str], bool]
    delete: Callable[[Iterable[str]], None]
    _raise_storage_error: Callable[..., None]
    _raise_read_error: Callable[..., NoReturn]
    _fetch: Callable[..., tuple[bytes, str]]
    url: Callable[[str], str]
    location: Callable[[], str]

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Conditional write (``If-None-Match: *``). S3 answers 412 when the key exists and
        409 when a concurrent conditional write is in flight; then we look again.

        If botocore retries a PUT whose first attempt did land (response lost), the retry
        sees 412 and we report False: callers that must know who won should write a unique
        token and read the object back."""
        import botocore.exceptions

        full = self._key(key)
        for attempt in range(10):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except botocore.exceptions.ClientError as e:
                code = error_code(e)
                if code == "PreconditionFailed" or http_status(e) == 412:
                    return False
                if code == "ConditionalRequestConflict" or http_status(e) == 409:
                    if self.exists(key):
                        return False
                    time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
                    continue
                self._raise_storage_error(e, "writing to", key)
                raise
        raise StorageError(f"conditional write to {self.url(key)} kept conflicting")

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self._fetch(key)

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        response = self._if_match(lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=version), key)
        return None if response is None else response["ETag"]

    def delete_if_match(self, key: str, version: str) -> bool:
        return self._if_match(lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key), IfMatch=version), key) is not None

    def _if_match(self, request: Callable[[], Any], key: str) -> Any:
        """A conditional request's response; None when the object changed (412), is gone (404)
        or another conditional write is in flight (409: we lost that race too)."""
        import botocore.exceptions

        try:
            return request()
        except botocore.exceptions.ClientError as e:
            if http_status(e) in (404, 409, 412) or error_code(e) in ("PreconditionFailed", "NoSuchKey",
                                                                  "ConditionalRequestConflict"):
                return None
            self._raise_storage_error(e, "writing to", key)
            raise

    def supports_compare_and_swap(self) -> bool:
        """Whether the store refuses a PutObject whose ``If-Match`` names another ETag (a probe)."""
        stale = '"00000000000000000000000000000000"'
        return self._probe("if-match", "If-Match", f"the lease on {self.uri} needs",
                           lambda key: self.put_if_match(key, b"second", stale) is None)

    def supports_create_only(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` write of one key (412, or 409
        while the first is in flight)."""
        # the first put_if_absent is False only when a lost answer was retried: created all the same
        return self._probe("create-only", "If-None-Match: *", f"commits to {self.uri} need",
                           lambda key: not self.put_if_absent(key, b"second"))

    def _probe(self, name: str, header: str, needed_by: str, refused: Callable[[str], bool]) -> bool:
        """Create a scratch key under _probe/, then whether `refused(key)` (a second, conditional
        write the store must turn down); the key is deleted after. A store that rejects the header
        outright is a StorageError naming it and what needs it."""
        import botocore.exceptions

        key = f"{PROBE_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            self.put_if_absent(key, b"first")
            return refused(key)
        except botocore.exceptions.ClientError as e:
            code = error_code(e) or str(http_status(e))
            raise StorageError(f"{self.location()} rejects conditional writes (PutObject with {header}, {code}), "
                               f"which {needed_by}") from None
        finally:
            self.delete([key])
