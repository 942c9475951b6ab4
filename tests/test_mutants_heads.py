"""pipeline.heads without TensorFlow: pooling, the checks of fit and predict, the scikit-learn
heads' models and the sweep file's head tables, each checked exactly (issue 16: `make mutate`
runs this file; TESTING.md). The Keras MLP is tested in test_heads*.py (needs TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline import heads
from pipeline.errors import ConfigError
from pipeline.heads import LogRegHead, SVMHead, make_head, pool_features

from conftest import separable


def _error(exc, fn, *args, **kw) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    return str(info.value)


# ----------------------------------------------------------------------------- pooling


def test_pooling_gives_float32_vectors():
    x = np.arange(2 * 2 * 3 * 4, dtype=np.float64).reshape(2, 2, 3, 4)
    for pooling, expected in (
        ("flatten", x.reshape(2, -1)),
        ("avg", x.mean(axis=(1, 2))),
        ("max", x.max(axis=(1, 2))),
    ):
        out = pool_features(x, pooling)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, expected.astype(np.float32))
    flat = np.ones((3, 5), np.float16)
    assert pool_features(flat, "avg").dtype == np.float32 and pool_features(flat, "max").shape == (3, 5)
    assert pool_features([[1, 2]], "flatten").tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), (1, 1, 1, 1, 1)])
def test_other_ranks_are_refused_by_shape(shape):
    assert _error(ValueError, pool_features, np.zeros(shape), "avg") == (
        f"features must be (N,h,w,C) or (N,D); received shape {shape}"
    )


# ----------------------------------------------------------------------------- fit and predict


def test_fit_refuses_rows_that_do_not_match_labels():
    x, y = separable(3)
    assert _error(ValueError, LogRegHead().fit, x, y[:-1]) == "X has 6 rows but y has 5"


def test_fit_refuses_a_single_class_by_name():
    x, _ = separable(3)
    assert _error(ValueError, LogRegHead().fit, x, np.full(len(x), 7)) == (
        "training labels hold a single class ([7]); a classifier needs two or more"
    )


def test_non_finite_values_are_counted():
    x, y = separable(3)
    x[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    assert _error(ValueError, LogRegHead().fit, x, y) == (
        "features hold 3 NaN or infinite value(s); the cache may be corrupt: rebuild it (make extract FORCE=1)"
    )


def test_labels_may_be_any_sorted_values():
    x, y = separable(10, 3)
    labels = np.array([10, 20, 30])[y]
    head = LogRegHead().fit(x, labels)
    assert head.classes_.tolist() == [10, 20, 30]
    assert head.n_features_in_ == 2 * 2 * 8
    assert head.model_.steps[-1][1].classes_.tolist() == [0, 1, 2]  # the model sees class indices
    assert (head.predict(x) == labels).mean() > 0.9
    proba = head.predict_proba(x)
    assert proba.shape == (30, 3)
    np.testing.assert_array_equal(head.predict(x), head.classes_[proba.argmax(1)])


def test_predict_refuses_another_width_by_name():
    x, y = separable(5)
    head = LogRegHead(pooling="flatten").fit(x, y)
    assert _error(ValueError, head.predict_proba, x[:, :1]) == (
        "X has 16 features after flatten pooling; the head was fitted on 32 (another layer or input size?)"
    )
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan
    assert "1 NaN or infinite" in _error(ValueError, head.predict_proba, bad)


# ----------------------------------------------------------------------------- the models behind the heads


def test_logreg_is_a_standardised_logistic_regression_with_its_settings():
    x, y = separable(5)
    head = LogRegHead(C=0.3, class_weight="balanced", max_iter=50, random_state=4).fit(x, y)
    scaler, model = (step for _, step in head.model_.steps)
    assert isinstance(scaler, StandardScaler) and isinstance(model, LogisticRegression)
    assert (model.C, model.class_weight, model.max_iter, model.random_state) == (0.3, "balanced", 50, 4)
    d = LogRegHead()
    assert (d.pooling, d.C, d.class_weight, d.max_iter, d.random_state) == ("flatten", 1.0, None, 1000, 0)


def test_svm_calibrates_with_up_to_three_folds():
    x, y = separable(10)
    head = SVMHead(C=0.2, class_weight="balanced", max_iter=77, random_state=3).fit(x, y)
    scaler, model = (step for _, step in head.model_.steps)
    assert isinstance(scaler, StandardScaler) and isinstance(model, CalibratedClassifierCV)
    assert model.cv == 3
    svm = model.estimator
    assert isinstance(svm, LinearSVC)
    assert (svm.C, svm.class_weight, svm.max_iter, svm.random_state) == (0.2, "balanced", 77, 3)
    two = SVMHead().fit(*separable(2))  # two rows per class: two folds
    assert two.model_.steps[-1][1].cv == 2
    d = SVMHead()
    assert (d.pooling, d.C, d.class_weight, d.max_iter, d.random_state) == ("avg", 0.1, None, 5000, 0)


@pytest.mark.parametrize("k", [2, 3])
def test_svm_too_small_to_calibrate_gives_a_softmax_of_margins(k):
    x, y = separable(1, k)  # one row per class: no calibration
    head = SVMHead(pooling="flatten").fit(x, y)
    svm = head.model_.steps[-1][1]
    assert isinstance(svm, LinearSVC)
    proba = head.predict_proba(x)
    margins = head.model_.decision_function(pool_features(x, "flatten"))
    scores = np.column_stack([-margins, margins]) if k == 2 else margins
    expected = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, expected, rtol=1e-6)
    assert proba.shape == (len(y), k)
    assert (head.predict(x) == y).all()  # each row is its own class's support vector


def test_softmax_is_stable_for_large_margins():
    head = SVMHead()
    head.model_ = type("M", (), {"decision_function": lambda self, z: np.array([[1000.0, 0.0, -1000.0]])})()
    np.testing.assert_allclose(head._predict_proba(np.zeros((1, 1))), [[1.0, 0.0, 0.0]])
    head.model_ = type("M", (), {"decision_function": lambda self, z: np.array([800.0, -800.0])})()
    np.testing.assert_allclose(head._predict_proba(np.zeros((2, 1))), [[0.0, 1.0], [1.0, 0.0]])


# ----------------------------------------------------------------------------- make_head and head tables


def test_make_head_names_what_is_wrong():
    assert _error(ConfigError, make_head, "knn") == "unknown head 'knn'; available: ['logreg', 'mlp', 'svm']"
    assert _error(ConfigError, make_head, "logreg", gamma=1, alpha=2) == (
        "head 'logreg' has no parameter(s) ['alpha', 'gamma']; allowed: "
        "['C', 'class_weight', 'max_iter', 'pooling', 'random_state']"
    )
    err = _error(ConfigError, make_head, "svm", C=0)
    assert err.startswith("head 'svm': The 'C' parameter of SVMHead must be")  # the rest is scikit-learn's
    assert _error(ConfigError, make_head, "logreg", max_iter="x").startswith("head 'logreg': The 'max_iter' parameter")
    head = make_head("svm", C=2.0, pooling="max")
    assert isinstance(head, SVMHead) and (head.C, head.pooling) == (2.0, "max")
    assert make_head("logreg", max_iter=1).max_iter == 1


def test_head_tables_are_checked_and_numbered():
    assert heads.head_tables({"head": [{"name": "svm", "C": 1}, {"name": "logreg"}]}, "f.toml") == [
        (1, "svm", {"C": 1}),
        (2, "logreg", {}),
    ]
    message = 'f.toml: no [[head]] tables; add at least one, e.g. [[head]] name = "logreg"'
    for spec in ({}, {"head": []}, {"head": {"name": "svm"}}):
        assert _error(ConfigError, heads.head_tables, spec, "f.toml") == message
    assert _error(ConfigError, heads.head_tables, {"head": [{"name": "svm"}, 3]}, "f.toml") == (
        "f.toml: head #2 must be a [[head]] table with a name; received 3"
    )
    assert _error(ConfigError, heads.head_tables, {"head": [{"C": 1}]}, "f.toml") == (
        "f.toml: unknown head None; available: ['logreg', 'mlp', 'svm']"
    )
    table = {"name": "svm", "C": 1}
    heads.head_tables({"head": [table]}, "f.toml")
    assert table == {"name": "svm", "C": 1}  # the caller's table is left as it was
