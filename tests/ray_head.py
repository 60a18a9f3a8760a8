"""Ray nodes started as an operator starts them (`ray start --block`), and stopped by process group.

`ray stop` would stop every Ray process of the machine, other test runs' clusters too; each node
here runs in its own process group (its raylet, GCS and workers with it), which is what is
signalled to stop it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

READY = "This command will now block"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGTERM to the node's process group, SIGKILL to what is left after 5 s."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.time() + grace
            while time.time() < deadline:
                try:
                    os.killpg(self.process.pid, 0)
                except ProcessLookupError:
                    self.process.poll()
                    return
                self.process.poll()  # reap the leader, or the group never empties
                time.sleep(0.2)


def start_node(args: list[str], env: dict[str, str], cwd: Path, log: Path, wrap: tuple[str, ...] = (),
               timeout: float = 180.0) -> Node:
    """`ray start ARGS --block` (behind `wrap`, e.g. an `unshare` command) in `cwd`; returns once it is up."""
    command = [*wrap, sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", "--block"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    node = Node(process, log)
    deadline = time.time() + timeout
    while READY not in log.read_text(errors="replace"):
        if process.poll() is not None or time.time() > deadline:
            node.stop()
            raise RuntimeError(f"ray start did not come up: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    return node
