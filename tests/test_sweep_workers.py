"""Issue 29: a sweep with Keras heads keeps its loky workers (no "A worker stopped while some
jobs were given to the executor ... memory leak" warning, no worker replaced mid-sweep).

loky replaces a worker whose memory grows 300 MB past what it held after its first task.
Importing TensorFlow (~800 MB) in a worker whose first task was a scikit-learn head tripped
that check; ``sweep._keras_first`` imports Keras at the start of every task of a sweep that
has a Keras head, so the import is inside the first task's measurement."""

from __future__ import annotations

import warnings

import pytest

from pipeline.train import sweep

from conftest import separable


def _data() -> sweep.SweepData:
    train = separable(40, 3, shape=(2, 2, 16))
    return sweep.SweepData(train, separable(10, 3, seed=1, shape=(2, 2, 16)), None, None, "clean", [], None)


def test_uses_keras_names_the_keras_heads():
    assert sweep.uses_keras(["logreg", "mlp"]) and sweep.uses_keras(iter(["mlp"]))
    assert not sweep.uses_keras(["logreg", "svm"]) and not sweep.uses_keras([])


def test_fit_all_tells_workers_to_import_keras_first_only_for_keras_sweeps(monkeypatch):
    seen = []
    monkeypatch.setattr(
        sweep, "fit_path", lambda t, c, seed, threads, data, keras: seen.append(keras) or [({"index": i},) for i in t]
    )
    configs = [("logreg", {"C": 0.1, "pooling": "avg"}), ("svm", {"pooling": "avg"})]
    sweep.fit_all(configs, _data(), 0, 1)
    sweep.fit_all([*configs, ("mlp", {"pooling": "avg"})], _data(), 0, 1)
    sweep.fit_all(configs, _data(), 0, 1, keras=True)  # a search: later batches may hold an MLP
    assert seen == [False, False, True, True, True, True, True]  # one per task


@pytest.mark.slow
def test_a_keras_sweep_replaces_no_worker():
    """Both workers start with a scikit-learn head (the costly flatten fits go first), then
    take the MLPs: without Keras imported first, each is replaced after its first MLP and
    loky warns while MLPs are still queued."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)  # fresh workers: none holds TensorFlow yet
    configs = [
        ("logreg", {"pooling": "flatten", "C": 0.1}),
        ("logreg", {"pooling": "flatten", "C": 0.1, "class_weight": "balanced"}),
        *[
            ("mlp", {"pooling": p, "epochs": 1, "units": 8, "learning_rate": lr})
            for p in ("avg", "max")
            for lr in (1e-3, 1e-2)
        ],
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = sweep.fit_all(configs, _data(), 0, 2)
    assert [r[0]["head"] for r in results] == ["logreg", "logreg", "mlp", "mlp", "mlp", "mlp"]
    stopped = [str(w.message) for w in caught if "worker stopped" in str(w.message)]
    assert stopped == []
