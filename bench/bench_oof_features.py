"""Pooling and normalisation of the cached block5_pool maps, judged on out-of-fold accuracy only
(issue 26): does a better summary of the same features raise the level the heads reach?

Reads train + validation of each size's cache (never test: this is a lever search, and test is
read only for a declared pick, by ``bench_cv_select.py``), and scores the product's logistic
regression (``make_head("logreg")``, standardised) by stratified 5-fold cross-validation with
the folds of ``bench_cv_select.py`` (seed 0), at C in {0.001, 0.01, 0.1, 1}, on:
avg and max pooling (the sweep's), each L2-normalised, each after a signed square root (power
normalisation) and L2, GeM pooling (p = 3) with and without L2, and avg and max concatenated
(each L2-normalised, with or without the signed square root); then, with ``--mirrors``, the
best of those trained on clean + mirror rows; with ``--pairs``, two sizes' features
concatenated (one head on both, against the ensembles of probabilities of bench_cv_select.py).
The same transforms cost no backbone work: they read the cached maps.

Usage:
    python bench/bench_oof_features.py --cache-dir /work/data/cache-tta/cats_and_dogs_small-a18b8343 \\
        --sizes 320,288,256 [--mirrors 256,224] [--pairs 288+150,256+180]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine
from bench_cv_holdout import cache_of, trval_views
from bench_cv_select import FOLD_SEED, FOLDS
from bench_tta_levers import fit_config
from bench_tta_levers import l2_normalised as l2

C_GRID = (0.001, 0.01, 0.1, 1.0)


def ssqrt(z: np.ndarray) -> np.ndarray:
    return np.sign(z) * np.sqrt(np.abs(z))


def gem(x: np.ndarray, p: float = 3.0) -> np.ndarray:
    """Generalised mean pooling (Radenovic et al.): between avg (p = 1) and max (p -> inf)."""
    return np.mean(np.maximum(x, 1e-6) ** p, axis=(1, 2)) ** (1 / p)


def transforms(x: np.ndarray) -> dict[str, np.ndarray]:
    avg, mx, g = x.mean(axis=(1, 2)), x.max(axis=(1, 2)), gem(x)
    return {
        "avg": avg,
        "max": mx,
        "avg l2": l2(avg),
        "max l2": l2(mx),
        "avg ssqrt l2": l2(ssqrt(avg)),
        "max ssqrt l2": l2(ssqrt(mx)),
        "gem3": g,
        "gem3 l2": l2(g),
        "avg|max l2": np.concatenate([l2(avg), l2(mx)], axis=1),
        "avg|max ssqrt l2": np.concatenate([l2(ssqrt(avg)), l2(ssqrt(mx))], axis=1),
    }


def trval(cache_dir: Path, size: int, mirrors: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Train + validation maps (and their mirrors), in bench_cv_select.py's order; never test."""
    maps, y = trval_views(cache_of(cache_dir, size), 1 if mirrors else 0)
    return maps[0], maps[1] if mirrors else None, y


def oof_accuracy(z: np.ndarray, y: np.ndarray, c: float, mirror: np.ndarray | None = None) -> float:
    """Out-of-fold accuracy of the product's logreg (``fit_config``) over bench_cv_select.py's folds."""
    from sklearn.model_selection import StratifiedKFold

    rows = z[:, None, None, :]  # (N,1,1,C): the head's pooling is then the identity
    pred = np.zeros(len(y), dtype=np.int64)
    for train, held in StratifiedKFold(FOLDS, shuffle=True, random_state=FOLD_SEED).split(z, y):
        fold = {
            "train": (rows[train], y[train]),
            "train@mirror": None if mirror is None else mirror[train][:, None, None, :],
            "validation": [rows[held]],
            "test": [],
        }
        proba = fit_config("logreg", {"C": c}, "clean" if mirror is None else "tta", fold)["validation"][0]
        pred[held] = np.argmax(proba, axis=1)
    return float(np.mean(pred == y))


def line(label: str, accs: list[float]) -> None:
    print(f"| {label} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | {max(accs):.4f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="320,288,256")
    parser.add_argument("--mirrors", default="", help="sizes whose clean + mirror training is scored too")
    parser.add_argument("--pairs", default="", help="size pairs whose features are concatenated, e.g. 288+150")
    args = parser.parse_args()
    print(machine())
    print("| size: features | " + " | ".join(f"C {c:g}" for c in C_GRID) + " | best |")
    print("|---|" + "---|" * (len(C_GRID) + 1))
    t0 = time.perf_counter()
    for size in (int(s) for s in args.sizes.split(",") if s):
        x, _, y = trval(args.cache_dir, size, mirrors=False)
        for name, z in transforms(x).items():
            line(f"{size}: {name}", [oof_accuracy(z.astype(np.float32), y, c) for c in C_GRID])
    for size in (int(s) for s in args.mirrors.split(",") if s):
        x, m, y = trval(args.cache_dir, size, mirrors=True)
        assert m is not None
        tx, tm = transforms(x), transforms(m)
        for name in ("max", "gem3 l2", "avg|max l2"):
            accs = [oof_accuracy(tx[name].astype(np.float32), y, c, tm[name].astype(np.float32)) for c in C_GRID]
            line(f"{size}: {name}, trained on clean + mirror rows", accs)
    for pair in (p for p in args.pairs.split(",") if p):
        parts = [trval(args.cache_dir, int(s), mirrors=False) for s in pair.split("+")]
        y, feats = parts[0][2], [transforms(x) for x, _, _ in parts]
        for name in ("gem3 l2", "avg|max l2"):
            z = np.concatenate([f[name] for f in feats], axis=1).astype(np.float32)
            line(f"{pair}: {name}, concatenated", [oof_accuracy(z, y, c) for c in C_GRID])
    print(f"\n{time.perf_counter() - t0:.0f} s; out-of-fold over train + validation only, test not read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
