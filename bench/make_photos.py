"""Photo-size JPEGs from the shared 200 px copies: each image upscaled (bicubic) to a few
camera-like sizes around 500x375 and re-encoded at quality 90, the same split/class layout.

The shared copies are too small to show what decoding costs on real photos (issue 28);
this makes a stand-in where the bytes cannot travel (it runs on the GPU machine). Usage:
    python bench/make_photos.py SRC DST [--copies 3] [--workers 16]
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

SIZES = ((500, 375), (375, 500), (480, 360), (512, 384))  # (width, height): landscape and portrait


def _one(job: tuple[str, str, int]) -> int:
    src, dst, k = job
    with Image.open(src) as im:
        out = im.convert("RGB").resize(SIZES[k % len(SIZES)], Image.Resampling.BICUBIC)
    out.save(dst, format="JPEG", quality=90)
    return os.path.getsize(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--copies", type=int, default=3, help="sizes per source image (distinct files)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    jobs = []
    for i, f in enumerate(sorted(args.src.rglob("*.jpg"))):
        rel = f.relative_to(args.src)
        (args.dst / rel.parent).mkdir(parents=True, exist_ok=True)
        for k in range(args.copies):
            jobs.append((str(f), str(args.dst / rel.parent / f"{rel.stem}.v{k}.jpg"), i + k))
    with ProcessPoolExecutor(args.workers) as pool:
        sizes = list(pool.map(_one, jobs, chunksize=64))
    print(f"{len(sizes)} photo-size JPEGs in {args.dst}: mean {sum(sizes) / len(sizes) / 1e3:.1f} kB (quality 90)")


if __name__ == "__main__":
    main()
