"""Levers on cached features toward the recipe's accuracy (issue 26, after section 9b): more
ensemble members, test-time views of validation/test only, larger C, L2-normalised features and
ensembles across input sizes, each within a compute budget and picked on validation alone.

Reads caches that ``bench_tta.py`` made (``--tta-views 1`` or more); extracts nothing. Every
config is fitted once with the product's heads (``pipeline.train.sweep_file.make_head``) on the
max- and avg-pooled maps (no flatten: its MLP alone took 239 s at 224 px in 9b), and its class
probabilities on validation and test are kept for three scorings: the clean image only, the mean
over the image and its mirror, and (where cached) the mean over the image, its mirror and one
augmented view. A lever is a rule for forming candidates from these; its winner is the
candidate with the best validation accuracy (ties: lower validation log-loss, then fewer passes),
and only that winner's test accuracy is read. Passes are backbone work in the seeds' recipe
units (VGG16 to block5_pool at 180 px): the training rows plus every validation and test image
scored, times its views; an ensemble across sizes pays for each size's images.

Usage:
    python bench/bench_tta_levers.py --cache-dir /work/data/cache-tta/cats_and_dogs_small-a18b8343 \
        [--sizes 224,180,150] [--budget 15000[,30000]] [--jobs 2]

``--budget`` is 1/10 of the recipe's passes: 15,000 for cats vs dogs; for another set, 5 x its train +
validation images (the flowers of BENCHMARKS 9b: 14,670). The printed share is of 150,000. Several
budgets, comma-separated (``--budget 15000,30000``), print one table and one pick each from one fit.
A cache without test-time views (``--tta-views 0``) gives clean training and scoring rows only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine

POOLED = ("avg", "max")
BASE_GRID: list[tuple[str, dict[str, Any]]] = [
    *(("logreg", {"C": c}) for c in (0.001, 0.01, 0.1)),
    *(("svm", {"C": c}) for c in (0.01, 0.1)),
    *(("mlp", {"learning_rate": lr, "epochs": 30, "batch_size": 64, "patience": 3}) for lr in (1e-4, 3e-4)),
]
WIDE_C = [("logreg", {"C": c}) for c in (0.3, 1.0, 3.0)]


@dataclass
class Candidate:
    size: int
    name: str
    train_on: str  # clean | tta (clean + the mirror rows of train)
    scoring: int  # test-time views scored besides the clean image: 0, 1 (mirror), 2 (+ augmented)
    extra: str  # "" | "wideC" | "l2"
    val_proba: np.ndarray
    test_proba: np.ndarray
    train_images: int
    members: list[str] = field(default_factory=list)


def l2_normalised(z: np.ndarray) -> np.ndarray:
    """Each row scaled to unit Euclidean length (an all-zero row stays zero)."""
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def pooled(x: np.ndarray, how: str, l2: bool) -> np.ndarray:
    z = x.mean(axis=(1, 2)) if how == "avg" else x.max(axis=(1, 2))
    if l2:
        z = l2_normalised(z)
    return z[:, None, None, :].astype(np.float32)  # (N,1,1,C): the heads' pooling is then the identity


def load_size(path: Path, limit: int | None) -> dict[str, Any]:
    """A cache's splits and their test-time views (``limit``: every n-th row only, a smoke test)."""
    from pipeline.cache import store

    meta = store.read_meta(path)
    step = slice(None, None, limit)
    out: dict[str, Any] = {"meta": meta}
    for split in ("train", "validation", "test"):
        x, y, _ = store.load_split(path, split)
        out[split] = (x[step], y[step])
        out[split + "@views"] = [store.load_split(path, name)[0][step] for name in meta.tta_splits(split)]
    return out


def pool_all(d: dict[str, Any], pooling: str, l2: bool) -> dict[str, Any]:
    """Every split pooled once: train, train's mirror, and validation/test with up to two views."""
    return {
        "train": (pooled(d["train"][0], pooling, l2), d["train"][1]),
        "train@mirror": pooled(d["train@views"][0], pooling, l2) if d["train@views"] else None,
        **{s: [pooled(v, pooling, l2) for v in [d[s][0], *d[s + "@views"][:2]]] for s in ("validation", "test")},
    }


Config = tuple[str, dict[str, Any], str, bool, str, str]  # head, params, pooling, l2, train_on, extra


def config_grid(train_ons: tuple[str, ...]) -> list[Config]:
    """The pooled grid: the base heads, wide C and L2-normalised logreg/svm, each on max and avg
    pooling and each training set in ``train_ons``."""
    jobs: list[Config] = []
    for (name, params), pooling, train_on in itertools.product(BASE_GRID, POOLED, train_ons):
        jobs.append((name, params, pooling, False, train_on, ""))
    for (name, params), pooling, train_on in itertools.product(WIDE_C, POOLED, train_ons):
        jobs.append((name, params, pooling, False, train_on, "wideC"))
    for (name, params), pooling, train_on in itertools.product(
        [("logreg", {"C": c}) for c in (0.01, 0.1, 1.0)] + [("svm", {"C": c}) for c in (0.01, 0.1)],
        POOLED,
        train_ons,
    ):
        jobs.append((name, params, pooling, True, train_on, "l2"))
    return jobs


def config_label(name: str, params: dict[str, Any], pooling: str, extra: str) -> str:
    first = next(iter(params.items()))
    return f"{name} {pooling} {first[0]} {first[1]:g}{' l2' if extra == 'l2' else ''}"


def fit_config(name: str, params: dict[str, Any], train_on: str, z: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """One head fitted on pooled rows; its probabilities scored on 0, 1 and 2 views."""
    from pipeline.train.sweep_file import make_head

    xs, ys = [z["train"][0]], [z["train"][1]]
    if train_on == "tta":
        xs.append(z["train@mirror"])
        ys.append(z["train"][1])
    head = make_head(name, **{"random_state": 0, "pooling": "avg", **params})
    head.fit(np.concatenate(xs), np.concatenate(ys))
    probas = {}
    for split in ("validation", "test"):
        per_view = [head.predict_proba(v) for v in z[split]]
        probas[split] = [np.mean(per_view[: k + 1], axis=0) for k in range(len(per_view))]
    return probas


def score(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import log_loss

    return float(np.mean(np.argmax(proba, axis=1) == y)), float(log_loss(y, proba, labels=range(proba.shape[1])))


Scored = tuple[Candidate, float, float]  # a candidate, its selection accuracy and log-loss


def lever_tables(
    scored: list[Scored],
    sizes: list[int],
    budget: float,
    passes: Callable[[list[Candidate]], float],
    y_select: np.ndarray,
    tests: dict[str, tuple[np.ndarray, Callable[[Candidate], np.ndarray]]],
    header: str,
    select_name: str = "validation",
) -> list[dict[str, Any]]:
    """Every lever's row within ``budget`` passes, printed, and the pick on the selection split
    (``val_proba`` against ``y_select``); ``tests`` name each test figure read for a row (its
    labels and how a candidate's test probabilities are got), read only for the rows formed."""
    from pipeline.core import accounting

    rows: list[dict[str, Any]] = []

    def rank(items: list[Scored]) -> list[Scored]:
        return sorted(items, key=lambda t: (-t[1], t[2], passes([t[0]])))

    def selection(members: list[Candidate]) -> tuple[float, float]:
        return score(np.mean([m.val_proba for m in members], axis=0), y_select)

    def emit(lever: str, members: list[Candidate]) -> None:
        va, vl = selection(members)
        test_acc = {name: score(np.mean([get(m) for m in members], axis=0), y)[0] for name, (y, get) in tests.items()}
        p = passes(members)
        names = "; ".join(f"{m.size} {m.name} train={m.train_on} views={m.scoring}" for m in members)
        first = next(iter(test_acc))
        rows.append(
            {
                "lever": lever,
                "k": len(members),
                "val": va,
                "val_log_loss": vl,
                "test": test_acc[first],
                **{name: acc for name, acc in test_acc.items() if name != first},
                "passes": p,
                "members": names,
            }
        )
        share = accounting.recipe_share(p) or 0.0
        figures = " | ".join(f"{acc:.3f}" for acc in test_acc.values())
        print(f"| {lever} | {len(members)} | {va:.3f} | {vl:.4f} | {figures} | {p:,.0f} | {share:.1%} | {names} |")

    def report(lever: str, pool: list[Scored], ks: tuple[int, ...] = (1,)) -> None:
        """For each k: the best k of ``pool`` by the selection split whose mean stays within the
        budget (walked in selection order, skipping a config that would take the members over it)."""
        for k in ks:
            members: list[Candidate] = []
            for t in rank(pool):
                if len(members) < k and passes([*members, t[0]]) <= budget:
                    members.append(t[0])
            if len(members) == k:
                emit(lever, members)

    print(f"\nbudget {budget:,.0f} passes; {header}")
    columns = f"{select_name} | {'val' if select_name == 'validation' else select_name} log-loss | {' | '.join(tests)}"
    print(f"| lever | k | {columns} | passes | share of 150,000 | members |")
    print("|---|---|---|---|" + "---|" * len(tests) + "---|---|---|")
    for size in sizes:
        base = [t for t in scored if t[0].size == size and t[0].extra == ""]
        report(
            f"{size}: plain (train clean, no views)",
            [t for t in base if t[0].train_on == "clean" and not t[0].scoring],
        )
        report(
            f"{size}: mirror scored (train clean)",
            [t for t in base if t[0].train_on == "clean" and t[0].scoring == 1],
        )
        report(
            f"{size}: mirror+aug scored (train clean)",
            [t for t in base if t[0].train_on == "clean" and t[0].scoring == 2],
        )
        report(f"{size}: full (train clean|tta, mirror scored)", [t for t in base if t[0].scoring == 1], (1, 3, 5, 7))
        report(
            f"{size}: full + wide C",
            [t for t in scored if t[0].size == size and t[0].extra != "l2" and t[0].scoring == 1],
            (1, 3, 5),
        )
        report(
            f"{size}: full + L2 logreg/svm",
            [t for t in scored if t[0].size == size and t[0].scoring == 1],
            (1, 3, 5),
        )
        report(
            f"{size}: L2 logreg/svm only",
            [t for t in scored if t[0].size == size and t[0].extra == "l2" and t[0].scoring == 1],
            (1, 3),
        )
        report(f"{size}: any views scored, within budget", [t for t in scored if t[0].size == size], (1, 3, 5))
    # across sizes: the best k of each size's candidates, then their mean, within the budget
    for a, b in itertools.combinations(sizes, 2):
        for ka, kb in ((1, 1), (3, 3)):
            best = None
            for views_a, views_b, tr_a, tr_b in itertools.product((0, 1), (0, 1), ("clean", "tta"), ("clean", "tta")):
                pa = rank([t for t in scored if t[0].size == a and t[0].scoring == views_a and t[0].train_on == tr_a])[
                    :ka
                ]
                pb = rank([t for t in scored if t[0].size == b and t[0].scoring == views_b and t[0].train_on == tr_b])[
                    :kb
                ]
                members = [t[0] for t in pa + pb]
                if len(members) < ka + kb or passes(members) > budget:
                    continue
                va, vl = selection(members)
                key = (-va, vl, passes(members))
                if best is None or key < best[0]:
                    best = (key, members)
            if best is not None:
                emit(f"sizes {a}+{b} (top {ka} of each)", best[1])
    if not rows:
        print(f"\nno row within {budget:,.0f} passes")
        return rows
    best_row = min(rows, key=lambda r: (-r["val"], r["val_log_loss"], r["passes"]))
    tail = ", ".join(f"{name} {best_row['test' if i == 0 else name]:.3f}" for i, name in enumerate(tests))
    print(
        f"\npicked on {select_name} alone over every row within {budget:,.0f} passes: "
        f"{best_row['lever']} k={best_row['k']}: "
        f"{select_name} {best_row['val']:.3f}, {tail}, {best_row['passes']:,.0f} passes "
        f"({accounting.recipe_share(best_row['passes']):.1%})"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="224,180,150")
    parser.add_argument(
        "--budget",
        default="15000",
        help="passes (recipe units) a lever may spend; several, comma-separated, give one table each",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--every", type=int, default=None, help="every n-th row only (a smoke test, not a figure)")
    parser.add_argument("--json", type=Path, default=None, help="write every lever's rows here")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budget.split(",")]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from joblib import Parallel, delayed

    from pipeline.core import accounting
    from pipeline.features.registry import flops_per_image

    print(machine())
    print(f"load before: {os.getloadavg()}; caches {args.cache_dir}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    cands: list[Candidate] = []
    labels: dict[str, np.ndarray] = {}
    unit: dict[int, float] = {}
    n_scored: dict[str, int] = {}
    for size in sizes:
        paths = sorted(args.cache_dir.glob(f"*-block5_pool-{size}-*.h5"))
        if not paths:
            print(f"SKIP: no {size} px cache in {args.cache_dir}")
            continue
        t0 = time.perf_counter()
        d = load_size(paths[0], args.every)
        unit[size] = float(accounting.recipe_passes(1, flops_per_image(size, "block5_pool")) or 0)
        for split in ("validation", "test"):
            if split in labels and not np.array_equal(labels[split], d[split][1]):
                print(f"error: {split} labels differ between sizes; the caches are not of one data set")
                return 2
            labels[split] = d[split][1]
            n_scored[split] = len(d[split][1])
        n_train = len(d["train"][1])
        # a cache without test-time views (extract --tta-views 0) gives clean training and scoring only
        jobs = config_grid(("clean", "tta") if d["train@views"] else ("clean",))
        zs = {(pl, l2): pool_all(d, pl, l2) for pl in POOLED for l2 in (False, True)}
        del d
        results = Parallel(n_jobs=args.jobs)(delayed(fit_config)(n, p, t, zs[(pl, l2)]) for n, p, pl, l2, t, _ in jobs)
        for (name, params, pooling, _, train_on, extra), probas in zip(jobs, results, strict=True):
            label = config_label(name, params, pooling, extra)
            for k in range(len(probas["validation"])):
                cands.append(
                    Candidate(
                        size,
                        label,
                        train_on,
                        k,
                        extra,
                        probas["validation"][k],
                        probas["test"][k],
                        n_train * (2 if train_on == "tta" else 1),
                    )
                )
        print(f"{size} px: {len(jobs)} configs fitted in {time.perf_counter() - t0:.0f} s (load {os.getloadavg()})")

    n_val, n_test = n_scored["validation"], n_scored["test"]

    def passes(members: list[Candidate]) -> float:
        """Each size's images once: its largest training set and its most views scored."""
        total = 0.0
        for size in {m.size for m in members}:
            ms = [m for m in members if m.size == size]
            train = max(m.train_images for m in ms)
            views = 1 + max(m.scoring for m in ms)
            total += (train + (n_val + n_test) * views) * unit[size]
        return total

    scored = []
    for c in cands:
        v, vl = score(c.val_proba, labels["validation"])
        scored.append((c, v, vl))
    tests = {"test": (labels["test"], lambda m: m.test_proba)}
    header = f"validation {n_val} images, test {n_test}"
    all_rows = {
        f"{budget:.0f}": lever_tables(scored, list(unit), budget, passes, labels["validation"], tests, header)
        for budget in budgets
    }
    print(f"load after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(all_rows if len(budgets) > 1 else all_rows[f"{budgets[0]:.0f}"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
