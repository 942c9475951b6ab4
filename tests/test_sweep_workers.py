"""Issue 29: a sweep with Keras heads keeps its loky workers (no "A worker stopped while some
jobs were given to the executor ... memory leak" warning, no worker replaced mid-sweep).

loky replaces a worker whose memory grows 300 MB past what it held after its first task.
Importing TensorFlow (~800 MB) in a worker whose first task was a scikit-learn head tripped
that check; ``sweep._keras_first`` imports Keras at the start of every task of a sweep that
has a Keras head, so the import is inside the first task's measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from pipeline.train import sweep

from conftest import cache_from, separable


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


_FIRST_IMPORT = """
import gc, sys
import sklearn.linear_model  # a stage-two process always holds scikit-learn first
{first}
print(sorted(m for m in ("matplotlib", "jax") if m in sys.modules), gc.get_freeze_count() > 100_000)
"""


@pytest.mark.parametrize(
    "first",
    [
        "from pipeline.train import sweep; sweep._keras_first(True)",  # every sweep worker's first task
        "from pipeline.core import layers; layers.load_model_safely(sys.argv[1])",  # a Keras winner, loaded
    ],
)
def test_stage_two_imports_keras_the_lean_way(first, tmp_path):
    """A sweep worker pays the Keras import before its first task, and a process that loads a
    Keras head pays it there: both through ``lean`` (issue 29: about half the plain import's
    CPU, twice per sweep), so Keras's optional matplotlib and JAX stay out (scikit-learn has
    brought pandas in already) and Keras's objects are frozen out of the collector's reach."""
    import keras

    path = tmp_path / "head.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = _FIRST_IMPORT.format(first=first)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.stdout.strip() == "[] True", out.stderr[-2000:]


_PRELOAD = """
import sys
from pathlib import Path
from pipeline.core.config import SweepConfig
from pipeline.train import sweep
seen = []
write_run = sweep._write_run
loaded = lambda: sorted(m for m in ("matplotlib.pyplot", "mlflow.tracking") if m in sys.modules)
sweep._write_run = lambda *a: seen.append(loaded()) or write_run(*a)
sweep.run_sweep(SweepConfig(sweep_file=Path(sys.argv[1]), runs_dir=Path(sys.argv[2]), n_jobs=1), sys.argv[3])
print(seen)
"""


def test_the_run_writers_libraries_are_imported_while_the_heads_fit(tmp_path):
    """matplotlib and MLflow (about 4.5 s of imports on 12,000 rows' sweep) are loaded by a
    thread during the fit, so ``_write_run`` finds them in place instead of importing them
    after the last fit with one core idle (issue 29)."""
    cache = cache_from(tmp_path / "c.h5", {s: separable(10, 3, seed=i) for i, s in enumerate(sweep.SPLITS)})
    grid = tmp_path / "grid.toml"
    grid.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    env = {**os.environ, "TRACK": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    argv = [sys.executable, "-c", _PRELOAD, str(grid), str(tmp_path / "runs"), str(cache)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert out.stdout.strip().splitlines()[-1:] == ["[['matplotlib.pyplot', 'mlflow.tracking']]"], out.stderr[-2000:]
    assert (tmp_path / "mlflow.db").exists()  # and the run was still tracked
