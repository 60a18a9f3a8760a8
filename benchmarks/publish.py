"""What staging and publishing cost: a shard's files written straight to their final names (as
before staging) against written to the attempt's staging folder, committed and published.

    python benchmarks/publish.py                     # 200 images a shard, local and S3 (moto)
    python benchmarks/publish.py --images 50 --repeats 1

For each store (a local folder; an S3 server, moto on 127.0.0.1) and each format, the two ways
alternate `--repeats` times on the same encoded images; the figure is the median wall time of
storing one shard, and the ratio staged/direct (1.00 = free). On S3 it also counts the requests
of one staged+published shard per image, by operation (PutObject, CopyObject, DeleteObjects, ...).
Needs the test extras (moto[server]).
"""

from __future__ import annotations

import argparse
import collections
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_prefetch import BUCKET, start_s3  # noqa: E402

from zimage_batch.output.ledger import CommitMarker, Ledger  # noqa: E402
from zimage_batch.output.writers import make_writer  # noqa: E402
from zimage_batch.storage import Storage, open_storage, s3_client  # noqa: E402


def sample_images(n: int, side: int = 256) -> list[bytes]:
    """PNGs of a generated image's size and entropy (noise compresses as badly as real pixels)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def store_shard(storage: Storage, shard: str, fmt: str, images: list[bytes], staged: bool) -> float:
    """Seconds to make one shard's images durable under their final names."""
    started = time.perf_counter()
    marker = CommitMarker(shard=shard, file="m.parquet", start=0, end=len(images), rows=len(images), ok=len(images),
                          error=0, digest="", fingerprint="", format=fmt)
    target = storage.child(marker.staging.prefix) if staged else storage
    writer = make_writer(fmt, target, shard)
    for i, data in enumerate(images):
        writer.add(f"k{i:05d}", data, {"id": str(i)})
    writer.close()
    target.put_bytes(f"metadata/{shard}.parquet", b"metadata")
    if staged:
        ledger = Ledger(storage)
        assert ledger.commit(marker)
        ledger.publish(marker)
    return time.perf_counter() - started


def count_requests(storage: Storage, fmt: str, images: list[bytes]) -> str:
    """The S3 requests of one staged+published shard, per image, by operation."""
    counts: collections.Counter[str] = collections.Counter()

    def count(model: object, **_: object) -> None:
        counts[model.name] += 1

    events = s3_client().meta.events
    events.register("before-call.s3.*", count)
    try:
        store_shard(storage, f"counted-{fmt}", fmt, images, staged=True)
    finally:
        events.unregister("before-call.s3.*", count)
    per_image = ", ".join(f"{name} {n / len(images):.2f}" for name, n in counts.most_common())
    return f"requests per image: {sum(counts.values()) / len(images):.2f} ({per_image})"


def compare(storage: Storage, fmt: str, images: list[bytes], repeats: int) -> tuple[float, float]:
    direct, staged = [], []
    for r in range(repeats):
        direct.append(store_shard(storage, f"direct-{fmt}-{r}", fmt, images, staged=False))
        staged.append(store_shard(storage, f"staged-{fmt}-{r}", fmt, images, staged=True))
    return statistics.median(direct), statistics.median(staged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images in a shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default="files,webdataset,parquet", help="comma-separated output formats")
    args = parser.parse_args()
    images = sample_images(args.images)
    server = start_s3()
    try:
        s3_client().create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            stores = {"local": open_storage(tmp), "s3 (moto)": open_storage(f"s3://{BUCKET}/publish")}
            print(f"one shard of {args.images} PNGs ({len(images[0]) // 1024} KiB each), median of {args.repeats}")
            for name, storage in stores.items():
                for fmt in args.formats.split(","):
                    direct, staged = compare(storage, fmt, images, args.repeats)
                    print(f"{name:10s} {fmt:10s} direct {direct:6.3f} s   staged+published {staged:6.3f} s   "
                          f"staged/direct {staged / direct:5.2f}", flush=True)
                    if name.startswith("s3"):
                        print(f"{'':21s}{count_requests(storage, fmt, images)}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
