"""Shared pytest fixtures."""

from __future__ import annotations

import os

# One torch thread per process: in this process (set before torch is imported) and in the CPU
# workers of every run the suite starts (run/pool.cpu_threads_per_worker reads the driver's
# ZIMAGE_BATCH_CPU_THREADS). The suite runs several processes side by side on a small machine,
# and OpenMP teams of more threads than cores spin against each other (a pair of 200-row runs
# side by side: 32 CPU-s at two threads per worker, 23 at one). Values the developer set are kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ZIMAGE_BATCH_CPU_THREADS", "1")

# ============================================================================ S3 test server
# A real S3 endpoint (moto's threaded server on 127.0.0.1) for every test that touches S3.
# It is configured through os.environ so that subprocesses (the CLI) and Ray workers started
# by the tests inherit it. No in-process mocking of boto3.
import logging
import socket
import threading
import uuid

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Settings that would point clients elsewhere (real profiles, tokens, endpoints).
_S3_ENV_DROP = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_conditional_puts_atomic() -> None:
    """Real S3 evaluates ``If-None-Match: *`` atomically; moto checks then writes without a
    lock, so two racing conditional PUTs could both succeed. Serialise moto's put_object."""
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_zb_locked", False):
        return
    original = S3Response.put_object
    lock = threading.Lock()

    def put_object(self, *args, **kwargs):
        with lock:
            return original(self, *args, **kwargs)

    put_object._zb_locked = True
    S3Response.put_object = put_object


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start a moto S3 server; export AWS_* settings pointing at it; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    _make_conditional_puts_atomic()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"

    aws_dir = tmp_path_factory.mktemp("aws")
    env = dict(_S3_ENV, AWS_ENDPOINT_URL=endpoint,
               AWS_CONFIG_FILE=str(aws_dir / "config"),
               AWS_SHARED_CREDENTIALS_FILE=str(aws_dir / "credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    saved = {name: os.environ.get(name) for name in [*env, *_S3_ENV_DROP]}
    for name in _S3_ENV_DROP:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named bucket on the test server."""
    from zimage_batch.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client().create_bucket(Bucket=name)
    yield name

# ======================================================================== end S3 test server


# ============================================================================ flaky S3
# A fault-injecting proxy (tests/fault_proxy.py) in front of the S3 test server. While a test
# runs, AWS_ENDPOINT_URL points at the proxy: clients made in this process and every process
# started meanwhile (the CLI, Ray workers) go through it. No faults until the test asks
# (`flaky_s3.set_faults(rate, kinds, seed)` or `flaky_s3.force(kind, ...)`).


@pytest.fixture
def flaky_s3(s3_server):
    """A started FaultProxy in front of the S3 test server; ``.upstream`` is the direct endpoint."""
    from fault_proxy import FaultProxy, endpoint_env

    with FaultProxy(s3_server) as proxy, endpoint_env(proxy.url):
        yield proxy


@pytest.fixture
def ray_tmpdir():
    """A private Ray temp folder: pass it as RAY_TMPDIR to a CLI run so that its Ray logs land there
    and it starts its own cluster (not one another process started). Short: Ray puts sockets in it."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="zbray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)

# ======================================================================== end flaky S3


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One fresh local Ray cluster for a module's in-process runs (`run_job`, or the CLI through
    tests/cli_in_process.py), started after the S3 settings are exported, for its workers."""
    from cli_in_process import local_ray

    with local_ray():
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine OpenMP threads
    only fight other processes (10x slower under load). Used by in-process engine tests; the
    suite's OMP_NUM_THREADS=1 does the same unless the developer set another value."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ============================================================================ order
# pytest-xdist (--dist loadfile) hands files out in collection order: the longest drills go
# first, so that none starts last and holds the suite's end alone; then the other drills, then
# the unit tests (short files that fill the gaps). Seconds on a 2-core machine (--durations).
LONGEST_FIRST = (
    "test_benchmarks.py",  # 130
    "test_one_writer.py",  # 120
    "test_readers_see_committed.py",  # 110
    "test_dataset_outputs.py",  # 70
    "test_status_report.py",  # 60
    "test_prompt_expansion.py",  # 55
    "test_num_images.py",  # 55
    "test_curation_e2e.py",  # 52
    "test_fault_tolerance.py",  # 52
    "test_stalled_worker.py",  # 51
    "test_template_runs.py",  # 49
    "test_mask_e2e.py",
    "test_mask_parity.py",
    "test_segmenter.py",  # 42
    "test_docs_snippets.py",  # 41
    "test_speculation.py",
)


def pytest_collection_modifyitems(items):
    """Longest drills first, then the other drills, then the unit tests (a stable sort: tests keep
    their order within a file)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        path = item.path
        if path.parent.name == "unit":
            return (2, 0)
        return (0, rank[path.name]) if path.name in rank else (1, 0)

    items.sort(key=key)
