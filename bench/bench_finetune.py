"""Cached augmentation and fine-tuning against the seeds' end-to-end recipe, same weights
(HED when made), data and size (150 px). For every row: test accuracy and backbone
compute (full-VGG16-forward equivalents, seconds):

  frozen head on clean features      extract once (4000 passes) + sweep
  + K cached views (K = 2, 5, 10)    + 2000 K passes, once; heads on clean + views
  block5 fine-tuned from block4      block4 cache (4000 x 0.91) + epochs x 2000 x block5 fwd+bwd
  seeds' end-to-end (seed 003)       50 epochs x (2000 train + 1000 validation) passes;
                                     one epoch timed, extrapolated, accuracy after it

Usage: python bench/bench_finetune.py [--views 2 5 10] [--epochs 10] [--weights FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from _common import DATA, HED_WEIGHTS, Timer, machine, require_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--seeds-epochs", type=int, default=1, help="0: count the recipe's passes, do not run it")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--weights", default=None, help="VGG16 weights file (default: the HED file when made, else none)")
    args = p.parse_args()
    require_data()
    from bench_recipe import report_seeds, seeds_recipe

    from pipeline.app.finetune import finetune
    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig, FinetuneConfig, SweepConfig
    from pipeline.features import registry
    from pipeline.features.extract import extract
    from pipeline.train.sweep import run_sweep

    weights = args.weights or (str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random")
    print(machine())
    print(f"weights {weights}; size {args.size}; data {DATA}")
    work = Path(tempfile.mkdtemp(prefix="featcache-ft-"))
    sweep = work / "sweep.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = ["flatten", "avg"]\nC = [0.001, 0.01]\n')
    full = registry.flops_per_image(args.size, "block5_pool")
    rows = []

    def report(name: str, passes: float, seconds: float, accuracy: float, note: str = "") -> None:
        rows.append((name, passes, seconds, accuracy, note))
        print(f"{name:42} {passes:9.0f} passes {seconds:8.0f} s  test {accuracy:.4f}  {note}", flush=True)

    try:
        base = ExtractConfig(data=str(DATA), size=args.size, weights=weights, precision=args.precision, quiet=True)
        k_max = max(args.views)
        with Timer() as t:
            r = extract(dataclasses.replace(base, augment=k_max))
        meta = store.read_meta(r.path)
        rate = meta.info.get("extract_images_per_second") or 1.0
        clean_seconds = 4000 / rate
        print(
            f"cache with {k_max} views: {r.path} ({'hit' if r.hit else f'{t.seconds:.0f} s'}); "
            f"{rate:.1f} img/s when made",
            flush=True,
        )
        res = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=work / "runs", train_on="clean"), r.path)
        report(
            "frozen head, clean features",
            4000,
            clean_seconds,
            res.winner["test_accuracy"],
            f"{res.winner['head']} {res.winner['pooling']} {res.winner['params']}",
        )
        for k in args.views:
            res = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=work / "runs", train_on="both", views=k), r.path)
            report(
                f"frozen head, clean + {k} cached views",
                4000 + 2000 * k,
                clean_seconds + 2000 * k / rate,
                res.winner["test_accuracy"],
                f"{res.winner['head']} {res.winner['pooling']} {res.winner['params']}",
            )
        with Timer() as t4:
            r4 = extract(dataclasses.replace(base, layer="block4_pool"))
        block4 = registry.flops_per_image(args.size, "block4_pool")
        with Timer() as tf:
            ft = finetune(FinetuneConfig(epochs=args.epochs, runs_dir=work / "runs"), base)
        epochs_run = len(__import__("json").loads((ft.run_dir / "run.json").read_text())["history"]["loss"])
        block5_share = (full - block4) / full
        passes = 4000 * block4 / full + 3 * block5_share * 2000 * (epochs_run + 1) + block5_share * 2000
        print(
            f"block4 cache {r4.path.name}: {'hit' if r4.hit else f'{t4.seconds:.0f} s'}; fine-tune {tf.seconds:.0f} s"
        )
        for row in ft.rows:
            print(
                f"   {row['stage']}: validation {row['validation_accuracy']:.4f} test {row['test_accuracy']:.4f} "
                f"({row['cost']})"
            )
        report(
            "block5 fine-tuned from cached block4",
            passes,
            4000 * block4 / full / rate + tf.seconds,
            ft.rows[-1]["test_accuracy"],
            f"{epochs_run} epochs; block5 = {100 * block5_share:.1f}% of the FLOPs",
        )
        if args.seeds_epochs:
            r = seeds_recipe(args.size, args.seeds_epochs, weights, args.precision)
            report(
                f"seeds' end-to-end, 50 epochs{'' if args.seeds_epochs >= 50 else ' (extrapolated)'}",
                50 * r["passes_per_epoch"],
                report_seeds(r, args.seeds_epochs, args.precision)[0],
                r["test_accuracy"],
                f"best val_loss checkpoint after {args.seeds_epochs} epoch(s)",
            )
        else:
            # the recipe's passes without running it: 50 x (train + validation images)
            report("seeds' end-to-end, 50 epochs (not run)", 50 * 3000, float("nan"), float("nan"))
        seeds_passes, seeds_seconds = rows[-1][1], rows[-1][2]
        print("\nshare of the seeds' end-to-end compute:")
        for name, passes, seconds, accuracy, _ in rows[:-1]:
            print(
                f"  {name:42} {100 * passes / seeds_passes:5.1f}% of the passes, {100 * seconds / seeds_seconds:5.1f}% "
                f"of the time, test {accuracy:.4f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
