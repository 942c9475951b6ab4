"""Heads that train on cached feature maps, all scikit-learn estimators.

``__init__`` stores settings, ``fit`` validates them (one ``_parameter_constraints`` table
per head, checked by scikit-learn's own machinery) and returns ``self``, learned
attributes end in ``_``. X is the cached map (N,h,w,C) or already flat (N,D); ``pooling``
turns the map into a vector first: ``flatten`` (h*w*C, 8192 at 150 px), ``avg`` or ``max``
(C). The Keras MLP is imported lazily, so a scikit-learn-only sweep never loads TensorFlow.
Estimators only: the Keras recipe the MLP shares with finetune is ``seeds_recipe``, heads by
name from a sweep file are ``sweep_file``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import Tags
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from pipeline.core import layers, lean
from pipeline.core.vocab import POOLINGS
from pipeline.train.seeds_recipe import compile_for, seeds_head

log = logging.getLogger(__name__)


def pool_features(X: np.ndarray, pooling: str) -> np.ndarray:
    """(N,h,w,C) -> (N,D) float32; 2-D input passes through (already pooled)."""
    X = np.asarray(X)
    if X.ndim == 2:
        return X.astype(np.float32, copy=False)
    if X.ndim != 4:
        raise ValueError(f"features must be (N,h,w,C) or (N,D); received shape {X.shape}")
    if pooling == "flatten":
        return X.reshape(len(X), -1).astype(np.float32, copy=False)
    reduce = np.mean if pooling == "avg" else np.max
    return reduce(X.astype(np.float32, copy=False), axis=(1, 2))


def check_rows(Z: np.ndarray, y: np.ndarray) -> None:
    """Pooled training rows and their labels line up and hold only finite values (every fit
    path: in memory, the warm-started C path)."""
    if len(Z) != len(y):
        raise ValueError(f"X has {len(Z)} rows but y has {len(y)}")
    _check_finite(Z)


def training_classes(y: np.ndarray) -> np.ndarray:
    """The sorted classes of the training labels; a ValueError naming them when fewer than two
    (every fit path: in memory, the C path, streaming)."""
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"training labels hold a single class ({classes.tolist()}); a classifier needs two or more")
    return classes


def _check_finite(Z: np.ndarray) -> None:
    if not np.isfinite(Z).all():
        raise ValueError(
            f"features hold {int((~np.isfinite(Z)).sum())} NaN or infinite value(s); "
            "the cache may be corrupt: rebuild it (make extract FORCE=1)"
        )


class _PooledHead(ClassifierMixin, BaseEstimator):
    """Shared fit/predict plumbing: validate, pool, check labels, delegate to ``_fit``."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {"pooling": [StrOptions(set(POOLINGS))]}

    def __sklearn_tags__(self) -> Tags:
        """Dense, finite, numeric features and 1-D class labels; the maps' ranks (N,h,w,C)
        have no tag, so scikit-learn's checks see the flat (N,D) form."""
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # cached maps are dense: sparse X is refused by name
        tags.input_tags.allow_nan = False  # a NaN means a damaged cache: refused (_check_finite)
        tags.target_tags.required = True
        tags.classifier_tags.multi_label = False
        return tags

    def _pooled(self, X: Any, reset: bool) -> np.ndarray:
        """Maps (rank 3 and up) are pooled as they are; anything else is checked as a flat
        (N,D) table by scikit-learn (sparse, complex, 1-D and width errors, feature names)."""
        A = np.asarray(X)
        if A.ndim < 3:  # sparse input is a 0-d object array here: checked below
            shape = getattr(X, "shape", A.shape)
            if not reset and len(shape) == 2 and shape[1] != self.n_features_in_:  # scikit-learn's words, and ours
                raise ValueError(
                    f"X has {shape[1]} features, but {type(self).__name__} is expecting {self.n_features_in_} "
                    f"features as input: the head was fitted on {self.n_features_in_} (another layer, pooling "
                    "or input size?)"
                )
            X = validate_data(self, X, reset=reset, ensure_all_finite=False, ensure_min_samples=2 if reset else 1)
        elif reset and hasattr(self, "feature_names_in_"):
            del self.feature_names_in_  # refitted on maps: names from an earlier table no longer apply
        return pool_features(X, self.pooling)

    def fit(self, X: np.ndarray, y: np.ndarray) -> _PooledHead:
        self._validate_params()
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        Z = self._pooled(X, reset=True)
        y = column_or_1d(y, warn=True)
        if len(Z) != len(y):
            raise ValueError(f"X has {len(Z)} rows but y has {len(y)}")
        check_classification_targets(y)  # continuous or multi-output y: "Unknown label type"
        check_rows(Z, y)
        self.classes_ = training_classes(y)
        self.n_features_in_ = Z.shape[1]
        self._fit(Z, np.searchsorted(self.classes_, y))
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities, columns in ``classes_`` order."""
        check_is_fitted(self, "classes_")
        Z = self._pooled(X, reset=False)
        if Z.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Z.shape[1]} features after {self.pooling} pooling; the head was fitted on "
                f"{self.n_features_in_} (another layer or input size?)"
            )
        _check_finite(Z)
        return self._predict_proba(Z)

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "classes_")  # before self.classes_ is read: NotFittedError, not AttributeError
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def _fit(self, Z: np.ndarray, y: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _class_weight_by_index(self, classes: np.ndarray) -> Any:
        """``class_weight`` keyed by class label (scikit-learn's contract) re-keyed by the
        class index the inner model trains on; "balanced" and None pass through."""
        weights = getattr(self, "class_weight", None)
        if not isinstance(weights, dict):
            return weights
        index = {c: i for i, c in enumerate(classes.tolist())}
        unknown = [k for k in weights if k not in index]
        if unknown:
            raise ValueError(
                f"class_weight names class(es) {unknown} that the training labels do not hold "
                f"({classes.tolist()}); key it by label"
            )
        return {index[k]: w for k, w in weights.items()}

    def _predict_proba(self, Z: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(Z)


_LINEAR_CONSTRAINTS = {
    **_PooledHead._parameter_constraints,
    "C": [Interval(Real, 0, None, closed="neither")],
    "class_weight": [StrOptions({"balanced"}), dict, None],
    "max_iter": [Interval(Integral, 1, None, closed="left")],
    "random_state": ["random_state"],
}


class LogRegHead(_PooledHead):
    """Standardisation + multinomial logistic regression: the fast, strong baseline."""

    _parameter_constraints = _LINEAR_CONSTRAINTS

    def __init__(
        self,
        pooling: str = "flatten",
        C: float = 1.0,
        class_weight: Any = None,
        max_iter: int = 1000,
        random_state: int | None = 0,
    ):
        self.pooling = pooling
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def _fit(self, Z: np.ndarray, y: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model_ = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=self.C,
                class_weight=self._class_weight_by_index(self.classes_),
                max_iter=self.max_iter,
                random_state=self.random_state,
            ),
        )
        self.model_.fit(Z, y)
        self.n_iter_ = int(np.max(self.model_[-1].n_iter_))


class SVMHead(_PooledHead):
    """Standardisation + linear SVM, probabilities by sigmoid calibration on a held-out third."""

    _parameter_constraints = _LINEAR_CONSTRAINTS

    def __init__(
        self,
        pooling: str = "avg",
        C: float = 0.1,
        class_weight: Any = None,
        max_iter: int = 5000,
        random_state: int | None = 0,
    ):
        self.pooling = pooling
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def _fit(self, Z: np.ndarray, y: np.ndarray) -> None:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import StratifiedShuffleSplit
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        class_weight = self._class_weight_by_index(self.classes_)
        svm = LinearSVC(C=self.C, class_weight=class_weight, max_iter=self.max_iter, random_state=self.random_state)
        fewest = int(np.bincount(y).min())
        if fewest < 2:  # too few rows to calibrate: one SVM, probabilities from its margins
            self.model_ = make_pipeline(StandardScaler(), svm).fit(Z, y)
            self.n_iter_ = int(svm.n_iter_)
            return
        # issue 29: one stratified held-out third calibrates once every class has 3 rows; 3-fold
        # calibration fitted the one-vs-rest SVM three times (classes x 3 liblinear fits), about
        # 3x the cost for 0.2-0.5 point of validation accuracy (BENCHMARKS.md section 8)
        cv: Any = StratifiedShuffleSplit(1, test_size=1 / 3, random_state=self.random_state) if fewest >= 3 else fewest
        scaler, calibrated = StandardScaler(), CalibratedClassifierCV(svm, cv=cv)
        _fit_weighted_calibration(calibrated, scaler.fit_transform(Z), y, class_weight)
        self.model_ = make_pipeline(scaler, calibrated)
        self.n_iter_ = max(int(c.estimator.n_iter_) for c in calibrated.calibrated_classifiers_)  # the slowest fit

    def _predict_proba(self, Z: np.ndarray) -> np.ndarray:
        if hasattr(self.model_, "predict_proba"):
            return self.model_.predict_proba(Z)
        scores = self.model_.decision_function(Z)  # too few samples to calibrate: softmax of margins
        scores = np.column_stack([-scores, scores]) if scores.ndim == 1 else scores
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def _fit_weighted_calibration(calibrated: Any, Z: np.ndarray, y: np.ndarray, class_weight: Any) -> None:
    """Fit ``calibrated`` (a CalibratedClassifierCV over a class-weighted LinearSVC) with the
    sigmoid fitted on held-out rows weighted by ``class_weight`` too: an unweighted sigmoid
    moves the decision threshold back to where the class frequencies put it, undoing
    class_weight. The SVM keeps its own class_weight and is given no sample weights (they
    would weight it twice): scikit-learn's metadata routing sends them to the calibration only."""
    if class_weight is None:
        calibrated.fit(Z, y)
        return
    from sklearn import config_context
    from sklearn.utils.class_weight import compute_sample_weight

    svm = calibrated.estimator
    with config_context(enable_metadata_routing=True):
        svm.set_fit_request(sample_weight=False)
        try:
            calibrated.fit(Z, y, sample_weight=compute_sample_weight(class_weight, y))
        finally:  # the request is a fitting detail: a saved head holds plain scikit-learn parts (persist)
            for est in [svm, *(c.estimator for c in getattr(calibrated, "calibrated_classifiers_", []))]:
                vars(est).pop("_metadata_request", None)


class _NewModelNotRetracing(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning. Every Keras head builds its
    own model, so each one's first ``predict`` traces a new function; TensorFlow counts those as
    retraces of one function and, from the fifth model in a process on (a sweep worker fitting
    MLPs over folds and views), prints a paragraph each time that points at nothing wrong here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


_NOT_RETRACING = _NewModelNotRetracing()


class _KerasHead:
    """Keras-backed heads: probabilities from ``model_``, pickled as ``.keras`` bytes so
    joblib save/load round-trips (and a head can cross process boundaries)."""

    model_: Any  # set by fit (or KerasModelHead.wrap)

    def _predict_proba(self, Z: np.ndarray) -> np.ndarray:
        logging.getLogger("tensorflow").addFilter(_NOT_RETRACING)  # once: a filter is added only once
        p = np.asarray(self.model_.predict(Z, batch_size=256, verbose=0), np.float64)
        if p.shape[1] == 1:
            return np.column_stack([1 - p[:, 0], p[:, 0]])
        return p / p.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only within rounding

    def save_keras(self, path: str | os.PathLike) -> None:
        """The plain Keras model, for people who want it without this package."""
        check_is_fitted(self, "model_")
        self.model_.save(path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "model_" in state:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "head.keras")
                state["model_"].save(path)
                with open(path, "rb") as f:
                    state["model_"] = f.read()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("model_"), bytes):
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "head.keras")
                with open(path, "wb") as f:
                    f.write(state["model_"])
                state["model_"] = layers.load_model_safely(path)  # never Lambda bytecode
        self.__dict__.update(state)


STEPS_PER_EXECUTION = 32
"""Batches per call into the MLP's compiled train step (issue 29): the same updates in the
same order as one batch per call, without a Python round trip per batch (BENCHMARKS.md
section 8, "Six classes, 12,000 rows")."""

FUSED_UPDATE = True
"""Each MLP weight's RMSprop update as one XLA-fused pass (``seeds_recipe.fuse_rmsprop``,
issue 29): the same updates, one read and write of each weight per step instead of about seven."""


class MLPHead(_KerasHead, _PooledHead):
    """The seeds' Keras head: Dense(units, relu) -> Dropout -> Dense(1, sigmoid) or
    Dense(K, softmax), RMSprop. Early stopping on a stratified ``validation_fraction`` of
    the training data keeps the best weights (the seeds' ModelCheckpoint on val_loss),
    without ever looking at the validation split that the sweep selects on."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_PooledHead._parameter_constraints,
        "units": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": [Interval(Integral, 0, 2, closed="both")],
    }

    def __init__(
        self,
        pooling: str = "flatten",
        units: int = 256,
        dropout: float = 0.5,
        learning_rate: float = 2e-5,
        epochs: int = 30,
        batch_size: int = 20,
        patience: int = 5,
        validation_fraction: float = 0.1,
        random_state: int = 0,
        verbose: int = 0,
    ):
        self.pooling = pooling
        self.units = units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose

    def compiled_model(self, width: int, n_classes: int, early_stopping: bool) -> tuple[Any, list[Any]]:
        """The seeds' head on ``width`` inputs, compiled, and its callbacks (early stopping on
        held-out loss, best weights kept): one build for in-memory and streamed fits."""
        import keras

        inputs = keras.Input((width,))
        model = keras.Model(inputs, seeds_head(inputs, n_classes, self.units, self.dropout))
        compile_for(
            model, n_classes, self.learning_rate, steps_per_execution=STEPS_PER_EXECUTION, fused_update=FUSED_UPDATE
        )
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience, restore_best_weights=True)
        return model, [stop] if early_stopping else []

    def _fit(self, Z: np.ndarray, y: np.ndarray) -> None:
        keras = lean.import_keras()  # often this process's first Keras import: the lean one

        keras.utils.set_random_seed(self.random_state)
        k = len(self.classes_)
        fit_x, fit_y, val = Z, y, None
        if self.validation_fraction > 0 and self.patience > 0:
            from sklearn.model_selection import train_test_split

            try:
                fit_x, vx, fit_y, vy = train_test_split(
                    Z, y, test_size=self.validation_fraction, stratify=y, random_state=self.random_state
                )
                val = (vx, vy)
            except ValueError as e:  # too few samples per class to hold some out: train on all, no early stop
                log.warning(
                    "MLPHead: cannot hold out a stratified validation_fraction=%s of %d rows (%s); "
                    "training all %d epochs without early stopping",
                    self.validation_fraction,
                    len(y),
                    e,
                    self.epochs,
                )
                val = None
        model, callbacks = self.compiled_model(Z.shape[1], k, early_stopping=val is not None)
        history = model.fit(
            fit_x,
            fit_y.astype(np.float32),
            epochs=self.epochs,
            batch_size=self.batch_size,
            validation_data=val,
            callbacks=callbacks,
            verbose=self.verbose,
            shuffle=True,
        )
        self.history_ = {key: [float(v) for v in values] for key, values in history.history.items()}
        self.n_iter_ = len(next(iter(self.history_.values()), []))  # epochs run (early stopping may end sooner)
        self.model_ = model


class KerasModelHead(_KerasHead, ClassifierMixin, BaseEstimator):
    """A trained Keras model (a fine-tuned block5 + head) behind the same predict_proba as
    every head, so ``predict`` and the reports treat it like any winner. X goes to the
    model as it is: cached block4 maps, or uint8 images for an end-to-end model."""

    def __init__(self, model: Any = None, classes: Any = None):
        self.model = model
        self.classes = classes

    def fit(self, X: np.ndarray, y: np.ndarray) -> KerasModelHead:
        raise NotImplementedError("KerasModelHead wraps a model trained by `featcache finetune`")

    @classmethod
    def wrap(cls, model: Any, classes: np.ndarray) -> KerasModelHead:
        head = cls()
        head.model_, head.classes_, head.pooling = model, np.asarray(classes), "none"
        return head

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self._predict_proba(np.asarray(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "model_")  # before self.classes_ is read: NotFittedError, not AttributeError
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


HEADS: dict[str, type[_PooledHead]] = {"logreg": LogRegHead, "mlp": MLPHead, "svm": SVMHead}
