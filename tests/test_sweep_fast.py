"""Issue 29: the sweep's fast paths against plain scikit-learn fits on a small 6-class cache.

Each config's scores equal the plain fit's within a stated tolerance, and the default grid
(its scikit-learn heads) picks the same winner both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.core import paths
from pipeline.core.config import SweepConfig
from pipeline.runs.folder import score
from pipeline.train import heads, regpath, sweep
from pipeline.train.heads import LogRegHead, SVMHead, pool_features
from pipeline.train.regpath import fit_logreg_path

from conftest import cache_from

REPO = Path(__file__).resolve().parents[1]
SHAPE = (2, 2, 16)
# lbfgs stops at a gradient tolerance of 1e-4: a warm-started and a cold fit of one convex
# problem agree on probabilities to about 1e-3, so accuracy may move by a row lying on a boundary
PROBA_ATOL = 2e-3
ROW = 1 / 240  # one validation row


def _six_classes():
    """Classes differ by a pattern over positions whose spatial mean is zero: flatten keeps it,
    avg pooling loses it, max pooling keeps part of it; noise makes configs differ."""
    rng = np.random.default_rng(29)
    centres = rng.normal(0, 1, (6, *SHAPE))
    centres -= centres.mean(axis=(1, 2), keepdims=True)

    def split(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        y = np.repeat(np.arange(6), n_per_class)
        x = 0.3 * centres[y] + r.normal(0, 1.0, (len(y), *SHAPE))
        return x.astype(np.float32), y

    return split(80, 0), split(40, 1)


def _plain(name: str, params: dict, seed: int):
    """The plain scikit-learn estimator for a config: what the head computed before issue 29
    (logistic regression fitted cold in float64; SVM calibrated on 3 folds)."""
    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=params["C"], max_iter=1000, random_state=seed))
    svm = LinearSVC(C=params["C"], max_iter=5000, random_state=seed)
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(svm, cv=3))


@pytest.mark.parametrize("pooling", ["flatten", "avg", "max"])
def test_the_warm_c_path_scores_as_plain_fits(pooling):
    (x, y), (xv, yv) = _six_classes()
    cs = [0.001, 0.01, 0.1]
    heads = [LogRegHead(pooling=pooling, C=c) for c in cs]
    fit_logreg_path(heads, x, y)
    for head, c in zip(heads, cs, strict=True):
        z, zv = pool_features(x, pooling).astype(np.float64), pool_features(xv, pooling).astype(np.float64)
        plain = _plain("logreg", {"C": c}, 0).fit(z, y)
        fast, slow = head.predict_proba(xv), plain.predict_proba(zv)
        np.testing.assert_allclose(fast, slow, atol=PROBA_ATOL)
        (a_fast, l_fast), (a_slow, l_slow) = score(fast, yv, head.classes_), score(slow, yv, plain.classes_)
        assert abs(a_fast - a_slow) <= ROW + 1e-12 and l_fast == pytest.approx(l_slow, abs=PROBA_ATOL)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_svm_is_the_plain_one_split_calibration(pooling):
    """The head is exactly scikit-learn's calibration on one stratified held-out third."""
    (x, y), (xv, _) = _six_classes()
    head = SVMHead(pooling=pooling, C=0.1, random_state=7).fit(x, y)
    svm = LinearSVC(C=0.1, max_iter=5000, random_state=7)
    split = StratifiedShuffleSplit(1, test_size=1 / 3, random_state=7)
    plain = make_pipeline(StandardScaler(), CalibratedClassifierCV(svm, cv=split)).fit(pool_features(x, pooling), y)
    np.testing.assert_allclose(head.predict_proba(xv), plain.predict_proba(pool_features(xv, pooling)), rtol=1e-6)


def test_the_default_grid_picks_the_plain_fits_winner(tmp_path):
    """The default grid's scikit-learn heads (the MLPs need TensorFlow and did not change),
    swept with the fast paths, against every config fitted plainly: same winner, its
    validation accuracy within the issue's 0.5 point."""
    spec = tomllib.loads(paths.default_sweep().read_text())
    heads = [h for h in spec["head"] if h["name"] != "mlp"]
    grid = tmp_path / "grid.toml"
    grid.write_text(
        "".join(
            f'[[head]]\nname = "{h["name"]}"\npooling = {h["pooling"]!r}\nC = {h["C"]!r}\n'.replace("'", '"')
            for h in heads
        )
    )
    (x, y), (xv, yv) = _six_classes()
    cache = cache_from(tmp_path / "c.h5", {"train": (x, y), "validation": (xv, yv)}, tuple("abcdef"))
    result = sweep.run_sweep(SweepConfig(sweep_file=grid, runs_dir=tmp_path / "runs", n_jobs=1), cache)
    configs = sweep.expand_grid(tomllib.loads(grid.read_text()))
    plain_rows = []
    for name, params in configs:
        pooling = params["pooling"]
        model = _plain(name, params, 0).fit(pool_features(x, pooling), y)
        accuracy, log_loss = score(model.predict_proba(pool_features(xv, pooling)), yv, model.classes_)
        plain_rows.append({"val_accuracy": accuracy, "val_log_loss": log_loss})
    fast_rows = result.rows
    assert len(fast_rows) == len(plain_rows) == 13  # 9 logistic regressions, 4 SVMs
    plain_best = sweep.select(plain_rows)
    assert sweep.select(fast_rows) == plain_best
    assert abs(fast_rows[plain_best]["val_accuracy"] - plain_rows[plain_best]["val_accuracy"]) <= 0.005
    for fast, plain, (name, _) in zip(fast_rows, plain_rows, configs, strict=True):
        if name == "logreg":  # same estimator, fast path: equal scores within the solver's tolerance
            assert abs(fast["val_accuracy"] - plain["val_accuracy"]) <= ROW + 1e-12
            assert fast["val_log_loss"] == pytest.approx(plain["val_log_loss"], abs=PROBA_ATOL)


def test_the_pooled_start_has_the_pooled_models_logits():
    """The flatten path's lbfgs starts from the average-pooled model written in flatten
    coordinates: on standardised flattened rows it gives that model's logits exactly."""
    (x, y), (xv, _) = _six_classes()
    x = np.abs(x) * np.arange(1, 1 + SHAPE[-1], dtype=np.float32)  # uneven scales per channel and position
    xv = np.abs(xv) * np.arange(1, 1 + SHAPE[-1], dtype=np.float32)
    scaler = StandardScaler().fit(pool_features(x, "flatten"))
    lr = LogisticRegression(C=0.01, max_iter=1000)
    coef, intercept = regpath.pooled_start(x, y, scaler, lr)
    pooled_scaler = StandardScaler().fit(pool_features(x, "avg"))
    pooled = LogisticRegression(C=0.01, max_iter=1000).fit(pooled_scaler.transform(pool_features(x, "avg")), y)
    expected = pooled.decision_function(pooled_scaler.transform(pool_features(xv, "avg")))
    got = scaler.transform(pool_features(xv, "flatten")) @ coef.T + intercept
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert regpath.pooled_start(pool_features(x, "flatten"), y, scaler, lr) is None  # (N,D): no map to pool


def test_the_pooled_start_is_where_the_flatten_path_begins(monkeypatch):
    """fit_logreg_path hands lbfgs the pooled start (not zeros) for a flatten path, and the
    optimum it reaches is the plain fit's (checked above per C)."""
    (x, y), _ = _six_classes()
    starts = []
    real_fit = LogisticRegression.fit

    def spy(self, X, y, sample_weight=None):
        starts.append(np.abs(getattr(self, "coef_", np.zeros(1))).sum())
        return real_fit(self, X, y, sample_weight)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    fit_logreg_path([LogRegHead(pooling="flatten", C=0.001)], x, y)
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0  # the pooled fit, then the flatten one from it
    starts.clear()
    fit_logreg_path([LogRegHead(pooling="flatten", C=0.001)], x, y, pooled_warm_start=False)
    assert starts == [0]


def test_the_mlp_fast_steps_train_as_one_batch_per_call(monkeypatch):
    """STEPS_PER_EXECUTION batches per graph call are the plain Keras fit (one batch per call):
    the same epochs, losses and probabilities, on a 6-class map with early stopping."""
    (x, y), (xv, _) = _six_classes()
    params = {"pooling": "flatten", "epochs": 4, "batch_size": 16, "learning_rate": 1e-3, "patience": 2}
    assert heads.STEPS_PER_EXECUTION > 1
    fast = heads.MLPHead(**params).fit(x, y)
    monkeypatch.setattr(heads, "STEPS_PER_EXECUTION", 1)
    plain = heads.MLPHead(**params).fit(x, y)
    assert fast.history_.keys() == plain.history_.keys()
    for key, values in fast.history_.items():
        assert values == pytest.approx(plain.history_[key], rel=1e-6), key
    np.testing.assert_allclose(fast.predict_proba(xv), plain.predict_proba(xv), rtol=1e-5, atol=1e-6)


def test_the_fused_rmsprop_update_trains_as_plain_keras(monkeypatch):
    """The XLA-fused RMSprop update (FUSED_UPDATE) is Keras's own RMSprop: the same epochs,
    losses and probabilities to float rounding; the fitted head survives a pickle round trip
    (a saved model names a plain RMSprop)."""
    import io

    import joblib

    (x, y), (xv, _) = _six_classes()
    params = {"pooling": "flatten", "epochs": 4, "batch_size": 16, "learning_rate": 1e-3, "patience": 2}
    assert heads.FUSED_UPDATE
    fused = heads.MLPHead(**params).fit(x, y)
    monkeypatch.setattr(heads, "FUSED_UPDATE", False)
    plain = heads.MLPHead(**params).fit(x, y)
    assert fused.history_.keys() == plain.history_.keys()
    for key, values in fused.history_.items():
        assert values == pytest.approx(plain.history_[key], rel=1e-5, abs=1e-6), key
    np.testing.assert_allclose(fused.predict_proba(xv), plain.predict_proba(xv), rtol=1e-4, atol=1e-6)
    buffer = io.BytesIO()
    joblib.dump(fused, buffer)
    np.testing.assert_allclose(joblib.load(io.BytesIO(buffer.getvalue())).predict_proba(xv), fused.predict_proba(xv))
    assert type(fused.model_.optimizer).__name__ == "RMSprop"
