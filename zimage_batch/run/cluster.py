"""The Ray cluster a run uses: join one at an address or start a local one, what the workers'
environment carries, and whether the workers' nodes see the driver's local paths.

Ray is imported inside the functions: the rest of the package loads without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from zimage_batch.jobspec import JobError
from zimage_batch.storage import PROBE_PREFIX

PROBE_TIMEOUT_S = 120.0  # for every node to answer the shared-path check (a node may start a worker process first)

# ---------------------------------------------------------------------- environment policy
_FORWARDED_PREFIXES = ("AWS_", "HF_", "ZIMAGE_BATCH_")
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "AUTH", "CREDENTIAL")
_MACHINE_SUFFIXES = ("_FILE", "_PATH", "_HOME", "_DIR", "_CACHE", "_BUNDLE")
_MACHINE_NAMES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables a run hands to its Ray workers, and `submit` to its Ray job.

    The one policy for both: forward the `AWS_*`, `HF_*` and `ZIMAGE_BATCH_*` settings that
    say where storage and models are and how to reach them (endpoint, region, retry mode,
    offline mode), except

    * credentials: any name containing SECRET, TOKEN, PASSWORD, ACCESS_KEY, AUTH or CREDENTIAL.
      Ray writes the runtime environment to its logs in plain text; each node uses its own AWS
      chain (instance role, profile, environment) and its own Hugging Face login;
    * what names something on this machine: files and folders (names ending in _FILE, _PATH,
      _HOME, _DIR, _CACHE, _BUNDLE) and AWS profiles (AWS_PROFILE, AWS_DEFAULT_PROFILE), which
      another node does not have, or has its own of.

    Workers of a local cluster inherit this process's whole environment anyway. Anything else a
    remote worker needs goes in the job's `runtime_env.env_vars` (names shown, values never)."""
    environ = os.environ if environ is None else environ
    return {
        name: value for name, value in environ.items()
        if name.startswith(_FORWARDED_PREFIXES)
        and not any(word in name.upper() for word in _SECRET_WORDS)
        and not name.upper().endswith(_MACHINE_SUFFIXES)
        and name.upper() not in _MACHINE_NAMES
    }


# ---------------------------------------------------------------------- joining or starting
def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join (the job's address, else RAY_ADDRESS), or None for a new local one."""
    address = address or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A host:port (or ray://host:port) that does not answer fails here, in one line and before
    anything is written: Ray itself would retry it for minutes."""
    if address is None or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port.isdigit():
        return  # a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise JobError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


_AUTH_HINT = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, "
              "as on its nodes")
_AUTH_WORDS = ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")


def _join_error(address: str, exc: BaseException) -> JobError:
    """One line for a refused join: the token named when authentication refused it."""
    chain = []
    while exc is not None and len(chain) < 5:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(word in text for word in _AUTH_WORDS):
        return JobError(f"the Ray cluster at {address} refused the connection: missing or wrong authentication "
                        f"token; {_AUTH_HINT}")
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    return JobError(f"cannot join the Ray cluster at {address}: {lines[-1] if lines else type(chain[-1]).__name__}"[:400])


def check_token(address: str | None) -> None:
    """Refuse at once, in one line, a cluster that refuses this process's token (or its lack of
    one): `ray.init` would retry for 20 s, logging a warning a second, then say only "Failed
    to connect". One handshake with the cluster's GCS, its native warning kept off stderr."""
    if address is None or address == "auto" or "://" in address:
        return  # a new local cluster; `auto` finds a local token itself; ray:// is Ray Client's own protocol
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray: ray.init alone says what is wrong
        return
    with _stderr_silenced():
        try:
            GcsClient(address=address)
        except AuthenticationError as exc:
            raise _join_error(address, exc) from None
        except Exception:  # noqa: BLE001 - anything else: ray.init reports it
            return


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment (native code writes there, not to sys.stderr)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayCluster:
    """The Ray cluster of one run: joined at `address`, or a new local one; Ray starts on
    `connect()` and stops on `close()` if this run started it."""

    def __init__(self, address: str | None, runtime_env: dict[str, Any] | None = None) -> None:
        self.address = cluster_address(address)
        self.runtime_env = dict(runtime_env or {})
        self.runtime_env["env_vars"] = {**forwarded_env(), **self.runtime_env.get("env_vars", {})}
        self._started = False

    @property
    def external(self) -> bool:
        """True when joining a cluster this run did not start (its nodes may be other machines)."""
        return self.address is not None

    def connect(self) -> None:
        """Join or start the cluster (once; a process already connected, e.g. a test or a Ray
        Jobs driver, keeps its connection)."""
        import ray

        if ray.is_initialized():
            return
        if self.address is None:
            ray.init(
                address="local",  # a new local cluster, even when another one runs on this machine
                num_cpus=os.cpu_count() or 2,
                include_dashboard=False,
                logging_level=logging.WARNING,
                runtime_env=self.runtime_env,
            )
        else:
            # a Ray Jobs driver: the submitted job's runtime env already applies
            runtime_env = None if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else self.runtime_env
            check_token(self.address)
            try:
                ray.init(address=self.address, runtime_env=runtime_env, logging_level=logging.WARNING,
                         log_to_driver=True)
            except (ConnectionError, RuntimeError, PermissionError) as exc:
                raise _join_error(self.address, exc) from None
        self._started = True

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------- shared paths
def check_shared_paths(output: str | None, manifest_files: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse, in one line, local paths the cluster's nodes do not see as this machine does.

    `output` is a local OUTPUT folder (or None), `manifest_files` local manifest files. The
    driver writes a probe file under OUTPUT (removed after, with any folder it made); a task on
    every alive node must read it back, and find each manifest file with the size it has here."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes or (output is None and not manifest_files):
        return
    sizes = {path: os.path.getsize(path) for path in manifest_files}
    look = ray.remote(num_cpus=0, max_retries=0)(look_from_node)
    with _probe_file(output) as probe:
        refs = {look.options(scheduling_strategy=_pinned(node["NodeID"])).remote(probe, sizes): node for node in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        problems = [f"node {refs[ref]['NodeManagerAddress']} did not answer within {timeout:.0f}s" for ref in pending]
        for ref in ready:
            try:
                problem = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the node died or cannot run tasks: it cannot take shards either
                problem = f"the check failed ({type(exc).__name__})"
            if problem:
                problems.append(f"node {refs[ref]['NodeManagerAddress']}: {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise JobError(f"local paths are not shared with every node of the Ray cluster: {problems[0]}{more}; "
                       "use a filesystem every node mounts at the same path, or s3://")


def _pinned(node_id: str) -> Any:
    """Run on that node or not at all."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def look_from_node(probe: tuple[str, str] | None, sizes: dict[str, int]) -> str | None:
    """On one node: what it does not see of the driver's local paths (None when it sees them all).
    `probe` is (path, contents) of the probe file under OUTPUT; `sizes` the manifest files' sizes."""
    if probe is not None:
        path, token = probe
        try:
            seen = Path(path).read_text()
        except OSError as exc:
            return f"OUTPUT: cannot read the probe file {path} ({exc.strerror or exc})"
        if seen != token:
            return f"OUTPUT: the probe file {path} holds other contents there"
    for path, size in sizes.items():
        try:
            there = os.path.getsize(path)
        except OSError as exc:
            return f"manifest: cannot read {path} ({exc.strerror or exc})"
        if there != size:
            return f"manifest: {path} has {there} bytes there, {size} here"
    return None


@contextlib.contextmanager
def _probe_file(output: str | None) -> Iterator[tuple[str, str] | None]:
    """A probe file under the local folder `output`, yielded as (path, contents); removed after,
    with the folders made for it."""
    if output is None:
        yield None
        return
    root = Path(output)
    created = [p for p in (root / PROBE_PREFIX, root, *root.parents) if not p.exists()]  # deepest first
    token = uuid.uuid4().hex
    path = root / PROBE_PREFIX / f"shared-{token}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
        yield str(path), token
    finally:
        path.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty: in use by someone else
                break
