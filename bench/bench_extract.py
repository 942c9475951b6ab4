"""Extraction throughput on the real cats-vs-dogs JPEGs, three ways side by side:

  (a) featcache's extract, end to end (decode, resize, forward, chunk files, HDF5 assembly)
  (b) the seeds' loop: ImageDataGenerator.flow_from_directory + model.predict per batch of 20
  (c) the compute ceiling: the same model's forward pass on in-memory tensors, same batch size

Each repeat runs (c), (a), (b) back to back; medians are printed. Usage:
    python bench/bench_extract.py [--sizes 150 180] [--per-class 100] [--repeats 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

from _common import HED_WEIGHTS, Timer, machine, median, require_data, subset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[150, 180])
    p.add_argument("--per-class", type=int, default=250, help="images per class (train split)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--weights", default=str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16", "float16", "int8"],
        help="compute precisions, each measured against its own in-memory forward pass "
        "(int8: the OpenVINO model extract calibrated and kept, loaded once before the repeats)",
    )
    args = p.parse_args()
    require_data()

    import keras
    import numpy as np
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig
    from pipeline.features import backbone, quantize, registry, weights
    from pipeline.features.extract import extract

    print(machine())
    print(
        f"weights: {args.weights}; batch {args.batch}; decode threads {args.decode_threads}; "
        f"{2 * args.per_class} train images per run; {args.repeats} repeats; medians"
    )
    folder = subset(args.per_class)
    n = 2 * args.per_class
    cache_dir = Path(tempfile.mkdtemp(prefix="featcache-bench-cache-"))
    try:
        for size, prec in [(size, prec) for size in args.sizes for prec in args.precisions]:
            gflop = registry.flops_per_image(size, "block5_pool") / 1e9
            cfg = ExtractConfig(
                data=str(folder),
                size=size,
                weights=args.weights,
                batch_size=args.batch,
                decode_threads=args.decode_threads,
                cache_dir=cache_dir,
                force=True,
                quiet=True,
                precision=prec,
            )
            if prec == "int8":  # calibrate once (reused by every forced rerun), then time the kept model
                with Timer() as t:
                    first = extract(cfg)
                record = store.read_meta(first.path).info["int8"]
                print(f"\nint8 {size} px: first extract incl. calibration on {record['calibration']['count']} train")
                print(f"  images {t.seconds:.1f} s ({first.images} images); model {record['folder']}")
                model = quantize.load(first.path.parent / record["folder"])
            else:
                model = backbone.build(
                    size=size, layer="block5_pool", weights=weights.resolve(args.weights), precision=prec
                )
            x = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
            model.predict_on_batch(x)  # trace once, outside the timings
            rates: dict[str, list[float]] = {"a": [], "a_wall": [], "b": [], "c": []}
            for _ in range(args.repeats):
                with Timer() as t:
                    for _ in range(math.ceil(n / args.batch)):
                        model.predict_on_batch(x)
                rates["c"].append(math.ceil(n / args.batch) * args.batch / t.seconds)
                with Timer() as t:
                    result = extract(cfg)
                rates["a"].append(result.steady_rate)
                rates["a_wall"].append(result.images / t.seconds)
                if prec != "float32":  # the seeds' loop is a float32 reference only
                    rates["b"].append(float("nan"))
                    continue
                gen = ImageDataGenerator(rescale=1 / 255).flow_from_directory(
                    str(folder / "train"), target_size=(size, size), batch_size=20, class_mode="binary"
                )
                with Timer() as t:
                    seen = 0
                    for xb, _ in gen:
                        model.predict(xb, verbose=0)
                        seen += len(xb)
                        if seen >= n:
                            break
                rates["b"].append(seen / t.seconds)
            a, a_wall, b, c = (median(rates[k]) for k in ("a", "a_wall", "b", "c"))
            print(f"\n{size}x{size}, {prec}: {gflop:.1f} GFLOP/image")
            print(f"  (c) ceiling, in-memory forward  {c:6.1f} img/s  {c * gflop:5.0f} GFLOP/s")
            print(
                f"  (a) featcache extract, steady   {a:6.1f} img/s  {a * gflop:5.0f} GFLOP/s  "
                f"{100 * a / c:5.1f}% of (c)  {a / b:4.2f}x (b)"
            )
            print(
                f"      same, wall incl. model build, warm-up and HDF5 assembly {a_wall:6.1f} img/s "
                f"({100 * a_wall / c:.1f}% of (c), {a_wall / b:.2f}x (b))"
            )
            print(
                f"  (b) seeds' generator + predict  {b:6.1f} img/s  {b * gflop:5.0f} GFLOP/s  "
                f"{100 * b / c:5.1f}% of (c)"
            )
            print(
                f"  runs (img/s): a={[round(r, 1) for r in rates['a']]} b={[round(r, 1) for r in rates['b']]} "
                f"c={[round(r, 1) for r in rates['c']]}"
            )
            del model
            keras.backend.clear_session()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
