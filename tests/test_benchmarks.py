"""The benchmark scripts keep working (they are run for real numbers elsewhere), and OOM splitting."""

from __future__ import annotations

import re
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(*args: str, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_benchmark_runs_tiny_on_cpu():
    out = _run("benchmarks/gpu.py", "--tiny", "--batches", "1,2", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2 and all("x" in r for r in rows)


def test_gpu_benchmark_builds_the_released_architecture():
    """On the meta device (no memory): the sizes of the full Z-Image-Turbo parts."""
    import gpu

    pipe = gpu.full_size_pipeline("meta", torch.bfloat16)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
    assert count(pipe.transformer) == pytest.approx(6.15, abs=0.01)
    assert count(pipe.text_encoder) == pytest.approx(4.02, abs=0.01)
    assert pipe.transformer.config.n_layers == 30 and pipe.transformer.config.dim == 3840
    assert pipe.vae.config.latent_channels == 16


def test_plan_scale_benchmark_small():
    out = _run("benchmarks/plan_scale.py", "--rows", "20000", "--files", "2")
    assert "shards committed=10 todo=10" in out and "driver peak RSS" in out


def test_cpu_harness_prints_the_figures_it_is_quoted_for():
    """The figures behind docs/performance.md's ratios (c/a, c/e, f/a') on a handful of rows: start-ups,
    not images, take the time. (b) Ray Data and (d) S3 add a minute of start-ups to this suite
    for code that is the baselines', not the product's; `--only bd` runs them."""
    out = _run("benchmarks/cpu.py", "--rows", "4", "--batch-size", "4", "--shard-size", "4", "--repeats", "1",
               "--steps", "2", "--only", "acef", timeout=900)
    for label in ("(a)", "(c)", "(e)", "(f)", "(a')", "c/a =", "c/e =", "f/a' ="):
        assert label in out, out


def test_out_of_memory_splits_the_batch(monkeypatch):
    from zimage_batch.generate.engine import Engine
    from zimage_batch.generate.requests import GenerationRequest
    from zimage_batch.model.sources import resolve_model

    engine = Engine(resolve_model("tiny:turbo").path, "turbo", device="cpu")
    requests = [GenerationRequest(f"prompt {i}", i, 64, 64, 4, 0.0) for i in range(6)]
    expected = engine.generate(requests, batch_size=6)
    real = engine._generate_batch
    sizes: list[int] = []
    failed_attempts: list[weakref.ref] = []

    def tight_memory(batch):
        # The halves must get the failed attempt's memory back: nothing may keep its frame alive.
        assert all(ref() is None for ref in failed_attempts), "a failed attempt's activations are still held"
        sizes.append(len(batch))
        if len(batch) > 2:
            activations = torch.empty(1024)
            failed_attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(batch)

    monkeypatch.setattr(engine, "_generate_batch", tight_memory)
    images = engine.generate(requests, batch_size=6)
    assert sizes == [6, 3, 1, 2, 3, 1, 2]
    for got, want in zip(images, expected):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    def never_fits(batch):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine, "_generate_batch", never_fits)
    with pytest.raises(torch.OutOfMemoryError):
        engine.generate(requests[:1], batch_size=1)


def test_gpu_worker_check_runs_on_cpu():
    """The worker's device check (shards through ShardRunner without Ray, low_vram off and on)."""
    out = _run("benchmarks/gpu_worker.py", "--device", "cpu")
    assert "low_vram=on: 4 shards, 40 rows ok" in out and "swaps=10" in out
    between = re.search(r"low_vram on vs off, all 40 rows: max \|diff\| (\d+)/255", out)
    reference = re.search(r"vs ZImagePipeline row by row, 8 rows: max \|diff\| (\d+)/255", out)
    assert between and int(between.group(1)) <= 1 and reference and int(reference.group(1)) <= 1, out


def test_default_batch_size_follows_free_memory_and_image_size(monkeypatch):
    from zimage_batch.run.batching import BatchSizer

    def default_batch_size(width: int, height: int, device: str = "cpu", low_vram: bool = False) -> int:
        return BatchSizer.measure(None, device, low_vram).size(width, height)  # free memory measured now

    assert default_batch_size(64, 64) == 64 and default_batch_size(1024, 1024) == 1  # CPU
    free = {"bytes": 40 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    assert default_batch_size(1024, 1024, "cuda") == 12  # (40 - 2) GiB / 3 GiB a row
    assert default_batch_size(512, 512, "cuda") == 16  # capped
    assert default_batch_size(1024, 1024, "cpu") == 1  # a CPU job on a GPU machine ignores the GPU
    free["bytes"] = 4 * 2**30  # a 16 GB card with the transformer loaded
    assert default_batch_size(1024, 1024, "cuda") == 1
    assert default_batch_size(1024, 1024, "cuda", low_vram=True) == 6  # (4 - 2.5) GiB / 0.25 GiB a row


def test_curation_benchmark_prints_the_measured_and_counted_shares():
    out = _run("benchmarks/curation.py", "--rows", "2", "--batch-size", "2", "--shard-size", "2")
    assert re.search(r"scoring [\d.]+ s = [\d.]+% of model time", out), out
    assert "Z-Image-Turbo 1024x1024 image at 8 NFE (6.15B transformer" in out and "all three scores" in out, out


def test_prompts_benchmark_prints_both_figures():
    out = _run("benchmarks/prompts.py", "--rows", "2", "--new-tokens", "4", "--steps", "2")
    assert re.search(r"expansion is \d+% of the worker's model time", out)
    assert re.search(r"expansion is [\d.]+% of the FLOPs", out) and "bandwidth floor" in out


def test_fleet_simulator_small():
    """The real scheduler on 100 simulated workers, faults and all: every shard done, the copies
    of tail shards bring the end closer than without them."""
    import json

    args = ("benchmarks/fleet.py", "--workers", "100", "--images", "300000", "--json")
    on, off = (json.loads(_run(*args, "--speculate", mode)) for mode in ("on", "off"))
    for r in (on, off):
        assert r["shards_failed"] == 0 and r["makespan_over_ideal"] >= 1.0 and r["preemptions"] > 0
        assert {"tail_idle_gpu_hours", "redone_gpu_hours", "dispatch_cpu_ms", "driver_peak_mib"} <= set(r)
    assert on["copies_started"] > 0 and off["copies_started"] == 0
    assert on["makespan_over_ideal"] < off["makespan_over_ideal"]
