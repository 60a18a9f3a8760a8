"""`status` and `report` as an operator uses them: during a run, after it, on local disk and S3;
the report rendered in headless Chromium; progress lines when stdout is not a terminal."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process

from zimage_batch.output.report import MAX_THUMBNAILS, render
from zimage_batch.output.status import load_output, summarize
from zimage_batch.storage import open_storage

CHINESE = "一只可爱的小猫坐在窗台上"
HTML_PROMPT = '<b>bold</b> & "quoted" <script>alert(1)</script>'
PROMPTS = ["a cat on a sofa", CHINESE, HTML_PROMPT, "un chat noir la nuit", "夕阳下的古城"]

RUN_ROWS = 360  # long enough that `status` sees the run half done
RUN_SHARD = 10


def make_manifest(path: Path, n: int) -> list[str]:
    ids = [f"row-{i:05d}" for i in range(n)]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "seed": pa.array(range(n), pa.int64())}), path)
    return ids


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zimage_batch.cli", *args], capture_output=True, text=True, **kwargs)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + "/" + imgs.length;
});
</script></body>"""


def render_in_chromium(page: str, folder: Path) -> tuple[str, int, int, Path]:
    """Open the page in headless Chromium: (DOM, images loaded, images, screenshot path).

    A copy of the page gets a probe script that records, once the page has loaded, how many
    <img> decoded (`complete && naturalWidth > 0`)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / "probe.html"
    probe.write_text(page.replace("</body>", PROBE, 1), encoding="utf-8")
    flags = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert found, "the page did not finish loading in Chromium"
    shot = folder / "report.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", probe.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    return dom, int(found.group(1)), int(found.group(2)), shot


def check_self_contained(page: str) -> None:
    assert '<meta charset="utf-8">' in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page), "the page must make no requests"
    assert "<script" not in page, "prompts must be escaped; the page has no scripts"


# ------------------------------------------------------------------ a run watched while it goes
@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """A CLI run with stdout piped; `status` runs while it goes. Returns what was seen."""
    tmp = tmp_path_factory.mktemp("watched")
    manifest, out = tmp / "m.parquet", tmp / "out"
    make_manifest(manifest, RUN_ROWS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", str(manifest), "--output", str(out),
         "--model", "tiny:turbo", "--workers", "2", "--shard-size", str(RUN_SHARD), "--set", "progress_interval=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True),
               threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list((out / "_commits").glob("*.json")):
            time.sleep(0.1)
        during = cli("status", str(out), "--json")
        still_running = proc.poll() is None
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join(timeout=10)
    return {"out": out, "during": during, "still_running": still_running, "rc": proc.returncode,
            "stdout": [line.rstrip("\n") for line in lines], "stderr": "".join(errors)}


def test_status_while_running(watched_run):
    during = watched_run["during"]
    assert during.returncode == 0, during.stderr
    assert watched_run["still_running"], "the run ended before status ran; make RUN_ROWS larger"
    s = json.loads(during.stdout)
    assert s["state"] == "running"
    assert s["total_rows"] == RUN_ROWS and s["total_shards"] == RUN_ROWS // RUN_SHARD
    assert 0 < s["rows_done"] < RUN_ROWS and s["rows_left"] == RUN_ROWS - s["rows_done"]
    assert s["rows_done"] == s["shards_done"] * RUN_SHARD and s["rows_failed"] == 0
    assert s["elapsed_s"] > 0


def test_progress_lines_and_report_location_when_piped(watched_run):
    assert watched_run["rc"] == 0, watched_run["stderr"]
    stdout = watched_run["stdout"]
    progress = [line for line in stdout if line.startswith("progress:")]
    assert len(progress) >= 3, stdout
    assert all(re.search(r"\d+/\d+ rows done, \d+ failed, \d+ left \| [\d.]+ img/s over wall time so far", line)
               for line in progress[:-1])
    assert progress[-1] == f"progress: {RUN_ROWS}/{RUN_ROWS} rows done, 0 failed, 0 left"  # the rate: on the last line
    assert not any("\r" in line or "\x1b" in line for line in stdout), "no terminal control codes in logs"
    report = watched_run["out"] / "report.html"
    assert stdout[-2] == f"report: {report}" and report.is_file()
    # the last line is the run's throughput, the same sentence status and the report show
    s = json.loads(cli("status", str(watched_run["out"]), "--json").stdout)
    assert stdout[-1] == f"throughput: {s['throughput_text']}"
    assert re.fullmatch(r"throughput: [\d.]+ img/s over the run's wall time \(\d+ images in [\d.]+ s\); "
                        r"[\d.]+ img/s over generation time \([\d.]+ s of device time\)", stdout[-1])
    assert html.escape(s["throughput_text"]) in report.read_text(encoding="utf-8")
    assert stdout[0].startswith("note: model tiny:turbo is a tiny random-init checkpoint: its images will be noise")


def test_status_finished(watched_run):
    out = str(watched_run["out"])
    text = cli("status", out)
    assert text.returncode == 0, text.stderr
    assert "state: finished" in text.stdout
    assert f"shards: {RUN_ROWS // RUN_SHARD} of {RUN_ROWS // RUN_SHARD} done, 0 left" in text.stdout
    assert f"rows: {RUN_ROWS} of {RUN_ROWS} done (100%), 0 failed, 0 left" in text.stdout
    s = json.loads(cli("status", out, "--json").stdout)
    assert s["rows_ok"] == RUN_ROWS and s["rows_left"] == 0 and s["runs"] == 1
    assert s["throughput"]["images"] == RUN_ROWS and s["throughput"]["images_per_s_wall"] > 0
    assert s["eta_s"] is None and s["last_errors"] == []


def test_status_of_a_run_whose_driver_died(tmp_path):
    """A plan and some commits, then nothing for an hour: `status` says the run looks stalled
    and gives no ETA; the same output a minute after its last commit is simply running."""
    from zimage_batch.output.ledger import CommitMarker
    from zimage_batch.output.status import OutputState, format_status

    plan = {"started": 1_000.0, "total_rows": 100, "total_shards": 4}
    markers = [CommitMarker(shard=f"s{i}", file="m.parquet", start=25 * i, end=25 * (i + 1), rows=25, ok=25, error=0,
                            digest="", fingerprint="", format="files", started=1_000.0 + 10 * i,
                            finished=1_010.0 + 10 * i) for i in range(2)]
    state = OutputState(open_storage(str(tmp_path)), {"job": {}}, markers, plans=[plan])
    alive = summarize(state, now=1_080.0)
    assert alive["state"] == "running" and not alive["stalled"] and alive["eta_s"] is not None
    dead = summarize(state, now=1_020.0 + 3600)
    assert dead["stalled"] and dead["eta_s"] is None and dead["quiet_s"] == 3600
    line = format_status(dead)[1]
    assert "stalled? no shard committed for 1h00m00s" in line and "ETA" not in "".join(format_status(dead))


def test_status_without_a_job(tmp_path):
    result = cli("status", str(tmp_path / "nothing"))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "holds no job" in result.stderr
    assert cli("report", str(tmp_path)).returncode != 0


def test_report_renders_in_chromium(watched_run, tmp_path):
    page = (watched_run["out"] / "report.html").read_text(encoding="utf-8")
    check_self_contained(page)
    dom, loaded, images, shot = render_in_chromium(page, tmp_path)
    assert images == MAX_THUMBNAILS and loaded == images, f"{loaded} of {images} thumbnails decoded"
    assert f"A sample of {MAX_THUMBNAILS} of {RUN_ROWS} images" in dom
    assert f"{CHINESE} #1" in dom and "row-00001" in dom
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; \"quoted\" &lt;script&gt;" in dom  # shown as text, not markup
    assert "tiny random-init checkpoint" in dom and "Throughput over time" in dom and "<svg" in dom
    assert "busy fraction" in dom
    shutil.copy(shot, Path(watched_run["out"]).parent / "report.png")  # kept for a look while debugging


def test_error_rows_in_status_and_report(watched_run, tmp_path):
    """A row stored as `error` (as a failed generation leaves it) shows in status and report."""
    out = tmp_path / "out"
    shutil.copytree(watched_run["out"], out)
    shard = sorted(p.stem for p in (out / "_commits").glob("*.json"))[1]
    meta_path = out / "metadata" / f"{shard}.parquet"
    rows = pq.read_table(meta_path).to_pylist()
    bad = rows[3]
    (out / bad["image"]).unlink()
    rows[3] = bad | {"status": "error", "error": "generation failed: <img src=x onerror=alert(1)>",
                     "image": None, "sha256": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(meta_path)), meta_path)
    marker_path = out / "_commits" / f"{shard}.json"
    marker = json.loads(marker_path.read_text())
    marker |= {"ok": marker["ok"] - 1, "error": 1, "errors": [rows[3]["error"]]}
    marker_path.write_text(json.dumps(marker))

    s = summarize(load_output(str(out)))
    assert s["rows_failed"] == 1 and s["rows_ok"] == RUN_ROWS - 1
    assert s["last_errors"][0] == {"shard": shard, "error": rows[3]["error"], "finished": marker["finished"]}
    page = render(load_output(str(out)))
    check_self_contained(page)
    assert f"<td><code>{bad['id']}</code></td><td><code>{shard}</code></td>" in page
    assert "generation failed: &lt;img src=x onerror=alert(1)&gt;" in page
    assert f"{bad['id']}</code> &middot; seed" not in page, "error rows are not in the gallery"


# ------------------------------------------------------------------ S3, and the other formats
def test_report_command_on_s3_webdataset_with_report_off(tmp_path, s3_bucket, ray_local):
    """`--set report=false` writes no report; `zimage-batch report` makes it afterwards, here from
    the tars of a webdataset output on S3 (a Parquet output's report: test_dataset_outputs.py).
    The commands run in this process, the run on the module's local cluster."""
    manifest = tmp_path / "m.parquet"
    make_manifest(manifest, 24)
    output = f"s3://{s3_bucket}/jobs/wds"
    result = cli_in_process("run", "--manifest", str(manifest), "--output", output, "--model", "tiny:turbo",
                            "--workers", "1", "--shard-size", "8", "--format", "webdataset", "--set", "report=false")
    assert result.returncode == 0, result.stderr
    assert "report:" not in result.stdout and not open_storage(output).exists("report.html")
    made = cli_in_process("report", output)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"report: {output}/report.html"
    page = open_storage(output).get_bytes("report.html").decode("utf-8")
    check_self_contained(page)
    assert page.count('src="data:image/jpeg;base64,') == 24 and "All 24 images." in page
    _, loaded, images, _ = render_in_chromium(page, tmp_path / "view")
    assert loaded == images == 24
    status = cli_in_process("status", output, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["rows_ok"] == 24


# ------------------------------------------------------------------ metrics
METRICS_SCRIPT = """
import socket, sys, time, urllib.request
import ray
from zimage_batch.run import metrics

metrics.batch_done("w", 4, 0.5); metrics.rows_done("w", 3, 1); metrics.queue_depth(2, 1)  # no Ray yet: no-ops
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR", _metrics_export_port=port)

@ray.remote(num_cpus=0)
class Worker:
    def work(self):
        metrics.batch_done("w1", 4, 0.5)
        metrics.rows_done("w1", 10, 2)

ray.get(Worker.remote().work.remote())
metrics.queue_depth(3, 2)
names = ("ray_zimage_rows_done_total", "ray_zimage_rows_failed_total", "ray_zimage_images_per_second",
         "ray_zimage_batch_latency_seconds_count", "ray_zimage_queue_depth", "ray_zimage_shards_in_flight")
deadline, found = time.time() + 90, {}
while time.time() < deadline:
    time.sleep(2)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        continue
    found = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("ray_zimage")}
    if all(name in found for name in names):
        print(found["ray_zimage_rows_done_total"], found["ray_zimage_rows_failed_total"],
              found["ray_zimage_images_per_second"], found["ray_zimage_queue_depth"])
        sys.exit(0)
print("missing:", [n for n in names if n not in found])
sys.exit(1)
"""


def test_metrics_exported_through_ray():
    """Rows, images/s, batch latency and queue depth reach Ray's Prometheus endpoint; the same
    calls are no-ops without Ray."""
    result = subprocess.run([sys.executable, "-c", METRICS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.split() == ["10.0", "2.0", "8.0", "3.0"]
