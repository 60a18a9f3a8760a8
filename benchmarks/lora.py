"""What switching LoRA adapters between batches costs (issue 17): one job whose rows mix three
adapter sets against the same rows all on one set, side by side in one run.

    python benchmarks/lora.py                       # 36 rows, tiny model, 64x64, 4 steps
    python benchmarks/lora.py --rows 6 --repeats 1  # a smoke run

Both jobs declare the same three adapters (a worker loads every declared adapter once); they
differ only in the rows' `lora` column: `style` / `detail:0.8` / `ink:1.2` in turn, or `style`
everywhere. The three adapters have the same shape (rank 4, attention layers), so a row costs the
same compute in either job. Each job runs through the worker's own path (ShardRunner: batches cut by
batch key, sets switched with set_adapters between batches, images encoded and stored, shards
committed), in-process, model loading not counted; the two alternate `--repeats` times and the
figure is the median images/s. Rows cycle through the sets, so both jobs cut the same number of
full batches and the ratio mixed/one set measures the switches themselves (goal >= 0.9). A third
job without adapters shows what unfused adapters cost per image on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_batch.jobspec import load_job  # noqa: E402
from zimage_batch.model.tiny import make_tiny_model  # noqa: E402
from zimage_batch.model.tiny_adapters import make_tiny_adapter  # noqa: E402
from zimage_batch.output.ledger import Ledger  # noqa: E402
from zimage_batch.run.plan import make_plan  # noqa: E402
from zimage_batch.run.preflight import job_record, prepare  # noqa: E402
from zimage_batch.run.worker import ShardRunner  # noqa: E402
from zimage_batch.storage import open_storage  # noqa: E402

ADAPTERS = ("style", "detail", "ink")
MIXED = ("style", "detail:0.8", "ink:1.2")


def write_manifest(path: Path, rows: int, specs: tuple[str | None, ...]) -> None:
    pq.write_table(pa.table({
        "id": [f"bench-{i:05d}" for i in range(rows)],
        "prompt": [f"a watercolor fox, study {i}" for i in range(rows)],
        "seed": list(range(rows)),
        "lora": pa.array([specs[i % len(specs)] for i in range(rows)], pa.string()),
    }), path)


class Job:
    """One job's worker, kept loaded; `run()` generates every row again into a cleared OUTPUT."""

    def __init__(self, root: Path, name: str, model: Path, specs: tuple[str | None, ...], args) -> None:
        write_manifest(root / f"{name}.parquet", args.rows, specs)
        settings = [f"width={args.size}", f"height={args.size}", f"num_inference_steps={args.steps}", "report=false"]
        settings += [f"loras.{a}={model / f'{a}.safetensors'}" for a in ADAPTERS]
        self.job = load_job(None, {"manifest": str(root / f"{name}.parquet"), "output": str(root / f"out-{name}"),
                                   "model": str(model), "batch_size": args.batch_size, "shard_size": args.shard_size},
                            settings)
        prepared = prepare(self.job)
        self.manifest, self.model, self.resolved = prepared.manifest, prepared.model, prepared.job
        self.runner = ShardRunner(self.resolved.worker_settings(self.resolved.variant), threads=args.threads)
        self.switch_s = 0.0  # time spent in set_adapters / disable_lora calls that changed the set
        adapters = self.runner.engine.adapters
        use = adapters.use

        def timed_use(lora):
            changing, started = lora != adapters.active, time.perf_counter()
            use(lora)
            self.switch_s += (time.perf_counter() - started) if changing else 0.0

        adapters.use = timed_use

    def run(self) -> tuple[float, int, float]:
        """(images per second, adapter switches, seconds) of one full run of the job's rows."""
        ledger = Ledger(open_storage(self.job.output))
        ledger.clear()
        ledger.claim_output(job_record(self.resolved, self.model), overwrite=False)
        shards = make_plan(self.manifest, {}, self.job.shard_size, self.resolved.variant).todo
        switches = self.runner.engine.adapters.switches
        started = time.perf_counter()
        for shard in shards:
            self.runner.run_shard(shard)
        elapsed = time.perf_counter() - started
        return self.job_rows / elapsed, self.runner.engine.adapters.switches - switches, elapsed

    @property
    def job_rows(self) -> int:
        return self.manifest.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=36)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny", "turbo")
        for name in ADAPTERS:
            make_tiny_adapter(model, model / f"{name}.safetensors", name, rank=4, feed_forward=False)
        jobs = {"mixed (3 sets)": Job(root, "mixed", model, MIXED, args),
                "one set": Job(root, "single", model, ("style",), args),
                "adapters off": Job(root, "none", model, ("none",), args)}
        figures: dict[str, list[tuple[float, int, float]]] = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                figures[name].append(job.run())
    print(f"{args.rows} rows, batch {args.batch_size}, shards of {args.shard_size}, {args.size}x{args.size}, "
          f"{args.steps} steps, {args.repeats} repeats (median)")
    rate = {name: statistics.median(r for r, _, _ in runs) for name, runs in figures.items()}
    for name, runs in figures.items():
        switches, seconds = sum(s for _, s, _ in runs), sum(t for _, _, t in runs)
        share = jobs[name].switch_s / seconds
        print(f"  {name:15s} {rate[name]:7.2f} img/s   {switches / len(runs):4.1f} switches a run, "
              f"{jobs[name].switch_s / max(1, switches) * 1000:5.2f} ms each, {share:.1%} of the run")
    print(f"mixed / one set = {rate['mixed (3 sets)'] / rate['one set']:.2f}   (goal >= 0.9)")
    print(f"one set / adapters off = {rate['one set'] / rate['adapters off']:.2f}   (unfused adapter layers)")


if __name__ == "__main__":
    main()
