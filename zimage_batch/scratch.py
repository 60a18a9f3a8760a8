"""Each process's folder for temporary files, and the removal of folders whose owner died.

Writers build webdataset tars and Parquet files on local disk before they upload them (hundreds
of MB each with large shards). They do it in one folder per process,

    $TMPDIR/zimage-batch-scratch/<host>-<pid>-<token>/
      owner.json      {"host", "pid", "started"}: who owns the folder (started: the process's
                      start time, so a pid the system reused for another process is told apart)

made when a writer first needs it and removed when the last one is done, at exit, and on SIGINT
and SIGTERM where `claim(signals=True)` installed the handlers. A SIGKILL or a lost node removes
nothing: `sweep_dead()`, called when a worker starts, removes the folders of this host whose
owner is gone (pid dead, or reused by a younger process).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

ROOT_NAME = "zimage-batch-scratch"
OWNER_FILE = "owner.json"
HOST = socket.gethostname()

_lock = threading.RLock()
_folder: Path | None = None
_at_exit = False
_in_use = 0  # folders mkdtemp gave and release did not take back
_previous_handlers: dict[int, Any] = {}


def root() -> Path:
    """Where every process's scratch folder lives (under TMPDIR, read at each call)."""
    return Path(tempfile.gettempdir()) / ROOT_NAME


def process_start_time(pid: int) -> str | None:
    """When `pid` started, as an opaque string (the kernel's clock ticks since boot on Linux);
    None when unknown (no /proc, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def folder() -> Path:
    """This process's scratch folder, made (with its owner file) on first use or after a removal."""
    with _lock:
        return _own_folder()


def _own_folder() -> Path:
    global _folder, _at_exit
    if _folder is None or not _folder.is_dir():
        _folder = _make_folder()
        if not _at_exit:
            atexit.register(remove)
            _at_exit = True
    return _folder


def mkdtemp(prefix: str) -> str:
    """A fresh temporary folder inside this process's scratch folder (a writer's); give it
    back with `release`."""
    global _in_use
    with _lock:
        path = tempfile.mkdtemp(prefix=prefix, dir=_own_folder())
        _in_use += 1
        return path


def release(path: str) -> None:
    """Remove a folder `mkdtemp` gave; the process's folder goes with the last one, so a worker
    that ends (even by a kill that runs no clean-up) leaves nothing while it writes nothing."""
    global _in_use
    shutil.rmtree(path, ignore_errors=True)
    with _lock:
        _in_use = max(0, _in_use - 1)
        if _in_use == 0:
            remove()


def claim(signals: bool = False) -> None:
    """Sweep the folders of dead owners; with `signals`, SIGINT and SIGTERM remove this
    process's folder before the handlers they had run (only from the main thread)."""
    sweep_dead()
    if signals and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum not in _previous_handlers:
                _previous_handlers[signum] = signal.signal(signum, _on_signal)


def remove() -> None:
    """Remove this process's scratch folder (at exit, on a signal)."""
    global _folder
    path, _folder = _folder, None
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.parent.rmdir()  # the last process's folder: leave TMPDIR as it was
        except OSError:
            pass


def sweep_dead() -> list[Path]:
    """Remove the scratch folders of this host whose owner process is gone; returns them."""
    removed = []
    try:
        children = list(root().iterdir())
    except OSError:
        return removed
    for child in children:
        if child.is_dir() and _owner_is_dead(child):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _make_folder() -> Path:
    pid = os.getpid()
    path = root() / f"{HOST}-{pid}-{uuid.uuid4().hex[:12]}"
    for attempt in range(3):
        try:
            path.mkdir(parents=True)
            break
        except FileNotFoundError:  # another process removed the emptied root meanwhile
            if attempt == 2:
                raise
    owner = {"host": HOST, "pid": pid, "started": process_start_time(pid)}
    tmp = path / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, path / OWNER_FILE)
    return path


def _owner_is_dead(path: Path) -> bool:
    """Whether `path`'s owner is a process of this host that is gone. The owner file is read;
    a folder whose file is not written yet is judged by the pid in its name."""
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
    except (OSError, ValueError):
        host, _, rest = path.name.rpartition("-")[0].rpartition("-")
        owner = {"host": host, "pid": rest, "started": None}
    try:
        pid = int(owner.get("pid"))
    except (TypeError, ValueError):
        return False
    if owner.get("host") != HOST:
        return False
    if not _pid_alive(pid):
        return True
    started, now = owner.get("started"), process_start_time(pid)
    return started is not None and now is not None and started != now  # the pid was reused


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _on_signal(signum: int, frame: Any) -> None:
    remove()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default action: end the process as the signal would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
