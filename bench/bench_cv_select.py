"""Cross-validated selection on train + validation (issue 26, after BENCHMARKS 9b's 256/288 px
subsection): the levers of ``bench_tta_levers.py``, picked on out-of-fold predictions over
train + validation (3,000 cats-vs-dogs images) instead of on the 1,000 validation images alone.

Why: with 1,000 validation images the top lever rows differ by a few images, too few to choose
among about 100 rows. Stratified 5-fold cross-validation (fixed seed) over train + validation
gives every one of those images one held-out prediction per config, three times the evidence.

For every config of ``bench_tta_levers.config_grid`` (pooled heads only, fitted by its
``fit_config``, i.e. the product's ``make_head``) and each scoring (clean image; mean over the
image and its mirror; + one augmented view where cached) the fit stage keeps: the out-of-fold
class probabilities over train + validation, and the test probabilities of the config refitted
(a) on train + validation and (b) on train only (as the product does). The select stage forms
the same lever rows as ``bench_tta_levers.lever_tables`` (top-k ensembles, sizes together), ranked
by out-of-fold accuracy (ties: lower out-of-fold log-loss, then fewer passes), within the budget,
and reads test only for the rows formed; its last line is the one pick.

**Declared before any test figure was read: the lever's answer is the refit on train +
validation** (what cross-validated selection implies: the chosen config is retrained on every
labelled image). The train-only refit is printed beside it for comparison, not as the answer.

Compute is charged honestly (``pipeline.core.accounting`` with ``flops_per_image``, 180 px recipe
units): cross-validation scores every train + validation image, so a config that trains on
mirrors or scores the mirror needs the mirror of every train + validation image, and test is
scored with the config's views. Per size: (train + validation) x (1 + max(mirror training, views
scored)) + test x (1 + views scored); an ensemble across sizes pays for each size once.

Usage (the fit stage per size, so the bench lock is held a few minutes at a time; then select):
    python bench/bench_cv_select.py --cache-dir DIR --sizes 288 --out /work/data/cv26/cats --fit
    python bench/bench_cv_select.py --cache-dir DIR --sizes 288,256,224,180,150 --out /work/data/cv26/cats \
        --select --budget 15000
Without ``--fit``/``--select`` it does both. ``--every n`` keeps every n-th image (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine
from bench_tta_levers import Candidate, config_grid, config_label, fit_config, lever_tables, load_size, pooled, score

FOLDS = 5
FOLD_SEED = 0
PRIMARY = "test, train+val refit (declared answer)"
SECONDARY = "test, train refit"


def views_of(d: dict[str, Any], how: str, l2: bool) -> dict[str, Any]:
    """Train + validation and test pooled, each as [clean, mirror, augmented] as far as every split
    has them (train's views come first in the concatenation, so rows 0..n_train-1 are train)."""
    n_views = 1 + min(2, *(len(d[s + "@views"]) for s in ("train", "validation", "test")))

    def view(split: str, v: int) -> np.ndarray:
        return d[split][0] if v == 0 else d[split + "@views"][v - 1]

    trval = [pooled(np.concatenate([view("train", v), view("validation", v)]), how, l2) for v in range(n_views)]
    test = [pooled(view("test", v), how, l2) for v in range(n_views)]
    return {"trval": trval, "test": test}


def cv_config(
    name: str, params: dict[str, Any], train_on: str, z: dict[str, Any], y: np.ndarray, n_train: int, folds: list
) -> dict[str, list[np.ndarray]]:
    """Out-of-fold probabilities over train + validation per scoring, and test probabilities of
    the refits on train + validation and on train only; every fit is ``fit_config``'s."""
    n_views = len(z["trval"])

    def rows(idx: np.ndarray, scored: list[np.ndarray]) -> dict[str, Any]:
        return {
            "train": (z["trval"][0][idx], y[idx]),
            "train@mirror": z["trval"][1][idx] if n_views > 1 else None,
            "validation": scored,
            "test": z["test"],
        }

    oof: list[np.ndarray] = []
    for train_idx, held_idx in folds:
        probas = fit_config(name, params, train_on, rows(train_idx, [v[held_idx] for v in z["trval"]]))
        if not oof:
            oof = [np.zeros((len(y), p.shape[1]), dtype=p.dtype) for p in probas["validation"]]
        for k, p in enumerate(probas["validation"]):
            oof[k][held_idx] = p
    everything = fit_config(name, params, train_on, rows(np.arange(len(y)), []))
    train_only = fit_config(name, params, train_on, rows(np.arange(n_train), []))
    return {"oof": oof, "test_trval": everything["test"], "test_train": train_only["test"]}


def fit_stage(args: argparse.Namespace, size: int, path: Path) -> None:
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold

    from pipeline.core import accounting
    from pipeline.features.registry import flops_per_image

    t0 = time.perf_counter()
    d = load_size(path, args.every)
    n_train = len(d["train"][1])
    y = np.concatenate([d["train"][1], d["validation"][1]])
    folds = list(StratifiedKFold(FOLDS, shuffle=True, random_state=FOLD_SEED).split(np.zeros(len(y)), y))
    jobs = config_grid(("clean", "tta") if d["train@views"] else ("clean",))
    zs = {(pl, l2): views_of(d, pl, l2) for pl in ("avg", "max") for l2 in (False, True)}
    y_test = d["test"][1]
    del d
    results = Parallel(n_jobs=args.jobs)(
        delayed(cv_config)(n, p, t, zs[(pl, l2)], y, n_train, folds) for n, p, pl, l2, t, _ in jobs
    )
    unit = float(accounting.recipe_passes(1, flops_per_image(size, "block5_pool")) or 0)
    configs = [
        {"label": config_label(n, p, pl, extra), "train_on": t, "extra": extra} for n, p, pl, _, t, extra in jobs
    ]
    meta = {"size": size, "unit": unit, "n_train": n_train, "folds": FOLDS, "fold_seed": FOLD_SEED, "configs": configs}
    args.out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta)),
        "y_trval": y,
        "y_test": y_test,
        # float32 like the MLP's output (logreg's float64 cast down), so log-loss checks every row alike
        **{
            key: np.stack([np.stack(r[key]) for r in results]).astype(np.float32)
            for key in ("oof", "test_trval", "test_train")
        },
    }
    np.savez_compressed(args.out / f"{size}.npz", allow_pickle=False, **arrays)
    print(
        f"{size} px: {len(jobs)} configs x ({FOLDS} folds + 2 refits) in {time.perf_counter() - t0:.0f} s "
        f"(load {os.getloadavg()}); {len(y)} train+validation rows -> {args.out / f'{size}.npz'}",
        flush=True,
    )


def select_stage(args: argparse.Namespace, sizes: list[int]) -> int:
    scored: list[tuple[Candidate, float, float]] = []
    train_refit: dict[int, np.ndarray] = {}
    unit: dict[int, float] = {}
    y_trval: np.ndarray | None = None
    y_test: np.ndarray | None = None
    for size in sizes:
        f = args.out / f"{size}.npz"
        if not f.exists():
            print(f"SKIP: {f} not fitted (run --fit --sizes {size})")
            continue
        data = np.load(f)
        meta = json.loads(str(data["meta"]))
        if y_trval is None or y_test is None:
            y_trval, y_test = data["y_trval"], data["y_test"]
        elif not (np.array_equal(y_trval, data["y_trval"]) and np.array_equal(y_test, data["y_test"])):
            print(f"error: labels of {f} differ from the other sizes'; not one data set (or another --every)")
            return 2
        unit[size] = meta["unit"]
        oof, test_trval, test_train = data["oof"], data["test_trval"], data["test_train"]
        for i, cfg in enumerate(meta["configs"]):
            for k in range(oof.shape[1]):
                c = Candidate(size, cfg["label"], cfg["train_on"], k, cfg["extra"], oof[i, k], test_trval[i, k], 0)
                train_refit[id(c)] = test_train[i, k]
                scored.append((c, *score(c.val_proba, y_trval)))
    if y_trval is None or y_test is None:
        print("error: nothing fitted to select from")
        return 2
    n_trval, n_test = len(y_trval), len(y_test)

    def passes(members: list[Candidate]) -> float:
        """Per size once: every train + validation image with the views CV needed, test with its views."""
        total = 0.0
        for size in {m.size for m in members}:
            ms = [m for m in members if m.size == size]
            views_trval = 1 + max(max(int(m.train_on == "tta"), m.scoring) for m in ms)
            views_test = 1 + max(m.scoring for m in ms)
            total += (n_trval * views_trval + n_test * views_test) * unit[size]
        return total

    tests = {PRIMARY: (y_test, lambda m: m.test_proba), SECONDARY: (y_test, lambda m: train_refit[id(m)])}
    header = f"out-of-fold over {n_trval} train+validation images ({FOLDS}-fold, seed {FOLD_SEED}), test {n_test}"
    all_rows = {
        f"{b:.0f}": lever_tables(scored, list(unit), b, passes, y_trval, tests, header, select_name="OOF")
        for b in (float(x) for x in args.budget.split(","))
    }
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="288,256,224,180,150")
    parser.add_argument("--out", type=Path, required=True, help="folder for each size's fitted probabilities")
    parser.add_argument("--fit", action="store_true", help="fit the sizes and save (no selection)")
    parser.add_argument("--select", action="store_true", help="select from saved sizes (no fitting)")
    parser.add_argument("--budget", default="15000", help="passes a lever may spend; several, comma-separated")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--every", type=int, default=None, help="every n-th row only (a smoke test, not a figure)")
    parser.add_argument("--json", type=Path, default=None, help="write every lever's rows here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(machine())
    print(f"load before: {os.getloadavg()}; caches {args.cache_dir}; declared answer: {PRIMARY}", flush=True)
    if args.fit or not args.select:
        for size in sizes:
            paths = sorted(args.cache_dir.glob(f"*-block5_pool-{size}-*.h5"))
            if not paths:
                print(f"SKIP: no {size} px cache in {args.cache_dir}")
                continue
            fit_stage(args, size, paths[0])
    rc = select_stage(args, sizes) if args.select or not args.fit else 0
    print(f"load after: {os.getloadavg()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
