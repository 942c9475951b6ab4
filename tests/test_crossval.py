"""Cross-validated selection (``cv = K``): every row's validation figures are its out-of-fold
figures over train + validation, computed here by hand (folds, test-time views aligned by path,
training on them); an ensemble row's are the mean of its members'; the saved winner is the
config refitted on every train + validation image, and test is scored on it once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from test_tta_scoring import FLOPS, tta_cache

from pipeline.cache import store
from pipeline.core import accounting
from pipeline.core.config import SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.runs.folder import score
from pipeline.train import crossval, ensemble
from pipeline.train import sweep as sweep_mod
from pipeline.train.persist import load_winner
from pipeline.train.sweep import run_sweep
from pipeline.train.sweep_file import make_head

from conftest import separable, synthetic_meta

GRID = '[[head]]\nname = "logreg"\npooling = "flatten"\nC = [0.01, 1.0]\ntrain_on = ["clean", "tta"]\n'
FOLDS = 3


def labelled(cache, split):
    """(clean rows, labels, [each view's rows aligned by path]) of one split."""
    x, y, paths = store.load_split(cache, split)
    views = []
    for name in store.read_meta(cache).tta_splits(split):
        xv, _, pv = store.load_split(cache, name)
        row = {p: i for i, p in enumerate(pv)}
        views.append(xv[[row[p] for p in paths]])
    return x, y, views


def trval(cache):
    (xa, ya, va), (xb, yb, vb) = labelled(cache, "train"), labelled(cache, "validation")
    return np.concatenate([xa, xb]), np.concatenate([ya, yb]), [np.concatenate(v) for v in zip(va, vb, strict=True)]


def fit(c, train_on, x, y, views):
    """One config as the sweep fits it: seed 0; "tta" adds every view's rows after the clean ones."""
    xs, ys = [x], [y]
    if train_on == "tta":
        xs += views
        ys += [y] * len(views)
    return make_head("logreg", random_state=0, pooling="flatten", C=c).fit(np.concatenate(xs), np.concatenate(ys))


def scored(head, x, views):
    """The mean over the clean rows and their test-time views (tta = true)."""
    return np.mean([head.predict_proba(x), *(head.predict_proba(v) for v in views)], axis=0)


def oof_by_hand(cache, c, train_on):
    x, y, views = trval(cache)
    out = np.zeros((len(y), 2))
    for f, h in StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(x, y):
        head = fit(c, train_on, x[f], y[f], [v[f] for v in views])
        out[h] = scored(head, x[h], [v[h] for v in views])
    return out, y


def run(tmp_path, text, **options):
    (tmp_path / "s.toml").write_text(text)
    cfg = SweepConfig(sweep_file=tmp_path / "s.toml", runs_dir=tmp_path / "runs", n_jobs=1, **options)
    return run_sweep(cfg, tmp_path / "c.h5")


def test_rows_are_out_of_fold_over_train_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WARM_PATH", "0")  # each C fitted on its own, as by hand
    tta_cache(tmp_path / "c.h5", views=2)
    result = run(tmp_path, f"cv = {FOLDS}\ntta = true\nensemble = 2\n" + GRID)
    rows = result.rows
    assert len(rows) == 5 and rows[-1]["head"] == "ensemble"
    oofs = []
    for row in rows[:4]:
        c = json.loads(row["params"])["C"]
        proba, y = oof_by_hand(tmp_path / "c.h5", c, row["train_on"])
        assert (row["val_accuracy"], row["val_log_loss"]) == pytest.approx(score(proba, y, np.arange(2)), rel=1e-4)
        assert row["train_rows"] == 100 * (3 if row["train_on"] == "tta" else 1)
        # 100 labelled and 40 test images, each with its 2 views, embedded once
        assert row["passes"] == pytest.approx((100 * 3 + 40 * 3) * FLOPS / accounting.RECIPE_PASS_FLOPS)
        oofs.append(proba)
    members = json.loads(rows[-1]["params"])["members"]
    assert members == ensemble.top_k(rows[:4], 2)
    mean = np.mean([oofs[i] for i in members], axis=0)
    assert (rows[-1]["val_accuracy"], rows[-1]["val_log_loss"]) == pytest.approx(score(mean, y, np.arange(2)), rel=1e-4)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["cv"]["folds"] == FOLDS and info["cv"]["images"] == 100
    assert "out-of-fold accuracy" in result.table and result.selected_on == "out of fold"


def test_the_winner_is_refitted_on_train_and_validation_and_tested_once(tmp_path):
    tta_cache(tmp_path / "c.h5", views=1)
    result = run(tmp_path, f"cv = {FOLDS}\n" + GRID, tta=True)
    winner = result.winner
    info = json.loads((result.run_dir / "run.json").read_text())
    saved = load_winner(result.run_dir, info)
    x, y, views = trval(tmp_path / "c.h5")
    by_hand = fit(json.loads(winner["params"])["C"], winner["train_on"], x, y, views)
    xt, yt, vt = labelled(tmp_path / "c.h5", "test")
    np.testing.assert_allclose(saved.predict_proba(xt), by_hand.predict_proba(xt), atol=1e-5)
    assert (winner["test_accuracy"], winner["test_log_loss"]) == pytest.approx(
        score(scored(by_hand, xt, vt), yt, by_hand.classes_), rel=1e-4
    )
    assert sum("test_accuracy" in r for r in result.rows) == 1


def test_a_winning_ensemble_is_refitted_member_by_member(tmp_path, monkeypatch):
    tta_cache(tmp_path / "c.h5", views=1)
    monkeypatch.setattr(sweep_mod, "select", lambda rows: len(rows) - 1)  # the ensemble row wins
    result = run(tmp_path, f"cv = {FOLDS}\nensemble = 2\n" + GRID)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["ensemble"]["won"]
    saved = load_winner(result.run_dir, info)
    x, y, views = trval(tmp_path / "c.h5")
    xt, yt, _ = labelled(tmp_path / "c.h5", "test")
    members = json.loads(result.winner["params"])["members"]
    for member, i in zip(saved.members, members, strict=True):
        row = result.rows[i]
        expected = fit(json.loads(row["params"])["C"], row["train_on"], x, y, views)
        np.testing.assert_allclose(member.predict_proba(xt), expected.predict_proba(xt), atol=1e-5)
    assert result.winner["test_accuracy"] == pytest.approx(score(saved.predict_proba(xt), yt, saved.classes_)[0])


def test_without_cv_selection_stays_on_validation(tmp_path):
    tta_cache(tmp_path / "c.h5", views=1)
    result = run(tmp_path, "cv = 0\n" + GRID)
    rows = result.rows
    assert result.selected_on == "validation" and "validation accuracy" in result.table
    xv, yv, _ = labelled(tmp_path / "c.h5", "validation")
    xa, ya, va = labelled(tmp_path / "c.h5", "train")
    head = fit(json.loads(rows[0]["params"])["C"], rows[0]["train_on"], xa, ya, va)
    assert rows[0]["val_log_loss"] == pytest.approx(score(head.predict_proba(xv), yv, head.classes_)[1], rel=1e-4)


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("cv = 1\n" + GRID, {}, "received cv = 1"),
        ('cv = "5"\n' + GRID, {}, "received cv = '5'"),
        (GRID, {"cv": 60}, "cv = 60: a class has only 50 labelled image"),
        ('cv = 3\n[[head]]\nname = "logreg"\ntrain_on = "views"\n', {}, "received train_on ['views']"),
        (
            'cv = 3\nsearch = "random"\ntrials = 2\n[[head]]\nname = "logreg"\nC = {low = 0.01, high = 1.0}\n',
            {},
            "not a search",
        ),
    ],
)
def test_bad_cv_is_refused_naming_the_value(tmp_path, text, options, message):
    tta_cache(tmp_path / "c.h5", views=1)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(tmp_path, text, **options)


def test_folds_are_stratified_seeded_and_cover_every_image_once():
    y = np.repeat([0, 1, 2], [12, 9, 6])
    a, b = crossval.folds(y, 3, seed=4), crossval.folds(y, 3, seed=4)
    held = np.concatenate([h for _, h in a])
    assert sorted(held.tolist()) == list(range(len(y)))
    assert all(np.array_equal(x[1], z[1]) for x, z in zip(a, b, strict=True))
    assert all(np.bincount(y[h]).tolist() == [4, 3, 2] for _, h in a)
    with pytest.raises(ConfigError, match="cv = 7"):
        crossval.folds(y, 7, seed=0)


def test_excluded_rows_leave_the_folds_and_without_validation_train_alone_is_folded(tmp_path):
    tta_cache(tmp_path / "c.h5", views=1)
    (tmp_path / "x.csv").write_text("path\ntrain/0.png\ntrain/1.png\nvalidation/0.png\n")
    result = run(tmp_path, f"cv = {FOLDS}\n" + GRID, exclude=tmp_path / "x.csv")
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["cv"]["images"] == 98  # two train rows left out; validation keeps every row, as without cv
    assert info["exclude"] is not None and result.rows[0]["train_rows"] == 98
    x, y = separable(30, seed=0, spread=2.5)
    splits = {s: {"features": x, "labels": y, "paths": [f"{s}/{i}" for i in range(len(y))]} for s in ("train", "test")}
    store.write_cache(tmp_path / "c.h5", splits, synthetic_meta(x, ("a", "b")))  # no validation split
    result = run(tmp_path, f"cv = {FOLDS}\n" + GRID.replace('["clean", "tta"]', '"clean"'))
    info = json.loads((result.run_dir / "run.json").read_text())
    assert (info["cv"]["images"], info["cv"]["splits"]) == (60, "train")
    assert result.winner["test_accuracy"] is not None
