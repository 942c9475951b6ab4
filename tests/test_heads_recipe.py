"""pipeline.train.heads, seeds_recipe and sweep_file without TensorFlow: pooling, the checks of fit
and predict, the scikit-learn heads' models, the seeds' Keras recipe and the sweep file's head tables,
each checked exactly (issue 16: `make mutate` runs this file; TESTING.md). The Keras MLP is tested in
test_heads*.py (needs TensorFlow)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.core.errors import ConfigError
from pipeline.train import heads, seeds_recipe, sweep_file
from pipeline.train.heads import LogRegHead, SVMHead, pool_features
from pipeline.train.sweep_file import make_head

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


def test_svm_calibrates_on_one_held_out_third():
    x, y = separable(10)
    head = SVMHead(C=0.2, class_weight="balanced", max_iter=77, random_state=3).fit(x, y)
    scaler, model = (step for _, step in head.model_.steps)
    assert isinstance(scaler, StandardScaler) and isinstance(model, CalibratedClassifierCV)
    assert isinstance(model.cv, StratifiedShuffleSplit) and len(model.calibrated_classifiers_) == 1
    assert (model.cv.n_splits, model.cv.test_size, model.cv.random_state) == (1, 1 / 3, 3)
    assert SVMHead().fit(*separable(3, 3)).model_.steps[-1][1].cv.n_splits == 1  # three rows per class suffice
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
    margins = np.array([[1000.0, 0.0, -1000.0], [-1000.0, -1000.0, -3000.0]])  # shifted per row, not overall
    head.model_ = type("M", (), {"decision_function": lambda self, z: margins})()
    np.testing.assert_allclose(head._predict_proba(np.zeros((2, 1))), [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    head.model_ = type("M", (), {"decision_function": lambda self, z: np.array([800.0, -800.0])})()
    np.testing.assert_allclose(head._predict_proba(np.zeros((2, 1))), [[0.0, 1.0], [1.0, 0.0]])


def test_svm_class_weight_reaches_the_calibration_and_weights_the_svm_once():
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=300, centers=2, random_state=0, cluster_std=20)  # classes overlap
    plain = SVMHead().fit(x, y)
    weighted = SVMHead(class_weight={0: 1000.0, 1: 0.0001}).fit(x, y)
    assert (plain.predict(x) == 0).mean() < 0.7  # an unweighted sigmoid puts the threshold back
    assert (weighted.predict(x) == 0).mean() > 0.87  # (the bar of check_class_weight_classifiers)
    z = weighted.model_[0].transform(x)
    train, _ = next(StratifiedShuffleSplit(1, test_size=1 / 3, random_state=0).split(z, y))
    once = LinearSVC(C=0.1, class_weight={0: 1000.0, 1: 0.0001}, max_iter=5000, random_state=0).fit(z[train], y[train])
    (fitted,) = weighted.model_[-1].calibrated_classifiers_
    np.testing.assert_allclose(fitted.estimator.coef_, once.coef_, rtol=1e-3)  # class_weight, not squared
    assert "_metadata_request" not in vars(fitted.estimator)  # nothing beyond plain scikit-learn parts is saved


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
    assert sweep_file.head_tables({"head": [{"name": "svm", "C": 1}, {"name": "logreg"}]}, "f.toml") == [
        (1, "svm", {"C": 1}),
        (2, "logreg", {}),
    ]
    message = 'f.toml: no [[head]] tables; add at least one, e.g. [[head]] name = "logreg"'
    for spec in ({}, {"head": []}, {"head": {"name": "svm"}}):
        assert _error(ConfigError, sweep_file.head_tables, spec, "f.toml") == message
    assert _error(ConfigError, sweep_file.head_tables, {"head": [{"name": "svm"}, 3]}, "f.toml") == (
        "f.toml: head #2 must be a [[head]] table with a name; received 3"
    )
    assert _error(ConfigError, sweep_file.head_tables, {"head": [{"C": 1}]}, "f.toml") == (
        "f.toml: unknown head None; available: ['logreg', 'mlp', 'svm']"
    )
    table = {"name": "svm", "C": 1}
    sweep_file.head_tables({"head": [table]}, "f.toml")
    assert table == {"name": "svm", "C": 1}  # the caller's table is left as it was


# ----------------------------------------------------------------------------- the seeds' head, recorded
#
# These tests never load TensorFlow: a stand-in ``keras`` module records what the head asks
# of Keras (layers, loss, optimiser, callbacks, fit arguments), so the seeds' recipe is
# checked call by call. test_heads_sweep.py runs the same head on the real Keras.


class _Recorder:
    """A stand-in for the parts of ``keras`` the heads use; every call lands in ``calls``."""

    def __init__(self):
        self.calls: list[tuple] = []
        rec = self

        class Tensor:
            def __init__(self, chain):
                self.chain = chain

        class Layer:
            def __init__(self, kind, **kw):
                self.kind, self.kw = kind, kw

            def __call__(self, x):
                return Tensor([*x.chain, (self.kind, self.kw)])

        class Model:
            def __init__(self, inputs, outputs):
                self.inputs, self.chain = inputs, outputs.chain
                assert isinstance(inputs, Tensor), "keras.Model needs its input tensor"
                rec.calls.append(("Model", outputs.chain))
                self.predicted = None

            def compile(self, **kw):
                rec.calls.append(("compile", kw))

            def fit(self, x, y, **kw):
                rec.calls.append(("fit", x, y, kw))
                return types.SimpleNamespace(history={"loss": [np.float32(0.5), 0.25]})

            def predict(self, z, **kw):
                rec.calls.append(("predict", z, kw))
                return self.predicted

            def save(self, path):
                rec.calls.append(("save", path))
                if not str(path).endswith(".keras"):  # as Keras 3 does
                    raise ValueError(f"Invalid filepath extension for saving: {path}")
                with open(path, "wb") as f:
                    f.write(b"model bytes")

        self.Model = Model
        self.Input = lambda shape: rec.calls.append(("Input", shape)) or Tensor([("Input", shape)])
        self.layers = types.SimpleNamespace(
            Dense=lambda units, **kw: Layer("Dense", units=units, **kw),
            Dropout=lambda rate, **kw: Layer("Dropout", rate=rate, **kw),
        )
        self.optimizers = types.SimpleNamespace(RMSprop=lambda **kw: ("RMSprop", kw))
        self.callbacks = types.SimpleNamespace(EarlyStopping=lambda **kw: ("EarlyStopping", kw))
        self.utils = types.SimpleNamespace(set_random_seed=lambda seed: rec.calls.append(("seed", seed)))

        def load_model(path, **kw):
            if not str(path).endswith(".keras"):
                raise ValueError(f"File format not supported: {path}")
            with open(path, "rb") as f:
                rec.calls.append(("load_model", f.read(), kw))
            return "loaded"

        self.saving = types.SimpleNamespace(load_model=load_model)
        self.__version__ = "3.14.0"  # the first release whose safe mode featcache trusts

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def fake(monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "keras", rec)
    # the stand-in has no TensorFlow optimizer to fuse: the fused RMSprop update is checked
    # against real Keras in test_sweep_fast
    monkeypatch.setattr(heads, "FUSED_UPDATE", False)
    return rec


def _chain(units, rate, out_units, activation):
    return [
        ("Dense", {"units": units, "activation": "relu", "name": "head_dense"}),
        ("Dropout", {"rate": rate, "name": "head_dropout"}),
        ("Dense", {"units": out_units, "activation": activation, "name": "head_out"}),
    ]


def test_seeds_head_is_dense_dropout_then_sigmoid_or_softmax(fake):
    x = fake.Input((8,))
    assert seeds_recipe.seeds_head(x, 2).chain[1:] == _chain(256, 0.5, 1, "sigmoid")
    assert seeds_recipe.seeds_head(x, 3, units=7, dropout=0.25).chain[1:] == _chain(7, 0.25, 3, "softmax")


@pytest.mark.parametrize(("k", "loss"), [(2, "binary_crossentropy"), (4, "sparse_categorical_crossentropy")])
def test_compile_uses_rmsprop_and_the_seeds_loss(fake, k, loss):
    model = fake.Model(fake.Input((2,)), fake.Input((2,)))
    seeds_recipe.compile_for(model, k, 0.003)
    seeds_recipe.compile_for(model, k, 0.003, steps_per_execution=32)  # the MLP head's fused steps (issue 29)
    expected = {"optimizer": ("RMSprop", {"learning_rate": 0.003}), "loss": loss, "metrics": ["accuracy"]}
    assert fake.named("compile") == [
        ("compile", {**expected, "steps_per_execution": 1}),  # Keras's default: finetune compiles as before
        ("compile", {**expected, "steps_per_execution": 32}),
    ]


def test_compiled_model_has_early_stopping_on_held_out_loss(fake):
    head = heads.MLPHead(units=9, dropout=0.1, learning_rate=0.02, patience=4)
    model, callbacks = head.compiled_model(12, 3, early_stopping=True)
    assert fake.named("Input") == [("Input", (12,))]
    assert model.chain == [("Input", (12,)), *_chain(9, 0.1, 3, "softmax")]
    assert fake.named("compile")[0][1]["optimizer"] == ("RMSprop", {"learning_rate": 0.02})
    assert callbacks == [("EarlyStopping", {"monitor": "val_loss", "patience": 4, "restore_best_weights": True})]
    model, callbacks = head.compiled_model(12, 2, early_stopping=False)
    assert callbacks == [] and model.inputs.chain == [("Input", (12,))]
    assert fake.named("compile")[-1][1]["loss"] == "binary_crossentropy"


def test_seeds_head_defaults_and_limits():
    h = heads.MLPHead()
    assert (h.pooling, h.units, h.dropout, h.learning_rate, h.epochs) == ("flatten", 256, 0.5, 2e-5, 30)
    assert (h.batch_size, h.patience, h.validation_fraction, h.random_state, h.verbose) == (20, 5, 0.1, 0, 0)
    for ok in ({"dropout": 0.0}, {"patience": 0}, {"validation_fraction": 0.0}, {"verbose": 2}, {"units": 1}):
        make_head("mlp", **ok)
    for bad in (
        {"dropout": 1.0},
        {"verbose": 3},
        {"random_state": -1},
        {"validation_fraction": 1.0},
        {"units": 0},
        {"epochs": 0},
        {"batch_size": 0},
        {"patience": -1},
        {"learning_rate": 0.0},
    ):
        (name,) = bad
        assert f"The '{name}' parameter of MLPHead" in _error(ConfigError, make_head, "mlp", **bad)


def test_fit_holds_out_a_stratified_share_for_early_stopping(fake):
    x, y = separable(20, 2)
    head = heads.MLPHead(epochs=3, batch_size=5, patience=2, validation_fraction=0.2, random_state=4, verbose=1)
    head.fit(x, y)
    assert fake.named("seed") == [("seed", 4)]
    [(_, fit_x, fit_y, kw)] = fake.named("fit")
    assert fit_x.shape == (32, 32) and fit_y.dtype == np.float32 and np.bincount(fit_y.astype(int)).tolist() == [16, 16]
    vx, vy = kw.pop("validation_data")
    assert vx.shape == (8, 32) and np.bincount(vy).tolist() == [4, 4]
    assert kw == {
        "epochs": 3,
        "batch_size": 5,
        "callbacks": [("EarlyStopping", {"monitor": "val_loss", "patience": 2, "restore_best_weights": True})],
        "verbose": 1,
        "shuffle": True,
    }
    assert head.history_ == {"loss": [0.5, 0.25]} and all(type(v) is float for v in head.history_["loss"])
    assert head.model_.chain[-1] == ("Dense", {"units": 1, "activation": "sigmoid", "name": "head_out"})
    assert fake.named("Input") == [("Input", (32,))]


@pytest.mark.parametrize("settings", [{"validation_fraction": 0.0}, {"patience": 0}])
def test_fit_without_hold_out_trains_on_every_row(fake, settings, caplog):
    x, y = separable(10, 3)
    with caplog.at_level("WARNING", logger="pipeline.train.heads"):
        heads.MLPHead(**settings).fit(x, y)
    [(_, fit_x, fit_y, kw)] = fake.named("fit")
    assert len(fit_x) == 30 and fit_y.tolist() == y.tolist()
    assert kw["validation_data"] is None and kw["callbacks"] == []
    assert caplog.records == []  # asked for: nothing to warn about


def test_hold_out_with_patience_one_is_seeded(fake):
    x, y = separable(20, 2)

    def held_out(seed):
        heads.MLPHead(patience=1, validation_fraction=0.25, random_state=seed).fit(x, y)
        return fake.named("fit")[-1][3]["validation_data"][0]

    first = held_out(1)
    assert first.shape == (10, 32)
    np.testing.assert_array_equal(held_out(1), first)
    assert not np.array_equal(held_out(2), first)


def test_fit_too_small_to_hold_out_warns_and_trains_on_every_row(fake, caplog):
    x, y = separable(3, 2)
    with caplog.at_level("WARNING", logger="pipeline.train.heads"):
        heads.MLPHead(epochs=7, validation_fraction=0.1).fit(x, y)
    [(_, fit_x, _, kw)] = fake.named("fit")
    assert len(fit_x) == 6 and kw["validation_data"] is None and kw["callbacks"] == []
    [record] = caplog.records
    assert record.getMessage().startswith("MLPHead: cannot hold out a stratified validation_fraction=0.1 of 6 rows (")
    assert record.getMessage().endswith("); training all 7 epochs without early stopping")
    assert "test_size = 1 should be greater or equal to the number of classes = 2" in record.getMessage()


def test_probabilities_from_one_sigmoid_or_k_softmax_columns(fake):
    head = heads.MLPHead()
    head.model_ = fake.Model(fake.Input((1,)), fake.Input((1,)))
    head.model_.predicted = np.array([[0.25], [1.0]], np.float32)
    z = np.zeros((2, 4), np.float32)
    proba = head._predict_proba(z)
    assert proba.dtype == np.float64 and proba.tolist() == [[0.75, 0.25], [0.0, 1.0]]
    [(_, seen, kw)] = fake.named("predict")
    assert seen is z and kw == {"batch_size": 256, "verbose": 0}
    head.model_.predicted = np.array([[1.0, 1.0, 2.0], [3.0, 0.0, 1.0]], np.float32)
    np.testing.assert_allclose(head._predict_proba(z), [[0.25, 0.25, 0.5], [0.75, 0.0, 0.25]])


def test_a_fitted_head_pickles_its_model_as_bytes(fake, monkeypatch, tmp_path):
    import pipeline.core.layers

    registered = []
    monkeypatch.setattr(pipeline.core.layers, "preprocess_layer_class", lambda: registered.append(True))
    monkeypatch.chdir(tmp_path)
    head = heads.MLPHead(units=3)
    assert head.__getstate__()["units"] == 3 and "model_" not in head.__getstate__()
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        head.save_keras(tmp_path / "m.keras")
    head.model_ = fake.Model(fake.Input((1,)), fake.Input((1,)))
    state = head.__getstate__()
    assert state["model_"] == b"model bytes" and state["units"] == 3
    saved = Path(fake.named("save")[-1][1])
    assert saved.name == "head.keras" and not saved.parent.exists()  # a temporary folder, removed
    assert list(tmp_path.iterdir()) == []  # nothing written where the process runs
    assert head.model_ is not state["model_"]  # the live head keeps its model
    again = heads.MLPHead.__new__(heads.MLPHead)
    again.__setstate__(state)
    assert again.model_ == "loaded" and again.units == 3
    assert fake.named("load_model") == [("load_model", b"model bytes", {"safe_mode": True})]
    assert registered == [True]  # the preprocessing layer is known before any model loads
    assert list(tmp_path.iterdir()) == []  # loaded from a temporary folder, removed
    plain = heads.MLPHead.__new__(heads.MLPHead)
    plain.__setstate__({"units": 5, "model_": "live"})
    assert plain.model_ == "live" and registered == [True]
    head.save_keras(tmp_path / "m.keras")
    assert fake.named("save")[-1] == ("save", tmp_path / "m.keras")


def test_a_wrapped_fine_tuned_model_predicts_like_any_head(fake):
    from sklearn.exceptions import NotFittedError

    empty = heads.KerasModelHead(model="m", classes=[1, 2])
    assert (empty.model, empty.classes) == ("m", [1, 2])
    with pytest.raises(NotFittedError):
        empty.predict_proba(np.zeros((1, 2)))
    with pytest.raises(NotFittedError):
        empty.predict(np.zeros((1, 2)))
    assert _error(NotImplementedError, empty.fit, None, None) == (
        "KerasModelHead wraps a model trained by `featcache finetune`"
    )
    model = fake.Model(fake.Input((1,)), fake.Input((1,)))
    model.predicted = np.array([[0.2, 0.8], [0.9, 0.1]], np.float32)
    head = heads.KerasModelHead.wrap(model, [5, 7])
    assert head.model_ is model and head.pooling == "none"
    assert isinstance(head.classes_, np.ndarray) and head.classes_.tolist() == [5, 7]
    assert head.predict([[1, 2], [3, 4]]).tolist() == [7, 5]
    [(_, seen, _)] = fake.named("predict")
    assert isinstance(seen, np.ndarray) and seen.tolist() == [[1, 2], [3, 4]]
    np.testing.assert_allclose(head.predict_proba(np.zeros((2, 2))), [[0.2, 0.8], [0.9, 0.1]], rtol=1e-6)
