"""A fault-injecting HTTP proxy for S3 tests: flaky storage on demand.

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port) and forwards every request, headers
and body verbatim (keep-alive, ``Content-Length`` or chunked bodies, HEAD, conditional
headers), to ``upstream``. A seeded fraction ``rate`` of requests instead gets a fault:

``slowdown``  503 with an S3 ``SlowDown`` error body; the request never reaches S3
``internal``  500 ``InternalError``; the request never reaches S3
``reset``     the connection is reset before any response; the request never reaches S3
``lost``      the request reaches S3, then the connection is reset: the answer is lost
``truncate``  the request reaches S3; the answer is cut off midway, then the connection reset
``slow``      the answer comes after ``delay`` seconds

The fault sequence depends only on ``seed`` (and the order requests arrive in). ``force()``
queues faults for the next requests that match a method/path, for targeted tests.
``counts`` holds the faults injected, by kind; ``requests`` the requests seen.
``drop_headers`` names request headers never forwarded (``If-None-Match``: a store that ignores
conditional writes, as s3rver and older MinIO do).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlparse

KINDS = ("slowdown", "internal", "reset", "lost", "truncate", "slow")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
}
# Not forwarded: hop-by-hop handshakes the proxy completes itself.
_DROP_REQUEST_HEADERS = {"expect", "proxy-connection"}
_DROP_RESPONSE_HEADERS = {"transfer-encoding", "connection", "keep-alive"}


class FaultProxy:
    """A threaded proxy in front of ``upstream`` (``http://host:port``) that injects faults."""

    def __init__(self, upstream: str, rate: float = 0.0, kinds: Sequence[str] = KINDS,
                 seed: int = 0, delay: float = 0.5, drop_headers: Sequence[str] = ()) -> None:
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or not parsed.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream
        self.upstream_addr = (parsed.hostname, parsed.port)
        self.delay = delay
        self.drop_headers = _DROP_REQUEST_HEADERS | {h.lower() for h in drop_headers}
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self._forced: list[tuple[str, str | None, str | None]] = []
        self._connections: set[socket.socket] = set()
        self.set_faults(rate, kinds, seed)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def set_faults(self, rate: float, kinds: Sequence[str] = KINDS, seed: int = 0) -> None:
        """Fail a fraction ``rate`` of the following requests with faults drawn from ``kinds``."""
        unknown = set(kinds) - set(KINDS)
        if unknown or not 0 <= rate <= 1:
            raise ValueError(f"bad fault settings: rate={rate}, unknown kinds {sorted(unknown)}")
        with self._lock:
            self.rate, self.kinds, self._rng = rate, tuple(kinds), random.Random(seed)

    def force(self, kind: str, method: str | None = None, path_contains: str | None = None,
              times: int = 1) -> None:
        """Inject ``kind`` into the next ``times`` requests matching ``method`` and path."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._forced.extend([(kind, method, path_contains)] * times)

    def clear_forced(self) -> None:
        """Drop the faults ``force()`` queued that no request has met yet."""
        with self._lock:
            self._forced.clear()

    def stats(self) -> tuple[int, dict[str, int]]:
        """(requests seen, faults injected by kind), read together."""
        with self._lock:
            return self.requests, dict(self.counts)

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.requests = 0

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            for i, (kind, m, part) in enumerate(self._forced):
                if (m is None or m == method) and (part is None or part in path):
                    del self._forced[i]
                    break
            else:
                if not (self.rate and self._rng.random() < self.rate):
                    return None
                kind = self._rng.choice(self.kinds)
            self.counts[kind] += 1
            return kind

    # ------------------------------------------------------------------ lifetime
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every open connection and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is no news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection is closed after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.proxy = self.server.proxy
        self.upstream: http.client.HTTPConnection | None = None
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        if self.upstream is not None:
            self.upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
        pass

    # ------------------------------------------------------------------ one request
    def _handle(self) -> None:
        body = self._read_body()
        kind = self.proxy._decide(self.command, self.path)
        if kind in _ERRORS:
            return self._send_error(*_ERRORS[kind])
        if kind == "reset":
            return self._reset()
        if kind == "slow":
            time.sleep(self.proxy.delay)
        try:
            status, reason, headers, payload = self._forward(body)
        except (OSError, http.client.HTTPException):
            return self._reset()
        if kind == "lost":
            return self._reset()
        response = self._response_bytes(status, reason, headers, payload)
        if kind == "truncate":  # half the body, or part of the headers when there is no body
            cut = len(payload) // 2 if len(payload) > 1 else 20
            self.wfile.write(response[: max(1, len(response) - cut)])
            return self._reset()
        self.wfile.write(response)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _read_body(self) -> bytes:
        """The request body exactly as sent (chunk framing kept; it is forwarded as is)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline(65537)
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        while True:
            reused = self.upstream is not None  # a kept-alive connection S3 may have closed meanwhile
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*self.proxy.upstream_addr, timeout=120)
            try:
                self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in self.proxy.drop_headers:
                        self.upstream.putheader(name, value)
                self.upstream.endheaders(body)
                response = self.upstream.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.upstream.close()
                self.upstream = None
                if reused:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                raise
            if response.will_close:
                self.upstream.close()
                self.upstream = None
            return response.status, response.reason, response.getheaders(), payload

    def _response_bytes(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            lower = name.lower()
            if lower in _DROP_RESPONSE_HEADERS or (lower == "content-length" and self.command != "HEAD"):
                continue
            lines.append(f"{name}: {value}")
        if self.command != "HEAD":
            lines.append(f"Content-Length: {len(payload)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (b"" if self.command == "HEAD" else payload)

    def _send_error(self, status: int, reason: str, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>{request_id}</RequestId></Error>").encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
        if self.command == "HEAD":
            headers.append(("Content-Length", "0"))
        self.wfile.write(self._response_bytes(status, reason, headers, body))

    def _reset(self) -> None:
        """Drop the connection with a TCP reset (no FIN, no response)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


@contextlib.contextmanager
def endpoint_env(url: str) -> Iterator[None]:
    """Point ``AWS_ENDPOINT_URL`` (this process and the processes it starts) at ``url`` for a while."""
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
