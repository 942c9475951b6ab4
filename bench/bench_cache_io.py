"""Cache I/O: write and read time of one split and its size on disk, for float32/float16
and no compression, lzf, gzip level 1. Real features (cats vs dogs, block5_pool at 150 px)
from the cache `make extract DATA=../shared/data/cats_and_dogs_small` makes.

Reads are timed warm (page cache) and, when this process may drop the page cache (root
on Linux), cold. Usage: python bench/bench_cache_io.py [--cache FILE] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from _common import DATA, HED_WEIGHTS, Timer, median, require_data


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig
    from pipeline.features.layout import locate

    if args.cache is None:
        require_data()
        weights = str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random"
        try:
            args.cache = locate(ExtractConfig(data=str(DATA), weights=weights))
        except Exception as e:  # no cache yet: say how to make it
            print(f"SKIP: {e}")
            return
    x, y, paths = store.load_split(args.cache, args.split)
    meta = store.read_meta(args.cache)
    print(
        f"{args.cache}: split {args.split}, features {x.shape} {x.dtype}, weights {meta.weights}; "
        f"{100 * (x == 0).mean():.0f}% zeros; medians of {args.repeats}"
    )
    splits = {args.split: {"features": x, "labels": y, "paths": paths}}
    tmp = Path(tempfile.mkdtemp(prefix="featcache-io-"))
    cold_ok = drop_page_cache()
    print(
        f"{'dtype':8} {'filter':6} {'sum':4} {'MB':>7} {'write s':>8} {'read warm s':>12} {'read cold s':>12} "
        f"{'GB/s warm':>10}"
    )
    variants = [(d, c, True) for d in ("float32", "float16") for c in ("none", "lzf", "gzip")]
    variants.insert(1, ("float32", "none", False))  # the Fletcher-32 checksum's cost, side by side
    try:
        for dtype, compression, checksum in variants:
            xs = x.astype(dtype)
            splits[args.split]["features"] = xs
            if True:
                path = tmp / f"{dtype}-{compression}-{checksum}.h5"
                writes, warm, cold = [], [], []
                for _ in range(args.repeats):
                    with Timer() as t:
                        store.write_cache(
                            path,
                            splits,
                            dataclasses.replace(meta, dtype=dtype),
                            compression=compression,
                            checksum=checksum,
                        )
                        fd = os.open(path, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                    writes.append(t.seconds)
                    if cold_ok:
                        drop_page_cache()
                        with Timer() as t:
                            store.load_split(path, args.split)
                        cold.append(t.seconds)
                    with Timer() as t:
                        store.load_split(path, args.split)
                    warm.append(t.seconds)
                mb = path.stat().st_size / 1e6
                cold_s = f"{median(cold):12.3f}" if cold else f"{'n/a':>12}"
                print(
                    f"{dtype:8} {compression:6} {'yes' if checksum else 'no':4} {mb:7.1f} "
                    f"{median(writes):8.3f} {median(warm):12.3f} {cold_s} "
                    f"{xs.nbytes / median(warm) / 1e9:10.2f}"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
