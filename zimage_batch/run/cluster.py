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


_AUTH_WORDS = ("authenticationerror", "invalidauthtoken", "unauthenticated", "authentication token")
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"  # where Ray keeps the token of a cluster started on this machine


def auth_hint(address: str, found_by: str | None = None) -> str:
    """One line for a cluster that refused this process's token (or its lack of one): what to set,
    and where the cluster's token is."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        what = "no token was sent (RAY_AUTH_MODE=token is not set here)"
    elif os.environ.get("RAY_AUTH_TOKEN"):
        what = "RAY_AUTH_TOKEN is not the cluster's token"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        what = f"the token in {os.environ['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH) is not the cluster's"
    elif os.path.isfile(os.path.expanduser(DEFAULT_TOKEN_FILE)):
        what = f"the token in {DEFAULT_TOKEN_FILE} is not the cluster's"
    else:
        what = "no token was found here"
    where = f" (found by --address {found_by})" if found_by else ""
    return (f"the Ray cluster at {address}{where} refused the connection: {what}; set RAY_AUTH_MODE=token and "
            f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it) to the cluster's token: `ray get-auth-token` "
            f"on its head node prints it, and a cluster started on this machine keeps it in {DEFAULT_TOKEN_FILE}")


def is_auth_error(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a refusal by token authentication."""
    chain = []
    while exc is not None and len(chain) < 5:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return any(word in f"{type(e).__name__}: {e}".lower() for e in chain for word in _AUTH_WORDS)


def _join_error(address: str, exc: BaseException, found_by: str | None = None) -> JobError:
    """One line for a refused join: the token named when authentication refused it."""
    if is_auth_error(exc):
        return JobError(auth_hint(address, found_by))
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return JobError(f"cannot join the Ray cluster at {address}: {lines[-1] if lines else type(exc).__name__}"[:400])


def resolve_auto(address: str | None) -> str | None:
    """`auto` as the host:port Ray joins for it (the latest `ray start` on this machine), so that
    messages name it and its token is checked; any other address as it is."""
    if address != "auto":
        return address
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # another Ray: ray.init resolves it
        return address
    try:
        resolved = canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        if "multiple" in str(exc):
            raise JobError("--address auto found several Ray clusters on this machine and none started last by "
                           "`ray start`: give --address HOST:PORT") from None
        raise JobError("--address auto found no Ray cluster on this machine: start one with `ray start --head`, "
                       "or give --address HOST:PORT (or leave --address out to start a local one)") from None
    except Exception:  # noqa: BLE001 - anything else: ray.init reports it
        return address
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # as ray.init does for `auto`
    return resolved


def check_token(address: str | None, found_by: str | None = None) -> None:
    """Refuse at once, in one line, a cluster that refuses this process's token (or its lack of
    one): `ray.init` would retry for 20 s, logging a warning a second, then say only "Failed
    to connect". One handshake with the cluster's GCS, its native warning kept off stderr."""
    if address is None or address == "auto" or "://" in address:
        return  # a new local cluster; ray:// is Ray Client's own protocol
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray: ray.init alone says what is wrong
        return
    with _stderr_silenced():
        try:
            GcsClient(address=address)
        except AuthenticationError as exc:
            raise _join_error(address, exc, found_by) from None
        except Exception:  # noqa: BLE001 - anything else: ray.init reports it
            return


def quiet_ray(verbose: bool) -> None:
    """Ray's own warning lines (token authentication enabled, several clusters found, ...) off the
    terminal unless `verbose`; Ray's log files keep what its processes log."""
    level = logging.NOTSET if verbose else logging.ERROR
    for name in ("ray._private", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job"):
        logging.getLogger(name).setLevel(level)


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
            resolved = resolve_auto(self.address)
            found_by = self.address if resolved != self.address else None
            check_token(resolved, found_by)
            try:
                ray.init(address=self.address, runtime_env=runtime_env, logging_level=logging.WARNING,
                         log_to_driver=True)
            except (ConnectionError, RuntimeError, PermissionError) as exc:
                raise _join_error(resolved or self.address, exc, found_by) from None
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
