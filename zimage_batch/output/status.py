"""`zimage-batch status OUTPUT`: where a job stands, read from OUTPUT alone.

Works while a run goes on, from another machine, and after it ended: everything comes from
storage, never from the driver.

    job.json              the job (settings, fingerprint)
    _runs/plan-*.json     one per run, written when it planned: total rows and shards then
    _runs/<time>.json     one per run that ended: its summary and per-worker figures
    _commits/<shard>.json one per committed shard: rows, ok, error, errors, times, worker

Only shards that are committed and published (their metadata is in `metadata/`) count: what
`status` reports is what a reader of the output sees.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zimage_batch.output import layout
from zimage_batch.output.lease import LeaseRecord, read_lease
from zimage_batch.output.ledger import CommitMarker, Ledger
from zimage_batch.output.overlaps import Overlap, find_overlaps, overlap_line, without_extras
from zimage_batch.output.throughput import markers_of_run, run_throughput
from zimage_batch.source import Source
from zimage_batch.storage import Storage, StorageError, open_storage

LAST_ERRORS = 5
# A running job is reported as stalled when no shard has committed for this long (seconds), or
# for STALL_SHARDS times its slowest recent shard if that is longer.
STALL_AFTER_S = 600
STALL_SHARDS = 4


class NoJob(RuntimeError):
    """OUTPUT holds no job."""


@dataclass
class OutputState:
    """What OUTPUT holds about its job, as read from storage."""

    storage: Storage
    job: dict[str, Any]  # job.json
    markers: list[CommitMarker]  # commit markers of published shards, by shard name, each row once
    plans: list[dict[str, Any]] = field(default_factory=list)  # plan records, oldest first
    runs: list[dict[str, Any]] = field(default_factory=list)  # run records, oldest first
    overlaps: list[Overlap] = field(default_factory=list)  # published shards that share rows (extras left out of markers)
    lease: LeaseRecord | None = None  # the run writing OUTPUT now, if any

    @property
    def latest_plan(self) -> dict[str, Any] | None:
        return self.plans[-1] if self.plans else None

    @property
    def latest_run(self) -> dict[str, Any] | None:
        return self.runs[-1] if self.runs else None

    @property
    def model_draws_noise(self) -> bool:
        """The job's model is tiny random-init weights: a tiny source, or a folder make-tiny-model
        wrote (job.json's model_draws_noise, worked out when the run began)."""
        model = Source.try_parse(str(self.job.get("job", {}).get("model", "")))
        return (model is not None and model.draws_noise) or bool(self.job.get("model_draws_noise"))


def load_output(output: str | Storage) -> OutputState:
    """Read job.json, every commit marker and every `_runs/` record; NoJob if there is no job."""
    storage = open_storage(output) if isinstance(output, str) else output
    job = Ledger(storage).read_job()
    if job is None:
        raise NoJob(f"{storage.uri} holds no job (no {layout.JOB_FILE})")
    ledger = Ledger(storage)
    published = ledger.published_shards()
    markers = [m for m in ledger.committed().values() if m.shard in published]
    overlaps = find_overlaps(markers)
    markers = sorted(without_extras(markers, overlaps), key=lambda m: m.shard)
    keys = [info.key for info in storage.list(layout.RUNS) if info.key.endswith(".json")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        records = list(pool.map(lambda key: _read_json(storage, key), keys))
    is_plan = [k[len(layout.RUNS) :].startswith(layout.PLAN_RECORD_PREFIX) for k in keys]
    plans = [r for r, plan in zip(records, is_plan) if r and plan]
    runs = [r for r, plan in zip(records, is_plan) if r and not plan]
    plans.sort(key=lambda r: r.get("started", 0))
    runs.sort(key=lambda r: r.get("finished", 0))
    return OutputState(storage, job, markers, plans, runs, overlaps, read_lease(storage))


def _read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return storage.get_json(key)
    except (FileNotFoundError, StorageError):  # removed meanwhile, or not ours
        return None


def run_state(state: OutputState) -> str:
    """running | finished | failed | stopped | unknown (for the latest run)."""
    plan, run = state.latest_plan, state.latest_run
    if run is not None and (plan is None or run.get("finished", 0) >= plan.get("started", 0)):
        if run.get("stopped"):
            return "stopped"
        return "failed" if run.get("failed") else "finished"
    return "running" if plan is not None else "unknown"


def summarize(state: OutputState, now: float | None = None) -> dict[str, Any]:
    """The figures `status` prints (and `--json` emits)."""
    now = time.time() if now is None else now
    plan, run = state.latest_plan, state.latest_run
    current = run_state(state)
    markers = state.markers
    rows_done = sum(m.rows for m in markers)
    rows_ok = sum(m.ok for m in markers)  # metadata rows: one per image
    rows_failed = sum(m.error for m in markers)
    rows_filtered = sum(m.filtered for m in markers)  # a curated job's images turned down by keep
    images_done = sum(m.images or m.rows for m in markers)
    total_rows = plan.get("total_rows") if plan else (run.get("rows_total") if run else None)
    total_shards = plan.get("total_shards") if plan else None
    if total_shards is None and run is not None:  # outputs written before plan records
        total_shards = run.get("shards_committed", 0) + len(run.get("failed") or {})
    started = plan.get("started") if plan else (run["finished"] - run.get("elapsed_s", 0) if run else None)
    if current == "running":
        elapsed = now - plan["started"]
    elif run is not None:
        elapsed = run.get("elapsed_s", 0.0)
    else:
        elapsed = None
    # the latest run's throughput, as its last line said (or, while it runs, would say now)
    run_id = (plan or {}).get("run") if current == "running" else (run or {}).get("run")
    rate = run_throughput(markers, started or 0.0, elapsed or 0.0, run_id)
    recent = markers_of_run(markers, started or 0.0, run_id)
    rows_left = max(total_rows - rows_done, 0) if total_rows is not None else None
    quiet = _quiet_for(plan, recent, now) if current == "running" else None
    stalled = quiet is not None and quiet > max(STALL_AFTER_S, STALL_SHARDS * _slowest_shard(recent))
    rows_per_s = rate.rows / rate.wall_s if rate.wall_s > 0 else 0.0
    errors = [
        {"shard": m.shard, "error": e, "finished": m.finished}
        for m in sorted(markers, key=lambda m: m.finished, reverse=True)
        for e in m.errors
    ]
    failed_shards = (run.get("failed") or {}) if run is not None and current != "running" else {}
    errors = [{"shard": s, "error": f"shard failed: {r}", "finished": run.get("finished")}
              for s, r in failed_shards.items()] + errors
    job = state.job.get("job", {})
    return {
        "output": state.storage.uri,
        "state": current,
        "fingerprint": state.job.get("fingerprint"),
        "model": job.get("model"),
        "variant": job.get("variant"),
        "format": job.get("format"),
        "started": started,
        "elapsed_s": elapsed,
        "runs": len(state.runs),
        "total_shards": total_shards,
        "shards_done": len(markers),
        "shards_left": max(total_shards - len(markers), 0) if total_shards is not None else None,
        "shards_failed": sorted(failed_shards),
        "total_rows": total_rows,
        "rows_done": rows_done,
        "rows_ok": rows_ok,
        "rows_failed": rows_failed,
        "rows_filtered": rows_filtered,
        "rows_left": rows_left,
        "images_done": images_done,
        "images_ok": rows_ok,
        "images_failed": rows_failed,
        "throughput": rate.to_dict(),
        "throughput_text": rate.text(),
        "quiet_s": quiet,
        "stalled": stalled,
        "eta_s": rows_left / rows_per_s if current == "running" and not stalled and rows_per_s > 0
        and rows_left is not None else None,
        "last_errors": errors[:LAST_ERRORS],
        "overlaps": overlap_line(state.storage.uri, state.overlaps) if state.overlaps else None,
        "writer": None if state.lease is None else {
            "run": state.lease.run, "host": state.lease.host, "pid": state.lease.pid,
            "lease_expires_in_s": state.lease.expires - now, "text": state.lease.describe()},
    }


def _quiet_for(plan: dict[str, Any], recent: list[CommitMarker], now: float) -> float:
    """Seconds since the running job last showed progress (its plan, or its last commit)."""
    last = max([plan.get("started", 0)] + [m.finished for m in recent])
    return max(0.0, now - last)


def _slowest_shard(markers: list[CommitMarker]) -> float:
    return max((m.finished - m.started for m in markers), default=0.0)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _of(n: int, total: int | None) -> str:
    return f"{n} of {total}" if total is not None else f"{n} of ?"


def _running_note(s: dict[str, Any]) -> str:
    if s["state"] != "running":
        return ""
    if s["stalled"]:
        return (f" (stalled? no shard committed for {_duration(s['quiet_s'])}: its driver may have died; "
                "run the job again to resume)")
    return " (no run record yet: running, or its driver died)"


def format_status(s: dict[str, Any]) -> list[str]:
    """Human-readable lines for `status`."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["started"])) if s["started"] else "?"
    pct = f" ({s['rows_done'] / s['total_rows']:.0%})" if s["total_rows"] else ""
    lines = [
        f"job: {s['output']} (model {s['model']}, {s['variant']}, format {s['format']}, fingerprint {s['fingerprint']})",
        f"state: {s['state']}{_running_note(s)}; "
        f"started {started}, elapsed {_duration(s['elapsed_s'])}, {s['runs']} run(s) ended",
        f"shards: {_of(s['shards_done'], s['total_shards'])} done, "
        f"{s['shards_left'] if s['shards_left'] is not None else '?'} left"
        + (f", {len(s['shards_failed'])} failed" if s["shards_failed"] else ""),
        f"rows: {_of(s['rows_done'], s['total_rows'])} done{pct}, {s['rows_failed']} failed, "
        + (f"{s['rows_filtered']} filtered, " if s.get("rows_filtered") else "")
        + f"{s['rows_left'] if s['rows_left'] is not None else '?'} left"
        + (f"; images: {s['images_ok']} ok, {s['images_failed']} failed" if s["images_done"] != s["rows_done"] else ""),
        f"throughput: {s['throughput_text']}" + (f"; ETA {_duration(s['eta_s'])}" if s["eta_s"] is not None else ""),
    ]
    if s["writer"]:
        left = s["writer"]["lease_expires_in_s"]
        lines.append(f"writer: {s['writer']['text']}; its lease "
                     + (f"expires in {_duration(left)} unless renewed" if left > 0 else f"expired {_duration(-left)} ago"))
    if s["overlaps"]:
        lines.append(f"overlaps: {s['overlaps']}")
    if s["last_errors"]:
        lines.append("last errors:")
        lines += [f"  {e['shard']}: {e['error']}" for e in s["last_errors"]]
    return lines


def status(output: str) -> dict[str, Any]:
    """Load OUTPUT and summarize it."""
    return summarize(load_output(output))
