"""Build a small product catalogue for jobs/catalogue-controlnet.yaml: product photos of the kinds
catalogues hold (JPEG, EXIF-rotated JPEG, CMYK JPEG, PNG with transparency, palette PNG, 16-bit
PNG), one background mask, and the edit manifest that re-shoots each product in a new setting.

    python jobs/catalogue_controlnet_inputs.py /tmp/catalogue
    zimage-batch run jobs/catalogue-controlnet.yaml --manifest /tmp/catalogue/manifest.parquet \\
        --output /tmp/catalogue/reshot --model tiny:turbo --set controlnet=tiny:2.1

Sources are written as paths relative to the manifest, as a catalogue copied to S3 keeps them
(aws s3 sync /tmp/catalogue s3://my-catalogue/reshoot/ works unchanged).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SETTINGS = [
    "on a marble kitchen counter, morning light",
    "on a wooden table in a sunlit cafe",
    "in a snowy mountain cabin, warm evening light",
    "on a beach towel by the sea, midday sun",
    "in a minimalist white studio, soft shadows",
    "on a desk in a modern office, window light",
]


def product(width: int, height: int, seed: int) -> np.ndarray:
    """A product shot: a lit object (rounded box and a disc) on a plain backdrop."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), float)
    image[:] = 235 - 30 * y[..., None] / height  # backdrop
    cx, cy, r = width * 0.5, height * 0.55, min(width, height) * 0.3
    body = (np.abs(x - cx) < r) & (np.abs(y - cy) < r * 0.8)
    cap = (x - cx) ** 2 + (y - cy + r) ** 2 < (r * 0.45) ** 2
    colour = rng.integers(40, 200, 3)
    image[body | cap] = colour * (0.7 + 0.3 * (x[body | cap, None] - cx + r) / (2 * r))
    return np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def photos(size: int) -> dict[str, bytes]:
    """File name -> bytes, one product of each kind."""
    w, h = size, size * 3 // 4
    rgba = np.dstack([product(w, h, 4), np.full((h, w), 255, np.uint8)])
    rgba[:, : w // 6, 3] = 0  # a transparent margin, composited on white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    deep = (product(w, h, 6)[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    return {
        "P-1001.jpg": encode(Image.fromarray(product(w, h, 1)), "JPEG", quality=92),
        "P-1002.jpg": encode(Image.fromarray(product(h, w, 2)), "JPEG", quality=92, exif=exif),
        "P-1003.jpg": encode(Image.fromarray(product(w, h, 3)).convert("CMYK"), "JPEG", quality=92),
        "P-1004.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "P-1005.png": encode(Image.fromarray(product(w, h, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "P-1006.png": encode(Image.fromarray(deep), "PNG"),
    }


def background_mask(size: int) -> bytes:
    """White (repainted) everywhere but the product of P-1001."""
    w, h = size, size * 3 // 4
    mask = np.full((h, w), 255, np.uint8)
    mask[int(h * 0.2) : int(h * 0.85), int(w * 0.25) : int(w * 0.75)] = 0
    return encode(Image.fromarray(mask, "L"), "PNG")


def build(out: Path, size: int = 96) -> Path:
    """Write photos/, masks/ and manifest.parquet under `out`; returns the manifest's path."""
    (out / "photos").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    files = photos(size)
    for name, data in files.items():
        (out / "photos" / name).write_bytes(data)
    (out / "masks" / "P-1001-background.png").write_bytes(background_mask(size))
    ids = [name.rsplit(".", 1)[0] for name in files]
    table = pa.table({
        "id": ids,  # the catalogue's product id: outputs are keyed by it
        "source": [f"photos/{name}" for name in files],
        "prompt": [f"product photo {setting}" for setting in SETTINGS[: len(ids)]],
        "mask": ["masks/P-1001-background.png"] + [None] * (len(ids) - 1),  # only the backdrop is re-shot
        "sku_group": ["bottles", "bottles", "jars", "jars", "cans", "cans"][: len(ids)],  # passed through
    })
    manifest = out / "manifest.parquet"
    pq.write_table(table, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the catalogue into")
    parser.add_argument("--size", type=int, default=96, help="photo width in pixels")
    args = parser.parse_args()
    print(f"manifest: {build(args.out, args.size)}")


if __name__ == "__main__":
    main()
