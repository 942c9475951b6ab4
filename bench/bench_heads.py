"""Heads on cached cats-vs-dogs features: load time, fit seconds per config and the
default sweep's total, with accuracy. Needs the cache that
`make extract DATA=../shared/data/cats_and_dogs_small WEIGHTS=cache/weights/vgg16-hed-bsds500.weights.h5`
makes (the script says so when it is missing). Usage:
    python bench/bench_heads.py [--size 150] [--sweep configs/sweep.toml] [--jobs 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import DATA, HED_WEIGHTS, REPO, Timer, machine, require_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--sweep", type=Path, default=REPO / "pipeline" / "train" / "default_sweep.toml")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    require_data()
    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig, SweepConfig
    from pipeline.features.layout import locate
    from pipeline.train.sweep import run_sweep
    from pipeline.train.sweep_file import make_head

    weights = str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random"
    try:
        cache = locate(ExtractConfig(data=str(DATA), weights=weights, size=args.size))
    except Exception as e:
        print(f"SKIP: {e}")
        return
    print(machine())
    print(f"cache {cache} (weights {weights})")
    with Timer() as t:
        x, y, _ = store.load_split(cache, "train")
    print(f"load train split {x.shape} {x.dtype}: {t.seconds:.2f} s ({x.nbytes / t.seconds / 1e9:.2f} GB/s)")
    with Timer() as t:
        make_head("logreg", pooling="flatten", C=0.01).fit(x, y)
    print(f"logistic regression on {len(y)}x{x[0].size} flattened features, one fit: {t.seconds:.1f} s")
    runs = Path(tempfile.mkdtemp(prefix="featcache-bench-runs-"))
    try:
        with Timer() as t:
            result = run_sweep(SweepConfig(sweep_file=args.sweep, runs_dir=runs, n_jobs=args.jobs), cache)
        print(result.table)
        print(
            f"default sweep, {len(result.rows)} configs, {args.jobs} jobs: {t.seconds:.1f} s wall "
            f"(sum of fit seconds {sum(r['fit_seconds'] for r in result.rows):.1f} s)"
        )
    finally:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
