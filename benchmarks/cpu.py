"""CPU benchmark: zimage-batch against the usual ways of running Z-Image over many prompts.

    python benchmarks/cpu.py                  # 1,000 rows, tiny:turbo, 64x64, 9 steps
    python benchmarks/cpu.py --rows 200       # quicker
    python benchmarks/cpu.py --rows 4 --batch-size 4 --shard-size 4 --repeats 1 --steps 2   # smoke run (the test's)

One command, one run, the same rows for every figure (images per second, steady state: model
loading and cluster start-up are reported apart, not counted):
  (a) naive loop  - diffusers ZImagePipeline called once per prompt, each PNG saved
                    (what the official Z-Image repository's batch_inference.py does)
  (b) Ray Data    - ray.data map_batches with the diffusers pipeline, PNGs written as Parquet,
                    as Ray's own Stable Diffusion example does it (batch_size=1, concurrency=1,
                    default resources: one CPU, so Ray gives torch one thread)
  (b*)              the same recipe tuned: batches as large as zimage-batch's, every core
  (c) zimage-batch run, end to end with the ledger, to local disk
  (d) the same to an S3 server (moto, on 127.0.0.1)
  (e) the engine alone on in-memory rows (the ceiling on this machine)
  (f) zimage-batch run as a user runs it on a dataset job: the model given as a folder (its
      default size is 1024², so nothing is sized for small rows), no --batch-size, rows of mixed
      sizes (aspect-ratio buckets), the whole command's wall time (start-up included), against
      (a') the naive loop on the same rows and folder
and the ratios c/a, c/b, c/e, f/a'. Needs the test extras (moto[server]).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "一只可爱的小猫坐在窗台上", "a watercolor of mountains at dawn", "a red vintage car"]


def make_manifest(path: Path, rows: int) -> list[dict]:
    records = [{"id": f"bench-{i:06d}", "prompt": f"{PROMPTS[i % len(PROMPTS)]}, variation {i}", "seed": i} for i in range(rows)]
    pq.write_table(pa.Table.from_pylist(records), path)
    return records


MIXED_SIZES = [(64, 64), (96, 64), (64, 96), (128, 64)]  # (width, height): a dataset job's buckets


def make_mixed_manifest(path: Path, rows: int) -> list[dict]:
    """(f): the same prompts and seeds, each row of one of MIXED_SIZES, in turn."""
    records = [{"id": f"mixed-{i:06d}", "prompt": f"{PROMPTS[i % len(PROMPTS)]}, variation {i}", "seed": i,
                "width": MIXED_SIZES[i % len(MIXED_SIZES)][0], "height": MIXED_SIZES[i % len(MIXED_SIZES)][1]}
               for i in range(rows)]
    pq.write_table(pa.Table.from_pylist(records), path)
    return records


def timed_cli_run(manifest: Path, output: str, *options: str) -> tuple[float, float, str]:
    """`zimage-batch run` as a whole command: (img/s over its wall time, steady img/s from the
    commit markers, its last line)."""
    from zimage_batch.output.ledger import Ledger
    from zimage_batch.storage import open_storage

    cmd = [sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", str(manifest), "--output", output,
           *options, "--set", "report=false"]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"zimage-batch run failed: {result.stderr[-2000:]}")
    markers = list(Ledger(open_storage(output)).committed().values())
    rows = sum(m.rows for m in markers)
    steady = rows / (max(m.finished for m in markers) - min(m.started for m in markers))
    return rows / wall, steady, result.stdout.strip().splitlines()[-1]


def zimage_batch_folder_run(manifest: Path, output: str, model_dir: Path, args) -> tuple[float, float, str]:
    """(f) the CLI as a user runs it: a model folder, no --batch-size."""
    return timed_cli_run(manifest, output, "--model", str(model_dir), "--shard-size", str(args.shard_size),
                         "--set", f"num_inference_steps={args.steps}")


def _steps_and_size(args) -> dict:
    return {"num_inference_steps": args.steps, "height": args.size, "width": args.size}


def naive_loop(model_path: str, records: list[dict], out: Path, args) -> float:
    """(a) one pipeline call per prompt, then save the PNG; (a') the same, each row at its own
    size where the record gives one."""
    import torch
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(model_path)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    for r in records:
        size = {"width": r.get("width", args.size), "height": r.get("height", args.size)}
        image = pipe(prompt=r["prompt"], guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(r["seed"]),
                     num_inference_steps=args.steps, **size).images[0]
        image.save(out / f"{r['id']}.png")
    return len(records) / (time.perf_counter() - started)


class _RayDataPredictor:
    """(b) the Ray Data recipe: a callable class holding the diffusers pipeline."""

    def __init__(self, model_path: str, settings: dict) -> None:
        import torch
        from diffusers import ZImagePipeline

        threads = settings.pop("threads")
        if threads:
            torch.set_num_threads(threads)
        self.pipe = ZImagePipeline.from_pretrained(model_path)
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        import torch

        images = self.pipe(
            prompt=list(batch["prompt"]), guidance_scale=0.0,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in batch["seed"]], **self.settings,
        ).images
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        return {"id": batch["id"], "image": encoded}


@contextlib.contextmanager
def local_ray():
    """One fresh local Ray cluster for the Ray Data figures (its start-up is not measured)."""
    import logging

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", address="local",
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


def ray_data(model_path: str, records: list[dict], out: Path, args, tuned: bool) -> float:
    """(b) Ray's documented recipe, or (b*) with zimage-batch's batch size on every core (inside local_ray())."""
    import ray

    if tuned:
        threads = max(1, (os.cpu_count() or 2) // args.workers)
        batch_size, concurrency, resources = args.baseline_batch_size or args.batch_size, args.workers, {"num_cpus": 0.5}
    else:  # doc/source/data/examples/stablediffusion_batch_prediction in Ray's repository
        threads, batch_size, concurrency, resources = None, 1, 1, {}
    settings = _steps_and_size(args) | {"threads": threads}
    started = None
    for warm in (True, False):  # the first pass loads the model and warms it up
        ds = ray.data.from_items(records[: batch_size * concurrency] if warm else records)
        started = started if warm else time.perf_counter()
        ds.map_batches(
            _RayDataPredictor, fn_constructor_args=(model_path, dict(settings)), batch_size=batch_size,
            concurrency=concurrency, **resources,
        ).write_parquet(str(out / ("warm" if warm else "run")))
    return len(records) / (time.perf_counter() - started)


def zimage_batch_run(manifest: Path, output: str, args) -> tuple[float, float]:
    """(c)/(d): the CLI end to end with the tiny model: (steady img/s, img/s over the whole command)."""
    whole, steady, _ = timed_cli_run(
        manifest, output, "--model", "tiny:turbo", "--workers", str(args.workers), "--batch-size", str(args.batch_size),
        "--shard-size", str(args.shard_size), "--set", f"num_inference_steps={args.steps}",
        "--set", f"width={args.size}", "--set", f"height={args.size}")
    return steady, whole


def make_engine(model_path: str):
    from zimage_batch.generate.engine import Engine

    return Engine(model_path, "turbo", device="cpu")


def engine_alone(engine, records: list[dict], args) -> float:
    """(e) the engine on in-memory rows, no I/O at all."""
    from zimage_batch.generate.requests import GenerationRequest

    requests = [GenerationRequest(r["prompt"], r["seed"], args.size, args.size, args.steps, 0.0) for r in records]
    engine.generate(requests[: args.batch_size], batch_size=args.batch_size)  # warm-up
    started = time.perf_counter()
    engine.generate(requests, batch_size=args.batch_size)
    return len(records) / (time.perf_counter() - started)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_server_env() -> tuple[object, dict]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    return server, env


def folder_case(tmp_path: Path, args) -> dict[str, float]:
    """(f) and (a'): a model folder, mixed sizes, no --batch-size, the whole command."""
    from zimage_batch.model.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model-folder", "turbo")
    manifest = tmp_path / "mixed.parquet"
    records = make_mixed_manifest(manifest, args.rows)
    sizes = ", ".join(f"{w}x{h}" for w, h in MIXED_SIZES)
    print(f"(f) and (a'): the model as a folder (default size 1024x1024), rows of {sizes}, no --batch-size", flush=True)
    naive = naive_loop(str(model_dir), records, tmp_path / "naive-mixed", args)
    print(f"(a') naive diffusers loop, same rows      {naive:7.1f} img/s", flush=True)
    whole, steady, last_line = zimage_batch_folder_run(manifest, str(tmp_path / "out-folder"), model_dir, args)
    print(f"(f) zimage-batch run, whole command        {whole:7.1f} img/s  ({steady:.1f} img/s steady; "
          f"its last line: {last_line})", flush=True)
    return {"f": whole, "a'": naive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--baseline-batch-size", type=int, default=None,
                        help="batch size of the tuned Ray Data recipe (b*); default: the same as --batch-size")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (c) and (e), in turns; medians are compared")
    parser.add_argument("--only", default="abcdef", help="which figures to measure, e.g. 'ce'")
    args = parser.parse_args()

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from zimage_batch.model.sources import resolve_model

    model_path = resolve_model("tiny:turbo").path
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="zimage-bench-") as tmp:
        tmp_path = Path(tmp)
        manifest = tmp_path / "manifest.parquet"
        records = make_manifest(manifest, args.rows)
        print(f"{args.rows} rows, tiny:turbo, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
              f"{args.workers} worker(s), {os.cpu_count()} cores", flush=True)
        if "a" in args.only:
            figures["a"] = naive_loop(model_path, records, tmp_path / "naive", args)
            print(f"(a) naive diffusers loop + PNG save     {figures['a']:7.1f} img/s", flush=True)
        if "b" in args.only:
            with local_ray():
                figures["b"] = ray_data(model_path, records, tmp_path / "raydata", args, tuned=False)
                print(f"(b) Ray Data map_batches + diffusers    {figures['b']:7.1f} img/s  (Ray's example: batch 1, "
                      "1 CPU)", flush=True)
                figures["b*"] = ray_data(model_path, records, tmp_path / "raydata-tuned", args, tuned=True)
                print(f"(b*) the same, tuned                    {figures['b*']:7.1f} img/s  (batch "
                      f"{args.baseline_batch_size or args.batch_size}, every core)", flush=True)
        # c and e decide the c/e ratio and this machine's speed drifts by +-20% from minute to
        # minute: they are measured in pairs, one right after the other, --repeats times; c/e
        # is the median of the pairs' ratios.
        if "e" in args.only:
            engine = make_engine(model_path)
        runs: dict[str, list[float]] = {"c": [], "e": []}
        for repeat in range(args.repeats):
            if "e" in args.only:
                runs["e"].append(engine_alone(engine, records, args))
            if "c" in args.only:
                steady, wall = zimage_batch_run(manifest, str(tmp_path / f"out-{repeat}"), args)
                runs["c"].append(steady)
        for name, values in runs.items():
            if values:
                figures[name] = statistics.median(values)
                seen = f"median of {', '.join(f'{v:.1f}' for v in values)}"
                if name == "c":
                    print(f"(c) zimage-batch run, local disk        {figures['c']:7.1f} img/s  ({seen}; "
                          f"{wall:.1f} img/s counting start-up)", flush=True)
                else:
                    print(f"(e) engine alone, in memory (ceiling)   {figures['e']:7.1f} img/s  ({seen})", flush=True)
        if "d" in args.only:
            server, env = s3_server_env()
            saved = dict(os.environ)
            os.environ.update(env)  # the run and this process both reach the server
            try:
                import boto3

                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                             aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
                figures["d"], wall = zimage_batch_run(manifest, "s3://bench/out", args)
                print(f"(d) zimage-batch run, S3 (moto)         {figures['d']:7.1f} img/s  "
                      f"({wall:.1f} img/s counting start-up)", flush=True)
            finally:
                os.environ.clear()
                os.environ.update(saved)
                server.stop()
        if "f" in args.only:
            figures |= folder_case(tmp_path, args)
    paired = [c / e for c, e in zip(runs["c"], runs["e"])] if "c" in figures and "e" in figures else []
    for num, den, target in (("c", "a", 2.5), ("c", "b", 2.5), ("c", "e", 0.8), ("c", "b*", None), ("d", "e", None),
                             ("f", "a'", 2.5)):
        if num in figures and den in figures:
            ratio = statistics.median(paired) if (num, den) == ("c", "e") else figures[num] / figures[den]
            verdict = "" if target is None else (f"  target >= {target}: " + ("met" if ratio >= target else "NOT met"))
            pairs = f"  (median of the pairs {', '.join(f'{r:.2f}' for r in paired)})" if (num, den) == ("c", "e") else ""
            print(f"{num}/{den} = {ratio:.2f}{verdict}{pairs}")


if __name__ == "__main__":
    main()
