"""Stage two at scale: heads that train from the HDF5 file in chunks when the training
features do not fit a memory budget (the warm-started C path is ``regpath``).

They keep the heads' estimator contract: what comes out is an ordinary fitted ``LogRegHead``
/ ``SVMHead`` / ``MLPHead`` (``model_`` a scikit-learn pipeline or a Keras model), so the
sweep scores, persists and predicts with it as with any other head.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.memory import auto_budget, gb
from pipeline.core.vocab import STREAM_MODES, check_choice
from pipeline.train.heads import LogRegHead, MLPHead, SVMHead, _check_finite, pool_features, training_classes

log = logging.getLogger(__name__)

# in-memory training holds the features about three times: the loaded split, the standardised
# copy, and joblib's memory-mapped copy for the worker processes
IN_MEMORY_FACTOR = 3


@dataclass(frozen=True)
class StreamSource:
    """Where the training rows live when they are streamed: one cache file, one or more splits."""

    cache: Path
    splits: tuple[str, ...]
    rows: int
    feature_shape: tuple[int, ...]
    chunk_rows: int = 4096
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(features, labels, row numbers) blocks of ``chunk_rows`` rows; a generator shuffles
        the block order and the rows within each block (an epoch sees every row once)."""
        import h5py

        plan, offset = [], 0
        with h5py.File(self.cache, "r") as f:
            for split in self.splits:
                n = f[split]["labels"].shape[0]
                plan += [
                    (split, start, min(n, start + self.chunk_rows), offset + start)
                    for start in range(0, n, self.chunk_rows)
                ]
                offset += n
        if rng is not None:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        try:
            with h5py.File(self.cache, "r") as f:
                for split, start, stop, first in plan:
                    x = f[split]["features"][start:stop]
                    y = f[split]["labels"][start:stop].astype(np.int64)
                    rows = np.arange(first, first + len(y))
                    if rng is not None:
                        order = rng.permutation(len(y))
                        x, y, rows = x[order], y[order], rows[order]
                    yield x, y, rows
        except OSError as e:  # a fletcher32 mismatch surfaces here
            raise CacheError(
                f"{self.cache}: streaming {self.splits} failed a checksum or could not be read ({e}); "
                "rebuild it with `make extract FORCE=1`"
            ) from e


def plan_training(
    cache: Path,
    splits: Sequence[str],
    sizes: dict[str, int],
    feature_shape: Sequence[int],
    mode: str,
    budget: int | None,
) -> tuple[bool, str]:
    """Whether to stream, and a sentence for the run saying which and why."""
    check_choice("stream", mode, STREAM_MODES)
    rows = sum(sizes[s] for s in splits)
    need = rows * int(np.prod(feature_shape)) * 4 * IN_MEMORY_FACTOR
    limit = budget if budget is not None else auto_budget()
    origin = "memory budget" if budget is not None else "memory budget (auto: half of RAM)"
    if mode == "on":
        return True, f"streaming train from {cache.name} in chunks (--stream on); {rows} rows"
    if mode == "off":
        return False, f"train held in memory (--stream off): about {gb(need)} for {rows} rows"
    if need > limit:
        return True, (
            f"streaming train from {cache.name} in chunks: {rows} rows need about {gb(need)} in memory, "
            f"over the {origin} of {gb(limit)}"
        )
    return False, f"train held in memory: about {gb(need)} for {rows} rows, within the {origin} of {gb(limit)}"


def source_for(cache: Path, splits: Sequence[str], feature_shape: Sequence[int]) -> StreamSource:
    """A StreamSource with the labels read (8 bytes a row: they always fit)."""
    import h5py

    with h5py.File(cache, "r") as f:
        labels = np.concatenate([f[s]["labels"][()].astype(np.int64) for s in splits])
    return StreamSource(cache, tuple(splits), len(labels), tuple(feature_shape), labels=labels)


# --------------------------------------------------------------------------- streaming heads


def fit_streaming(head: Any, source: StreamSource, epochs: int = 5) -> Any:
    """Fit ``head`` from the file in chunks: standardisation by ``partial_fit`` in one pass,
    then a linear head by SGD ``partial_fit`` (log loss for logreg; hinge for svm, its
    probabilities a softmax of margins) for ``epochs`` passes, or the MLP through Keras."""

    head._validate_params()
    classes = training_classes(source.labels)
    if isinstance(head, MLPHead):
        return _fit_mlp_streaming(head, source, classes)
    if not isinstance(head, LogRegHead | SVMHead):
        raise ConfigError(f"head {type(head).__name__} cannot be trained by streaming")
    return _fit_linear_streaming(head, source, classes, epochs)


def _pooled_blocks(
    head: Any, source: StreamSource, rng: np.random.Generator | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:

    for x, y, _ in source.blocks(rng):
        z = pool_features(x, head.pooling)
        _check_finite(z)
        yield z, y


def _fit_linear_streaming(head: Any, source: StreamSource, classes: np.ndarray, epochs: int) -> Any:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for z, _ in _pooled_blocks(head, source, None):
        scaler.partial_fit(z)
    n = source.rows
    # LogisticRegression minimises C * sum(loss) + |w|^2 / 2; SGD minimises mean(loss) + alpha |w|^2 / 2
    alpha = 1.0 / (head.C * n)
    class_weight = head._class_weight_by_index(classes)
    if class_weight == "balanced":
        counts = np.bincount(np.searchsorted(classes, source.labels), minlength=len(classes))
        class_weight = {i: n / (len(classes) * c) for i, c in enumerate(counts)}
    sgd = SGDClassifier(
        loss="log_loss" if isinstance(head, LogRegHead) else "hinge",
        alpha=alpha,
        class_weight=class_weight,
        random_state=head.random_state,
        learning_rate="optimal",
        average=True,
    )
    rng = np.random.default_rng(head.random_state)
    labels = np.arange(len(classes))
    for _ in range(epochs):
        for z, y in _pooled_blocks(head, source, rng):
            sgd.partial_fit(scaler.transform(z), np.searchsorted(classes, y), classes=labels)
    head.model_ = Pipeline([("standardscaler", scaler), ("sgd", sgd)])
    head.classes_, head.n_features_in_, head.n_iter_ = classes, int(scaler.n_features_in_), epochs
    head.streamed_ = True
    return head


def _fit_mlp_streaming(head: Any, source: StreamSource, classes: np.ndarray) -> Any:
    """Keras reads batches from the file through a generator (chunks in shuffled order,
    rows shuffled within a chunk); early stopping holds out a random ``validation_fraction``
    of the rows (at most 5,000, kept in memory) that are never trained on."""
    import keras

    keras.utils.set_random_seed(head.random_state)
    rng = np.random.default_rng(head.random_state)
    k = len(classes)
    held = np.zeros(source.rows, bool)
    if head.validation_fraction > 0 and head.patience > 0:
        n_val = min(5000, round(head.validation_fraction * source.rows))
        held[rng.choice(source.rows, size=n_val, replace=False)] = True
    val = None
    if held.any():
        parts = [
            (pool_features(x[held[r]], head.pooling), np.searchsorted(classes, y[held[r]]))
            for x, y, r in source.blocks(None)
            if held[r].any()
        ]
        val = (np.concatenate([z for z, _ in parts]), np.concatenate([t for _, t in parts]).astype(np.float32))
    n_train = int(source.rows - held.sum())

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:  # Keras counts steps_per_epoch; every pass is a fresh shuffle of the file
            for x, y, r in source.blocks(rng):
                keep = ~held[r]
                z, t = pool_features(x[keep], head.pooling), np.searchsorted(classes, y[keep]).astype(np.float32)
                for s in range(0, len(t), head.batch_size):
                    yield z[s : s + head.batch_size], t[s : s + head.batch_size]

    width = int(np.prod(source.feature_shape)) if head.pooling == "flatten" else int(source.feature_shape[-1])
    model, callbacks = head.compiled_model(width, k, early_stopping=val is not None)
    history = model.fit(
        batches(),
        steps_per_epoch=int(np.ceil(n_train / head.batch_size)),
        epochs=head.epochs,
        validation_data=val,
        callbacks=callbacks,
        verbose=head.verbose,
    )
    head.history_ = {key: [float(v) for v in values] for key, values in history.history.items()}
    head.model_, head.classes_, head.n_features_in_ = model, classes, width
    head.n_iter_ = len(next(iter(head.history_.values()), []))
    head.streamed_ = True
    return head
