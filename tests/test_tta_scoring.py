"""Scoring with test-time views: a row's validation figures are those of the mean of the
head's probabilities over each image's clean row and its cached views, computed here by
hand; test is scored the same way, once, on the winner; every row counts its backbone
passes (views included) in seed-recipe units."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core import accounting
from pipeline.core.config import SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.core.vocab import tta_split
from pipeline.runs.folder import score
from pipeline.train.persist import load_head
from pipeline.train.sweep import run_sweep

from conftest import separable, synthetic_meta

FLOPS = 3.1e10  # per image, as a 224 px VGG16 cache records it


def tta_cache(path, views: int = 2, seed: int = 0):
    """Train/validation/test of separable features and ``views`` noisy copies of each split as its
    test-time views, described in ``info["tta"]`` as extract writes it."""
    rng = np.random.default_rng(seed)
    splits = {}
    for i, (split, n) in enumerate((("train", 30), ("validation", 20), ("test", 20))):
        x, y = separable(n, seed=seed + i, spread=2.5)
        splits[split] = {"features": x, "labels": y, "paths": [f"{split}/{j}.png" for j in range(len(y))]}
        for k in range(1, views + 1):
            order = rng.permutation(len(y))  # stored in another order: scoring must align by path
            noisy = x + rng.normal(0, 1.5, x.shape).astype(np.float32)
            splits[tta_split(split, k)] = {
                "features": noisy[order],
                "labels": y[order],
                "paths": [f"{split}/{j}.png" for j in order],
            }
    info = {
        "flops_per_image": FLOPS,
        "tta": {
            "views": views,
            "seed": 0,
            "splits": {s: [tta_split(s, k) for k in range(1, views + 1)] for s in ("train", "validation", "test")},
        },
    }
    meta = synthetic_meta(splits["train"]["features"], ("a", "b"), info=info)
    return store.write_cache(path, splits, meta)


def by_hand(head, cache, split):
    x, y, paths = store.load_split(cache, split)
    probas = [head.predict_proba(x)]
    for name in store.read_meta(cache).tta_splits(split):
        xv, _, pv = store.load_split(cache, name)
        row = {p: i for i, p in enumerate(pv)}
        probas.append(head.predict_proba(xv[[row[p] for p in paths]]))
    return np.mean(probas, axis=0), y, probas[0]


def test_tta_scores_the_mean_over_views_and_counts_passes(tmp_path):
    cache = tta_cache(tmp_path / "c.h5")
    sweep = tmp_path / "s.toml"
    sweep.write_text('tta = true\n[[head]]\nname = "logreg"\npooling = "flatten"\nC = 0.1\n')
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache)
    row = result.winner
    head = load_head(result.run_dir)
    mean, y, clean = by_hand(head, cache, "validation")
    assert (row["val_accuracy"], row["val_log_loss"]) == pytest.approx(score(mean, y, head.classes_))
    assert score(clean, y, head.classes_)[1] != pytest.approx(row["val_log_loss"])  # the views were used
    mean_test, y_test, _ = by_hand(head, cache, "test")
    assert (row["test_accuracy"], row["test_log_loss"]) == pytest.approx(score(mean_test, y_test, head.classes_))
    # passes: 60 train rows + 40 validation and 40 test images x (1 + 2 views), at 224-px FLOPs
    assert row["passes"] == pytest.approx((60 + 3 * 40 + 3 * 40) * FLOPS / accounting.RECIPE_PASS_FLOPS)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["tta"]["views"] == 2 and info["tta"]["seed"] == 0


def test_train_on_tta_adds_train_views_and_without_views_tta_is_refused(tmp_path):
    cache = tta_cache(tmp_path / "c.h5", views=1)
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\ntrain_on = ["clean", "tta"]\n')
    rows = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache).rows
    assert [r["train_rows"] for r in rows] == [60, 120]
    plain = tmp_path / "plain.h5"
    x, y = separable(10)
    store.write_cache(
        plain,
        {
            s: {"features": x, "labels": y, "paths": [f"{s}/{i}" for i in range(len(y))]}
            for s in ("train", "validation")
        },
        synthetic_meta(x, ("a", "b")),
    )
    with pytest.raises(ConfigError, match="TTA_VIEWS=N"):
        run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1, tta=True), plain)
    sweep.write_text('tta = "yes"\n[[head]]\nname = "logreg"\n')
    with pytest.raises(ConfigError, match="tta must be true or false"):
        run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), plain)


def test_recipe_pass_constant_matches_the_registry():
    from pipeline.features.registry import flops_per_image

    assert flops_per_image(accounting.RECIPE_SIZE, "block5_pool", "vgg16") == accounting.RECIPE_PASS_FLOPS
