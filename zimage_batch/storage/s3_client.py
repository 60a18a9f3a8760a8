"""The process's shared boto3 S3 client, its retries, how its errors are classified, and
pyarrow's S3 filesystem from the same AWS settings (manifests are read through it).

Endpoint, region and credentials come from the standard AWS chain (environment, profile,
``AWS_ENDPOINT_URL`` for S3-compatible stores); retries from botocore's retry configuration.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from zimage_batch.storage.base import StorageError

_client_lock = threading.Lock()
_clients: dict[tuple, object] = {}
# Settings that change which endpoint/identity a client talks to; a change makes a new client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
)


def s3_client() -> Any:
    """The process's shared boto3 S3 client (thread-safe; rebuilt after fork or when the
    AWS environment changes). Endpoint, region and credentials come from the AWS chain."""
    import boto3
    import botocore.config
    import botocore.session

    key = (os.getpid(),) + tuple(os.environ.get(name) for name in _CLIENT_ENV)
    client = _clients.get(key)
    if client is None:
        with _client_lock:
            client = _clients.get(key)
            if client is None:
                core = botocore.session.get_session()
                config = botocore.config.Config(
                    retries=_retries(core),
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=32,
                )
                client = boto3.session.Session(botocore_session=core).client("s3", config=config)
                _clients.clear()
                _clients[key] = client
    return client


def _retries(core: Any) -> dict[str, Any]:
    """botocore's retries as the AWS chain sets them (``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` or
    the profile's ``retry_mode``/``max_attempts``, counting the first try), else adaptive mode,
    10 retries: a busy S3 endpoint answers SlowDown, and adaptive mode slows the whole client down."""
    mode = os.environ.get("AWS_RETRY_MODE") or core.get_scoped_config().get("retry_mode") or "adaptive"
    try:
        attempts = int(core.get_config_variable("max_attempts") or 11)
    except ValueError as e:
        raise StorageError(f"AWS_MAX_ATTEMPTS (or the profile's max_attempts) must be a whole number: {e}") from None
    return {"mode": mode, "total_max_attempts": attempts}


def _arrow_attempts() -> int:
    """Request attempts of pyarrow's S3 filesystem (manifests): the same as the boto3 client's."""
    import botocore.session

    return _retries(botocore.session.get_session())["total_max_attempts"]


def error_code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def http_status(e: Exception) -> int:
    response = getattr(e, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_not_found(e: Exception) -> bool:
    return error_code(e) in ("NoSuchKey", "404", "NotFound") or (
        http_status(e) == 404 and error_code(e) != "NoSuchBucket"
    )


def transient(e: Exception) -> bool:
    """Worth retrying a whole upload: connection problems, 5xx, throttling."""
    import boto3.exceptions
    import botocore.exceptions

    if isinstance(e, (botocore.exceptions.ConnectionError, botocore.exceptions.ReadTimeoutError,
                      boto3.exceptions.S3UploadFailedError)):
        return "NoSuchBucket" not in str(e) and "AccessDenied" not in str(e)
    if isinstance(e, botocore.exceptions.ClientError):
        return http_status(e) >= 500 or error_code(e) in ("SlowDown", "Throttling", "RequestTimeout")
    return False


def s3_arrow_fs(bucket: str, prefix: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's S3 filesystem for a bucket, from the same AWS settings as the boto3 client."""
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme:
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None
    if region:
        kwargs["region"] = region
    root = f"{bucket}/{prefix}" if prefix else bucket
    retries = pafs.AwsStandardS3RetryStrategy(max_attempts=_arrow_attempts())
    return pafs.S3FileSystem(retry_strategy=retries, **kwargs), root

