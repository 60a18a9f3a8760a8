"""One writer per OUTPUT: the lease (create, refuse, take over, renew, release) and its fence,
on a local folder and on a real S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from zimage_batch.output import layout
from zimage_batch.output.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord, check_fence, read_lease
from zimage_batch.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/out")


def _plant(storage, **fields):
    """A lease written by some other run."""
    now = time.time()
    record = {"run": "other", "host": "elsewhere", "pid": 1, "started": now, "expires": now + 60, "ttl": 60.0} | fields
    storage.put_bytes(layout.LEASE, json.dumps(record).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_takes_the_lease_and_gives_it_back(storage):
    lease = Lease(storage, "run-a", ttl=60, renew_interval=10, echo=lambda line: None)
    lease.acquire()
    held = read_lease(storage)
    assert held.run == "run-a" and held.expires > time.time() + 50
    check_fence(storage, "run-a")
    lease.release()
    assert not storage.exists(layout.LEASE)
    Lease(storage, "run-b", echo=lambda line: None).acquire()  # free again
    assert read_lease(storage).run == "run-b"


def test_a_live_holder_is_refused_in_one_line_naming_it(storage):
    _plant(storage, run="nightly-1", host="gpu-head", pid=4242)
    with pytest.raises(LeaseHeld) as refused:
        Lease(storage, "run-b", echo=lambda line: None).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert "nightly-1" in message and "gpu-head" in message and "4242" in message
    assert "expires in" in message and "--wait" in message
    assert read_lease(storage).run == "nightly-1"


def test_an_expired_lease_is_taken_over_with_a_line(storage):
    _plant(storage, expires=time.time() - 5)
    lines = []
    Lease(storage, "run-b", echo=lines.append).acquire()
    assert read_lease(storage).run == "run-b"
    assert any("took over" in line and "expired" in line for line in lines)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(storage):
    import platform

    _plant(storage, host=platform.node(), pid=_dead_pid(), expires=time.time() + 600)
    lines = []
    started = time.monotonic()
    Lease(storage, "run-b", echo=lines.append).acquire()
    assert time.monotonic() - started < 5
    assert any("no longer running" in line for line in lines)


def test_a_live_process_on_this_host_keeps_its_lease(storage):
    import os
    import platform

    _plant(storage, host=platform.node(), pid=os.getpid(), expires=time.time() + 600)
    with pytest.raises(LeaseHeld):
        Lease(storage, "run-b", echo=lambda line: None).acquire()


def test_wait_takes_the_lease_once_the_holder_lets_it_expire(storage):
    _plant(storage, expires=time.time() + 1.5)
    lines = []
    started = time.monotonic()
    Lease(storage, "run-b", ttl=5, renew_interval=0.2, echo=lines.append).acquire(wait=True)
    assert 1.0 < time.monotonic() - started < 15
    assert read_lease(storage).run == "run-b"
    assert lines[0].startswith("waiting for run other")


def test_renewal_pushes_the_expiry_and_a_takeover_is_noticed(storage):
    lease = Lease(storage, "run-a", ttl=30, renew_interval=0.2, echo=lambda line: None)
    lease.acquire()
    first = read_lease(storage).expires
    time.sleep(0.05)
    lease.renew()
    assert read_lease(storage).expires > first
    lost = threading.Event()
    lease.keep_renewed(on_lost=lambda reason: lost.set())
    _plant(storage, run="thief")  # another run took it over
    assert lost.wait(10)
    assert "thief" in lease.lost
    with pytest.raises(LeaseLost):
        check_fence(storage, "run-a")
    lease.release()  # not ours any more: left alone
    assert read_lease(storage).run == "thief"


def test_of_two_runs_taking_over_one_expired_lease_one_wins(storage):
    for _ in range(5):
        _plant(storage, expires=time.time() - 1)
        results = {}

        def take(name):
            try:
                Lease(storage, name, echo=lambda line: None).acquire()
                results[name] = "won"
            except LeaseHeld:
                results[name] = "refused"

        threads = [threading.Thread(target=take, args=(f"run-{k}",)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [name for name, result in results.items() if result == "won"]
        assert len(winners) == 1, results
        assert read_lease(storage).run == winners[0]


def test_the_fence_refuses_a_run_without_the_lease(storage):
    with pytest.raises(LeaseLost):
        check_fence(storage, "run-a")  # nobody holds it
    _plant(storage, run="run-b")
    with pytest.raises(LeaseLost):
        check_fence(storage, "run-a")
    check_fence(storage, "run-b")
    check_fence(storage, None)  # no lease in use


def test_lease_record_round_trips_and_ignores_unknown_keys():
    record = LeaseRecord(run="r", host="h", pid=1, started=1.0, expires=2.0, ttl=1.0, pid_started=3.0)
    data = json.loads(record.to_json()) | {"added_later": 1}
    assert LeaseRecord.from_json(json.dumps(data).encode()) == record


def test_a_zombie_holder_counts_as_dead(storage):
    """A killed driver nobody has reaped yet is a zombie: its pid answers, but it runs no more."""
    import platform

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and "Z" not in open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1][:3]:
        time.sleep(0.05)
    try:
        _plant(storage, host=platform.node(), pid=proc.pid, expires=time.time() + 600)
        lines = []
        Lease(storage, "run-b", echo=lines.append).acquire()
        assert any("no longer running" in line for line in lines)
    finally:
        proc.wait()
