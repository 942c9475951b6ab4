"""A pick of ``bench_cv_select.py`` scored on a second, larger test set (issue 26).

Why: the cats-vs-dogs test split has 1,000 images, so one image is 0.1 point and a standard error
about 0.45 point; 0.978 and 0.979 cannot be told apart on it. This script takes the rows that
``bench_cv_select.py --select --json`` recorded (the pick by default, or named levers), refits each
member on train + validation exactly as the fit stage did (``fit_config``, the product's heads,
the declared answer), and scores the refit on the original test split, which must reproduce the
recorded figure, and on an extra test set of images never used before: a cache made by
``featcache extract`` of a folder holding only ``test/<class>/`` at the same size, weights and
precision. It reports both accuracies, and the standard error and Wilson 95% interval on the extra set.

With ``--run RUN`` it scores a product run folder instead (``featcache classify --cv 5``): the
winner the run saved (refitted on train + validation by the product), on the run's own test split,
which must reproduce run.json's figure, and on the extra test set, with the run's test-time views.

Usage:
    featcache extract --data /work/data/cats_ext --size 256 --weights $W --precision bfloat16 \\
        --cache-dir /work/data/cache-ext --quiet
    python bench/bench_cv_holdout.py --cache-dir /work/data/cache-tta/cats_and_dogs_small-a18b8343 \\
        --extra-cache-dir /work/data/cache-ext/cats_ext-XXXX --select-json /work/data/tta-logs/cv.json \\
        [--budget 15000] [--lever "256: any views scored, within budget" --k 3 ...]
    python bench/bench_cv_holdout.py --run runs/<time>-cv256 --extra-cache-dir /work/data/cache-ext/cats_ext-XXXX
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine
from bench_tta_levers import config_grid, config_label, fit_config, pooled, score
from scipy.stats import binomtest


def cache_of(folder: Path, size: int) -> Path:
    found = sorted(folder.glob(f"*-block5_pool-{size}-*.h5"))
    if len(found) != 1:
        raise SystemExit(f"error: expected one {size} px block5_pool cache in {folder}, found {len(found)}")
    return found[0]


def same_features(a: Path, b: Path) -> None:
    """The extra test cache must come from the same backbone, weights, layer, size and precision,
    with the same classes in the same order (its labels index them)."""
    from pipeline.cache import store

    ma, mb = store.read_meta(a), store.read_meta(b)
    for field in (*store.IDENTITY_FIELDS, "class_names"):
        if getattr(ma, field) != getattr(mb, field):
            raise SystemExit(f"error: {b} has {field}={getattr(mb, field)!r}, {a} has {getattr(ma, field)!r}")


@functools.cache
def views(path: Path, split: str, n: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """The clean rows of ``split`` and its first ``n`` test-time views (float32), with the
    split's labels and paths; each split is read once however many members use it."""
    from pipeline.cache import store

    meta = store.read_meta(path)
    names = [split, *meta.tta_splits(split)][: n + 1]
    if len(names) < n + 1:
        raise SystemExit(f"error: {path} has {len(names) - 1} views of {split}; the row scores {n}")
    x, labels, paths = store.load_split(path, split)
    rest = [np.asarray(store.load_split(path, s)[0], np.float32) for s in names[1:]]
    return [np.asarray(x, np.float32), *rest], labels, paths


def trval_views(path: Path, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Train + validation, train's rows first, as [clean, view 1, ..., view n], and their labels."""
    (xt, yt, _), (xv, yv, _) = views(path, "train", n), views(path, "validation", n)
    return [np.concatenate(pair) for pair in zip(xt, xv, strict=True)], np.concatenate([yt, yv])


def member_proba(member: str, grid: dict[tuple[str, str], tuple], cache_dir: Path, extra_dir: Path) -> dict:
    """One member refitted on train + validation, with its test probabilities on both test sets."""
    size_s, rest = member.split(" ", 1)
    label, train_on, scoring = rest.rsplit(" ", 2)
    train_on, n_views = train_on.removeprefix("train="), int(scoring.removeprefix("views="))
    if (label, train_on) not in grid:
        raise SystemExit(f"error: member {member!r} is not a config of bench_tta_levers.config_grid")
    name, params, pooling, l2, _, _ = grid[(label, train_on)]
    size = int(size_s)
    path, extra = cache_of(cache_dir, size), cache_of(extra_dir, size)
    same_features(path, extra)
    need = 1 if train_on == "tta" else 0
    trval, y = trval_views(path, need)
    extra_x, y_extra, paths_extra = views(extra, "test", n_views)
    test_x, y_test, _ = views(path, "test", n_views)
    z = {
        "train": (pooled(trval[0], pooling, l2), y),
        "train@mirror": pooled(trval[1], pooling, l2) if need else None,
        "validation": [pooled(v, pooling, l2) for v in extra_x],  # one fit scores both test sets
        "test": [pooled(v, pooling, l2) for v in test_x],
    }
    probas = fit_config(name, params, train_on, z)
    return {
        "original": probas["test"][n_views],
        "extra": probas["validation"][n_views],
        "y_original": y_test,
        "y_extra": y_extra,
        "paths_extra": paths_extra,
    }


def paired(ours: np.ndarray, part: dict, against: Path) -> None:
    """The row against another model (bench_recipe.py --predictions) on the same extra images,
    matched by class folder and file name: both accuracies, the discordant pairs and an exact
    McNemar test (two-sided binomial on the images exactly one of them gets right)."""
    other = np.load(against)
    key = lambda p: "/".join(Path(p).parts[-2:])  # noqa: E731
    where = {key(p): i for i, p in enumerate(other["paths"])}
    missing = [p for p in part["paths_extra"] if key(p) not in where]
    if missing or len(where) != len(part["paths_extra"]):
        raise SystemExit(f"error: {against} scored other images ({len(missing)} of ours missing, e.g. {missing[:1]})")
    idx = np.array([where[key(p)] for p in part["paths_extra"]])
    proba, labels = other["proba"][idx], other["labels"][idx]
    if not np.array_equal(labels, part["y_extra"]):
        raise SystemExit(f"error: {against} labels the same images differently")
    theirs = (proba[:, 0] > 0.5).astype(int) if proba.shape[1] == 1 else np.argmax(proba, axis=1)
    right_ours, right_theirs = ours == labels, theirs == labels
    only_ours, only_theirs = int(np.sum(right_ours & ~right_theirs)), int(np.sum(~right_ours & right_theirs))
    p = binomtest(only_ours, only_ours + only_theirs).pvalue if only_ours + only_theirs else 1.0
    meta = json.loads(str(other["meta"]))
    print(
        f"against {against.name} ({meta.get('epochs')} epochs, {meta.get('size')} px, {meta.get('precision')}): "
        f"on the same {len(labels)} images, ours {right_ours.mean():.4f}, theirs {right_theirs.mean():.4f}; "
        f"both right {int(np.sum(right_ours & right_theirs))}, both wrong {int(np.sum(~right_ours & ~right_theirs))}, "
        f"only ours right {only_ours}, only theirs right {only_theirs}; exact McNemar p = {p:.2g}",
        flush=True,
    )


def run_row(run: Path, extra_dir: Path, against: Path | None) -> int:
    """A product run's saved winner on its own test split and on the extra one (``--run``)."""
    from pipeline.train.persist import load_winner

    info = json.loads((run / "run.json").read_text())
    winner, head = info["winner"], load_winner(run, info)
    cache = Path(info["cache"])
    extra = cache_of(extra_dir, int(info["cache_meta"]["size"]))
    same_features(cache, extra)
    n_views = int((info.get("tta") or {}).get("views", 0))

    def proba(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        xs, y, paths = views(path, "test", n_views)
        return np.mean([head.predict_proba(x) for x in xs], axis=0), y, paths

    (p_test, y_test, _), (p_extra, y_extra, paths_extra) = proba(cache), proba(extra)
    now, acc = score(p_test, y_test)[0], score(p_extra, y_extra)[0]
    if round(now, 6) != round(winner["test_accuracy"], 6):
        print(f"error: the saved winner scores {now} on test now, run.json says {winner['test_accuracy']}")
        return 2
    n = len(y_extra)
    interval = binomtest(round(acc * n), n).proportion_ci(method="wilson")
    selected = "out of fold" if info.get("cv") else "validation"
    print("| run | picked on | its figure | passes | test (run.json) | test now | extra test | n | SE | Wilson 95% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {run.name} | {selected} | {winner['val_accuracy']:.4f} | {winner['passes']:,.0f} | "
        f"{winner['test_accuracy']:.4f} | {now:.4f} | **{acc:.4f}** | {n} | {math.sqrt(acc * (1 - acc) / n):.4f} | "
        f"{interval.low:.4f}-{interval.high:.4f} |",
        flush=True,
    )
    if against is not None:
        paired(
            np.asarray(head.classes_)[np.argmax(p_extra, axis=1)],
            {"y_extra": y_extra, "paths_extra": paths_extra},
            against,
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True, help="the caches bench_cv_select.py fitted on")
    parser.add_argument("--extra-cache-dir", type=Path, required=True, help="caches of the extra test folder")
    parser.add_argument("--select-json", type=Path, default=None, help="bench_cv_select.py --json output")
    parser.add_argument("--run", type=Path, default=None, help="a product run folder to score instead")
    parser.add_argument("--budget", default="15000", help="which budget's table to read")
    parser.add_argument("--lever", action="append", default=[], help="a row by its lever name (default: the pick)")
    parser.add_argument("--k", action="append", type=int, default=[], help="the k of each --lever")
    parser.add_argument("--against", type=Path, default=None, help="bench_recipe.py --predictions file to compare with")
    args = parser.parse_args()
    print(machine())
    if (args.run is None) == (args.select_json is None):
        print("error: give --select-json (bench_cv_select's rows) or --run (a product run folder), one of them")
        return 2
    if args.run is not None:
        return run_row(args.run, args.extra_cache_dir, args.against)
    rows: list[dict[str, Any]] = json.loads(args.select_json.read_text())[args.budget]
    if args.lever:
        if len(args.k) != len(args.lever):
            print("error: give one --k per --lever")
            return 2
        wanted = [
            next((r for r in rows if r["lever"] == lv and r["k"] == k), None)
            for lv, k in zip(args.lever, args.k, strict=True)
        ]
        if None in wanted:
            missing = [lv for lv, w in zip(args.lever, wanted, strict=True) if w is None]
            print(f"error: no row {missing} in budget {args.budget}")
            return 2
        chosen = [w for w in wanted if w is not None]
    else:  # the script's pick: best out-of-fold accuracy, then lower log-loss, then fewer passes
        chosen = [min(rows, key=lambda r: (-r["val"], r["val_log_loss"], r["passes"]))]
    configs = config_grid(("clean", "tta"))
    grid = {(config_label(n, p, pl, extra), t): (n, p, pl, l2, t, extra) for n, p, pl, l2, t, extra in configs}
    assert len(grid) == len(configs), "two configs of the grid share a label: a member would be ambiguous"
    print("| row | k | OOF | test (recorded) | test (refit now) | extra test | n extra | SE | Wilson 95% | members |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in chosen:
        parts = [member_proba(m, grid, args.cache_dir, args.extra_cache_dir) for m in row["members"].split("; ")]
        first = parts[0]
        if any(p["paths_extra"] != first["paths_extra"] for p in parts):
            print("error: the members' extra test caches list their images in different orders")
            return 2
        now = score(np.mean([p["original"] for p in parts], axis=0), first["y_original"])[0]
        acc = score(np.mean([p["extra"] for p in parts], axis=0), first["y_extra"])[0]
        n = len(first["y_extra"])
        interval = binomtest(round(acc * n), n).proportion_ci(method="wilson")
        se = math.sqrt(acc * (1 - acc) / n)
        print(
            f"| {row['lever']} | {row['k']} | {row['val']:.3f} | {row['test']:.3f} | {now:.3f} | **{acc:.4f}** | "
            f"{n} | {se:.4f} | {interval.low:.4f}-{interval.high:.4f} | {row['members']} |",
            flush=True,
        )
        if args.against is not None:
            paired(np.argmax(np.mean([p["extra"] for p in parts], axis=0), axis=1), first, args.against)
    return 0


if __name__ == "__main__":
    sys.exit(main())
