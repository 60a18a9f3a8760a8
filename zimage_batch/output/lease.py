"""One writer per OUTPUT: a renewed, expiring lease, and the fence that keeps a run that lost
it from committing.

`OUTPUT/_lease.json` names the run that writes OUTPUT: its id (the fencing token), host, pid
and when the lease expires. A run creates it (create-only) before any work, renews it every
`renew_interval` seconds while it runs, and deletes it at its end. Every change after the
creation is a compare-and-swap on the object's version (S3 `If-Match` on the ETag; locally a
replace under an exclusive flock), so of two runs that try to take over the same lease one wins.

A lease whose holder is gone is taken over without the user doing anything: at once when its
pid is known dead on this host, otherwise once it has expired. A run paused past its expiry
(a frozen VM, SIGSTOP) may wake up after another run took over: before and after each commit
its workers read the lease (`check_fence`), and a shard committed by a run that no longer holds
it is never published by that run (docs/architecture.md, "One writer per OUTPUT").
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from zimage_batch.output import layout
from zimage_batch.storage import Storage

#: Seconds a lease lasts unless renewed (the `lease_ttl` job setting).
DEFAULT_TTL = 120.0
#: Seconds between renewals (the `lease_renew_interval` job setting).
DEFAULT_RENEW_INTERVAL = 20.0
#: Seconds between looks at a held lease while waiting for it (--wait).
WAIT_POLL = 5.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease on OUTPUT."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must not commit."""


def new_run_id() -> str:
    """A run's id: when it started (for people) and 8 random bytes (unique)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:16]


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state, start time in clock ticks since boot) of process `pid` from /proc (Linux); None
    where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the first two fields end at ')'
        return fields[0].decode(), float(fields[19])  # fields 3 and 22 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def _process_started(pid: int) -> float | None:
    """The start time of process `pid`, to tell a reused pid; None where /proc does not say."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _pid_alive(pid: int, started: float | None) -> bool:
    """Whether process `pid` runs (not a zombie), and is the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, now_started = stat
    return state != "Z" and (started is None or now_started == started)


@dataclass(frozen=True)
class LeaseRecord:
    """What `_lease.json` holds."""

    run: str  # the holder's run id: the fencing token its commit markers carry
    host: str
    pid: int
    started: float  # when the holder took the lease (its clock, seconds since the epoch)
    expires: float  # the holder's clock: after this, anyone may take it over
    ttl: float
    pid_started: float | None = None  # the holder process's start time, to tell a reused pid

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        values = json.loads(data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"run {self.run} (pid {self.pid} on {self.host}, since {when})"

    def takeover_reason(self, now: float) -> str | None:
        """Why this lease may be taken over now (its holder is dead or it expired), or None."""
        if self.host == platform.node() and not _pid_alive(self.pid, self.pid_started):
            return f"its process {self.pid} is no longer running on this host"
        if now >= self.expires:
            return f"it expired {now - self.expires:.0f} s ago"
        return None


def read_lease(storage: Storage) -> LeaseRecord | None:
    """The lease OUTPUT holds now, or None (no run holds it, or its file is unreadable)."""
    try:
        return LeaseRecord.from_json(storage.get_bytes(layout.LEASE))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None


def check_fence(storage: Storage, run: str | None) -> None:
    """Raise LeaseLost unless OUTPUT's lease is still held by `run` (None: no lease in use)."""
    if run is None:
        return
    holder = read_lease(storage)
    if holder is None or holder.run != run:
        taken = f"now held by {holder.describe()}" if holder else "released"
        raise LeaseLost(f"the lease on {storage.uri} is no longer this run's ({taken}); not committing")


class Lease:
    """The lease one run holds on OUTPUT: acquire, keep renewed (a thread), release."""

    def __init__(self, storage: Storage, run: str, ttl: float = DEFAULT_TTL,
                 renew_interval: float = DEFAULT_RENEW_INTERVAL, echo: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.run = run
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.echo = echo
        self.clock = clock
        self.version: str | None = None  # of the lease object as we last wrote it
        self.record: LeaseRecord | None = None  # what we last wrote
        self.lost: str | None = None  # why the lease was lost, once it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> LeaseRecord:
        now = self.clock()
        return LeaseRecord(run=self.run, host=platform.node(), pid=os.getpid(), started=now,
                           expires=now + self.ttl, ttl=self.ttl, pid_started=_process_started(os.getpid()))

    # ------------------------------------------------------------------ acquire
    def acquire(self, wait: bool = False) -> None:
        """Take the lease: create it, or take over a dead holder's. A live holder's lease is
        refused (LeaseHeld), or with `wait` waited for."""
        said_waiting = False
        while True:
            mine = self._record()
            if self.storage.put_if_absent(layout.LEASE, mine.to_json()):
                self.version, self.record = self._version_of_mine(), mine
                if self.version is not None:
                    return
                continue
            try:
                data, version = self.storage.get_versioned(layout.LEASE)
            except FileNotFoundError:  # released since we looked
                continue
            try:
                holder = LeaseRecord.from_json(data)
                reason = holder.takeover_reason(self.clock())
            except (ValueError, TypeError):
                holder, reason = None, "its file is unreadable"
            if holder is not None and holder.run == self.run:  # our create landed, its answer was lost
                self.version, self.record = version, holder
                return
            if reason is not None:
                new_version = self.storage.put_if_match(layout.LEASE, mine.to_json(), version)
                if new_version is not None:
                    self.version, self.record = new_version, mine
                    who = holder.describe() if holder else "an unknown run"
                    self.echo(f"took over the lease on {self.storage.uri} from {who}: {reason}")
                    return
                continue  # it changed meanwhile: look again
            assert holder is not None
            left = max(0.0, holder.expires - self.clock())
            if not wait:
                raise LeaseHeld(
                    f"{self.storage.uri} is being written by {holder.describe()}; its lease expires in "
                    f"{left:.0f} s unless renewed; wait for that run to end, or run with --wait")
            if not said_waiting:
                self.echo(f"waiting for {holder.describe()} to finish writing {self.storage.uri} "
                          f"(its lease expires in {left:.0f} s unless renewed)")
                said_waiting = True
            time.sleep(min(WAIT_POLL, self.renew_interval))

    def _version_of_mine(self) -> str | None:
        """The version of the lease object if it names this run (None if another run holds it)."""
        try:
            data, version = self.storage.get_versioned(layout.LEASE)
        except FileNotFoundError:
            return None
        try:
            return version if LeaseRecord.from_json(data).run == self.run else None
        except (ValueError, TypeError):
            return None

    # ------------------------------------------------------------------ renew
    def renew(self) -> None:
        """Push the expiry forward; LeaseLost when another run took the lease over."""
        if self.version is None or self.record is None:
            raise LeaseLost("the lease was not acquired")
        record = dataclasses.replace(self.record, expires=self.clock() + self.ttl)
        new_version = self.storage.put_if_match(layout.LEASE, record.to_json(), self.version)
        if new_version is None:
            # Changed since our last write: ours still (a lost answer to a write that landed), or taken.
            version = self._version_of_mine()
            if version is None:
                holder = read_lease(self.storage)
                raise LeaseLost(f"the lease on {self.storage.uri} was taken over by "
                                f"{holder.describe() if holder else 'another run'}")
            self.version = version
            new_version = self.storage.put_if_match(layout.LEASE, record.to_json(), self.version)
        if new_version is not None:
            self.version, self.record = new_version, record

    def keep_renewed(self, on_lost: Callable[[str], None]) -> None:
        """Renew in a background thread until `release`; `on_lost(reason)` once it is lost.
        Storage errors are retried at the next interval (the fence guards commits meanwhile)."""
        def loop() -> None:
            while not self._stop.wait(self.renew_interval):
                try:
                    self.renew()
                except LeaseLost as exc:
                    self.lost = str(exc)
                    on_lost(self.lost)
                    return
                except Exception as exc:  # noqa: BLE001 - a flaky store: try again next time
                    self.echo(f"warning: could not renew the lease on {self.storage.uri} ({exc}); retrying")

        self._thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.version is None or self.lost:
            return
        try:
            if not self.storage.delete_if_match(layout.LEASE, self.version):
                version = self._version_of_mine()
                if version is not None:
                    self.storage.delete_if_match(layout.LEASE, version)
        except Exception as exc:  # noqa: BLE001 - the run's outcome stands; the lease expires by itself
            self.echo(f"warning: could not release the lease on {self.storage.uri} ({exc}); "
                      f"it expires in {self.ttl:.0f} s, or at once for a rerun on this host")
        self.version = None
