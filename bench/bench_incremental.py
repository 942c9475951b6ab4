"""Incremental extraction, per-image cost against folder size, and Ray's overhead.

Synthetic 32 px PNG images (two classes of coloured noise, ROOT/train/<class>/), random
VGG16 weights, block5_pool: the backbone's work is real, the pixels are not. Each timed
run is a fresh process-internal call of ``extract`` (TensorFlow already imported, model
built per call, which is the fixed start-up reported separately).

  incremental: N images extracted; then 1% changed (half rewritten, half new); the rerun's
               time against a fresh extraction of just those images; then a no-change rerun.
  scale:       seconds per image for folders of --scale sizes.
  ray:         --engine ray at 2 and 4 shards against the single process, same images.

Usage: python bench/bench_incremental.py [--n 20000] [--scale 1000 5000 20000] [--ray-n 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine
from PIL import Image


def make_images(root: Path, n: int, start: int = 0, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        cls = ("cats", "dogs")[i % 2]
        path = root / "train" / cls / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


def run(data: Path, cache: Path, **kw):
    from pipeline.core.config import ExtractConfig
    from pipeline.features.extract import extract

    cfg = ExtractConfig(data=str(data), cache_dir=cache, size=32, weights="random", quiet=True, batch_size=64, **kw)
    t0 = time.perf_counter()
    result = extract(cfg)
    return time.perf_counter() - t0, result


def incremental(n: int, work: Path) -> None:
    root = work / "inc"
    make_images(root, n)
    t_full, r = run(root, work / "c")
    print(f"full extraction of {n:,}: {t_full:.1f} s ({n / t_full:.0f} img/s; warm-up {r.warmup_seconds:.1f} s)")
    k = max(2, n // 100)
    time.sleep(0.01)
    make_images(root, k // 2, start=0, seed=1)  # rewrite k/2 existing files: other pixels, new mtime
    make_images(root, k - k // 2, start=n, seed=2)  # and k/2 new ones
    t_inc, r = run(root, work / "c")
    print(f"rerun after changing 1% ({k:,} images): {t_inc:.1f} s; {r.update}")
    print(f"  of which forward+decode {r.seconds:.1f} s, warm-up {r.warmup_seconds:.1f} s")
    alone = work / "alone"
    for f in sorted((root / "train").rglob("*.png")):
        idx = int(f.stem)
        if idx < k // 2 or idx >= n:
            (alone / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(f, alone / "train" / f.parent.name / f.name)
    t_alone, r2 = run(alone, work / "c-alone")
    print(f"fresh extraction of those {k:,} alone: {t_alone:.1f} s (warm-up {r2.warmup_seconds:.1f} s)")
    print(f"  ratio rerun / alone: {t_inc / t_alone:.2f}x")
    t_hit, r3 = run(root, work / "c")
    print(f"no-change rerun: {t_hit:.2f} s (hit={r3.hit})")


def scale(sizes: list[int], work: Path) -> None:
    biggest = max(sizes)
    root = work / "scale"
    files = make_images(root, biggest, seed=3)
    for n in sizes:
        sub = work / f"sub{n}"
        for f in files[:n]:
            (sub / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(f, sub / "train" / f.parent.name / f.name)
        t, r = run(sub, work / f"c{n}")
        steady = (r.seconds - r.warmup_seconds) / max(1, r.images - r.warmup_images)
        print(
            f"{n:>7,} images: {t:7.1f} s total, {1000 * t / n:.2f} ms/image overall, "
            f"{1000 * steady:.2f} ms/image after warm-up"
        )


def ray_overhead(n: int, work: Path) -> None:
    import ray

    from pipeline.core.config import ExtractConfig
    from pipeline.features.ray_engine import extract_ray

    root = work / "ray"
    make_images(root, n, seed=4)
    t_single, _ = run(root, work / "r-single")
    print(f"single process, {n:,} images: {t_single:.1f} s")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        tiny = work / "ray-tiny"
        make_images(tiny, 20, seed=5)
        t0 = time.perf_counter()
        extract_ray(
            ExtractConfig(data=str(tiny), cache_dir=work / "r-tiny", size=32, weights="random", quiet=True),
            shards=os.cpu_count(),
        )
        print(
            f"ray start-up (first call: worker processes start and import TensorFlow), 20 images: "
            f"{time.perf_counter() - t0:.1f} s"
        )
        for shards in (2, 4):
            cfg = ExtractConfig(
                data=str(root), cache_dir=work / f"r{shards}", size=32, weights="random", quiet=True, batch_size=64
            )
            t0 = time.perf_counter()
            extract_ray(cfg, shards=shards)
            t = time.perf_counter() - t0
            print(
                f"ray, {shards} shards on {os.cpu_count()} CPUs: {t:.1f} s, overhead {100 * (t / t_single - 1):+.0f}%"
            )
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--scale", type=int, nargs="*", default=[1000, 5000, 20000])
    p.add_argument("--ray-n", type=int, default=2000)
    p.add_argument("--only", choices=["incremental", "scale", "ray"], default=None)
    args = p.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-incr-"))
    try:
        if args.only in (None, "incremental"):
            incremental(args.n, work)
        if args.only in (None, "scale"):
            scale(args.scale, work)
        if args.only in (None, "ray"):
            ray_overhead(args.ray_n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
