"""Extraction on a GPU: images/s with and without mixed precision, by batch size, and
where the time goes (decoding alone, forward pass alone, extract end to end).

Backend-agnostic Keras, so it runs where TensorFlow is absent: KERAS_BACKEND=jax or torch.
Random weights (throughput does not depend on their values). Usage:
    KERAS_BACKEND=jax python bench/bench_gpu.py [--sizes 150 180] [--batches 32 128 256]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from pathlib import Path

from _common import Timer, machine, median, require_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[150, 180])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256])
    p.add_argument("--extract-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ceiling-images", type=int, default=4096)
    args = p.parse_args()
    data = require_data()

    import keras
    import numpy as np

    from pipeline.core.config import ExtractConfig
    from pipeline.features import backbone, images, registry, sources, weights
    from pipeline.features.extract import extract

    print(machine())
    try:
        import jax

        print("devices:", jax.devices())
    except ImportError:
        pass
    threads = os.cpu_count() or 2
    cache_dir = Path(tempfile.mkdtemp(prefix="featcache-gpu-"))
    try:
        for size in args.sizes:
            gflop = registry.flops_per_image(size, "block5_pool") / 1e9
            print(f"\n== {size}x{size}: {gflop:.1f} GFLOP/image")
            # decoding alone, all splits of the real JPEGs
            src = sources.resolve(ExtractConfig(data=str(data), size=size))
            files = [str(data / q) for s in src.splits.values() for q in s.paths]
            for label, kw in (
                (f"{threads} threads", {"threads": threads}),
                (f"{ExtractConfig().decode_processes} processes", {"processes": ExtractConfig().decode_processes}),
            ):
                with images.Decoder(**kw) as decoder:
                    for _ in decoder.batches(files, range(256), size, 128):  # start the pool
                        pass
                    with Timer() as t:
                        for _ in range(2):
                            for _ in decoder.batches(files, range(len(files)), size, 128):
                                pass
                print(
                    f"decode+resize alone ({label}): {2 * len(files) / t.seconds:8.0f} img/s "
                    f"(2 passes over {len(files)} JPEGs, pool started)"
                )
            # forward pass alone, in-memory uint8 batches
            for mixed in (False, True):
                model = backbone.build(
                    size=size,
                    layer="block5_pool",
                    weights=weights.resolve("random"),
                    precision="float16" if mixed else "float32",
                )
                for bs in args.batches:
                    x = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
                    backbone.forward(model, x, bs)  # compile
                    steps = max(1, math.ceil(args.ceiling_images / bs))
                    rates = []
                    for _ in range(args.repeats):
                        with Timer() as t:
                            for _ in range(steps):
                                backbone.forward(model, x, bs)
                        rates.append(steps * bs / t.seconds)
                    r = median(rates)
                    print(
                        f"forward alone, {'mixed_float16' if mixed else 'float32      '} batch {bs:4d}: "
                        f"{r:8.0f} img/s {r * gflop / 1e3:7.1f} TFLOP/s"
                    )
                del model
                keras.backend.clear_session()
            # extract end to end, all 4000 images
            for mixed in (False, True):
                cfg = ExtractConfig(
                    data=str(data),
                    size=size,
                    weights="random",
                    precision="float16" if mixed else "float32",
                    batch_size=args.extract_batch,
                    cache_dir=cache_dir,
                    force=True,
                    quiet=True,
                )
                steady, wall = [], []
                for _ in range(args.repeats):
                    with Timer() as t:
                        result = extract(cfg)
                    steady.append(result.steady_rate)
                    wall.append(result.images / t.seconds)
                print(
                    f"extract end to end, {'mixed_float16' if mixed else 'float32      '} batch {args.extract_batch}: "
                    f"steady {median(steady):7.0f} img/s, wall {median(wall):7.0f} img/s "
                    f"(incl. build, compile, HDF5 assembly); warm-up {result.warmup_seconds:.1f} s"
                )
                print(
                    "    last run's time:",
                    ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()),
                    f"of {result.seconds:.2f} s",
                )
            x32, _, _ = __import__("pipeline.cache.store", fromlist=["load_split"]).load_split(result.path, "test")
            cfg32 = ExtractConfig(
                data=str(data),
                size=size,
                weights="random",
                batch_size=args.extract_batch,
                cache_dir=cache_dir,
                force=True,
                quiet=True,
            )
            x_ref, _, _ = __import__("pipeline.cache.store", fromlist=["load_split"]).load_split(
                extract(cfg32).path, "test"
            )
            rel = np.abs(x32 - x_ref).max() / np.abs(x_ref).max()
            print(f"mixed vs float32 features: max abs difference / max abs value = {rel:.2e}")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
