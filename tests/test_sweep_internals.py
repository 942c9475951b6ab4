"""pipeline.train.sweep without TensorFlow: the grid, what the heads are trained and scored on, how
configs are grouped and spread over workers, and what a run writes, each checked exactly
(issue 16: `make mutate` runs this file; TESTING.md). Only scikit-learn heads, n_jobs=1."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from typing import ClassVar

import joblib
import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.config import SweepConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.runs.folder import score
from pipeline.train import splits, sweep

from conftest import cache_from, separable, synthetic_meta


def _error(exc, fn, *args, **kw) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    return str(info.value)


def _views_cache(path, n=6, views=2, validation=True, test=False):
    """train, validation (optional), test (optional) and ``views`` view splits of train."""
    x, y = separable(n, 2)
    splits = {"train": (x, y)}
    if validation:
        splits["validation"] = separable(n, 2, seed=1)
    if test:
        splits["test"] = separable(n, 2, seed=2)
    names = [f"train@aug{k}" for k in range(1, views + 1)]
    for k, name in enumerate(names, 1):
        splits[name] = (x + k, y)
    first = x
    return store.write_cache(
        path,
        {s: {"features": a, "labels": b, "paths": [f"{s}/{i}" for i in range(len(b))]} for s, (a, b) in splits.items()},
        synthetic_meta(first, ("a", "b"), augment={"views": views, "seed": 0, "policy": "p", "splits": names}),
    )


# ----------------------------------------------------------------------------- the grid


def test_expand_grid_lists_every_combination_in_order():
    spec = {"head": [{"name": "logreg", "C": [0.1, 1.0], "pooling": "avg"}, {"name": "svm", "train_on": "both"}]}
    assert sweep.expand_grid(spec) == [
        ("logreg", {"C": 0.1, "pooling": "avg"}),
        ("logreg", {"C": 1.0, "pooling": "avg"}),
        ("svm", {"train_on": "both"}),
    ]


def test_expand_grid_names_each_problem_with_its_source():
    assert _error(ConfigError, sweep.expand_grid, {"head": [{"name": "svm"}], "seed": 1, "a": 2}) == (
        "sweep file: unknown top-level key(s) ['a', 'seed']; allowed: ['head', 'tta', 'ensemble', 'cv'] "
        "(the seed comes from --seed / SEED=)"
    )
    spec = {"head": [{"name": "svm"}, {"name": "logreg", "pooling": [], "C": []}]}
    assert _error(ConfigError, sweep.expand_grid, spec, "s.toml") == (
        "s.toml: head #2 (logreg) has an empty list for ['C', 'pooling']; give at least one value"
    )
    spec = {"head": [{"name": "svm", "train_on": ["clean", "all"]}]}
    assert _error(ConfigError, sweep.expand_grid, spec, "s.toml") == (
        "s.toml: train_on must be one of ('clean', 'views', 'both', 'tta'); received train_on='all'"
    )
    spec = {"head": [{"name": "svm"}, {"name": "logreg", "gamma": 1}]}
    assert _error(ConfigError, sweep.expand_grid, spec, "s.toml") == (
        "s.toml: head #2: head 'logreg' has no parameter(s) ['gamma']; allowed: "
        "['C', 'class_weight', 'max_iter', 'pooling', 'random_state']"
    )


# ----------------------------------------------------------------------------- data


def test_check_classes_names_the_split_and_classes():
    meta = synthetic_meta(np.zeros((1, 1)), ("a", "b", "c", "d"))
    train = np.array([0, 1, 0, 1])
    assert sweep.check_classes("c.h5", meta, {"train": train, "validation": np.array([0, 1])}) is None
    assert _error(ConfigError, sweep.check_classes, "c.h5", meta, {"train": train, "test": np.array([3, 2, 0])}) == (
        "c.h5: split 'test' holds class(es) ['c', 'd'] that train lacks; no head can predict them "
        "(re-split the data so train has every class)"
    )
    assert _error(ConfigError, sweep.check_classes, "c.h5", meta, {"train": train, "validation": np.array([1, 1])}) == (
        "c.h5: split 'validation' holds a single class ('b'); a classifier needs two or more"
    )
    assert "split 'train' holds a single class ('a')" in _error(
        ConfigError, sweep.check_classes, "c.h5", meta, {"train": np.array([0, 0])}
    )


def test_load_views_takes_the_first_n_in_order(tmp_path):
    path = _views_cache(tmp_path / "c.h5", views=3)
    meta = store.read_meta(path)
    x, y = store.load_split(path, "train")[:2]
    got_x, got_y = splits.load_views(path, meta, 2)
    np.testing.assert_array_equal(got_x, np.concatenate([x + 1, x + 2]))
    assert got_y.tolist() == np.concatenate([y, y]).tolist()
    assert len(splits.load_views(path, meta, None)[1]) == 3 * len(y)
    plain = cache_from(tmp_path / "p.h5", {"train": separable(2, 2)}, ("a", "b"))
    assert splits.load_views(plain, store.read_meta(plain), None) is None


def _load(path, wants_views=False, **kw):
    cfg = SweepConfig(**{"n_jobs": 1, **kw})
    return sweep.load_data(cfg, path, store.read_meta(path), wants_views)


def test_load_data_reads_the_splits_in_memory(tmp_path):
    path = _views_cache(tmp_path / "c.h5", views=2, test=True)
    data = _load(path, wants_views=True, views=1, train_on="both")
    x, y = store.load_split(path, "train")[:2]
    np.testing.assert_array_equal(data.train[0], x)
    assert data.train[1].tolist() == y.tolist()
    np.testing.assert_array_equal(data.validation[0], store.load_split(path, "validation")[0])
    np.testing.assert_array_equal(data.test[0], store.load_split(path, "test")[0])
    np.testing.assert_array_equal(data.views[0], x + 1)  # the first view only
    assert data.default_train_on == "both" and data.streams is None
    assert len(data.notes) == 1 and data.notes[0].startswith("train held in memory")
    assert _load(path).views is None  # views are read only when a config trains on them


def test_no_train_split_is_a_cache_error(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"validation": separable(3, 2)}, ("a", "b"))
    assert _error(CacheError, _load, path) == f"{path} has no train split (it has ['validation']); nothing to train on"


def test_validation_is_carved_from_train_when_missing(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(10, 2)}, ("a", "b"))
    data = _load(path, carve_fraction=0.3, seed=2)
    assert len(data.validation[1]) == 6 and len(data.train[1]) == 14
    assert np.bincount(data.validation[1]).tolist() == [3, 3]  # stratified
    assert data.test is None
    assert data.notes[1:] == [
        "no validation split in the cache: carved a stratified 30% of train (6 rows, seed 2) for selection",
        "no test split in the cache: the winner is not tested",
    ]
    again = _load(path, carve_fraction=0.3, seed=2)
    np.testing.assert_array_equal(again.validation[0], data.validation[0])
    other = _load(path, carve_fraction=0.3, seed=3)
    assert not np.array_equal(other.validation[0], data.validation[0])


def test_a_train_split_too_small_to_carve_is_named(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(1, 2)}, ("a", "b"))
    err = _error(ConfigError, _load, path)
    assert err.startswith(f"{path}: no validation split, and train is too small to carve a stratified 20% from it (")


def test_views_need_a_real_validation_split(tmp_path):
    path = _views_cache(tmp_path / "c.h5", validation=False)
    assert _error(ConfigError, _load, path, wants_views=True, train_on="views") == (
        f"{path}: training on views needs a validation split in the cache (a validation set "
        "carved from train would hold images whose views are trained on)"
    )


def test_streaming_keeps_train_in_the_file(tmp_path):
    path = _views_cache(tmp_path / "c.h5", views=2, test=True)
    data = _load(path, wants_views=True, stream="on", views=1)
    y = store.load_split(path, "train")[1]
    assert data.train[0].shape == (0, 2, 2, 8) and data.train[1].tolist() == y.tolist()
    assert data.views[0].shape == (0, 2, 2, 8) and data.views[1].tolist() == y.tolist()
    assert sorted(data.streams) == ["both", "clean", "views"]
    assert data.streams["clean"].splits == ("train",)
    assert data.streams["views"].splits == ("train@aug1",)
    assert data.streams["both"].splits == ("train", "train@aug1")
    assert len(data.notes) == 1 and data.notes[0].startswith("streaming train from c.h5 in chunks (--stream on)")
    np.testing.assert_array_equal(data.test[0], store.load_split(path, "test")[0])
    np.testing.assert_array_equal(data.validation[1], store.load_split(path, "validation")[1])
    assert data.default_train_on == "clean"
    assert _load(path, stream="on", train_on="views", wants_views=True).default_train_on == "views"
    plain = _load(path, stream="on")
    assert plain.views is None and sorted(plain.streams) == ["clean"]
    no_test = _views_cache(tmp_path / "d.h5", views=0)
    assert _load(no_test, stream="on").notes[1:] == ["no test split in the cache: the winner is not tested"]


def test_streaming_needs_a_validation_split(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(5, 2)}, ("a", "b"))
    assert _error(ConfigError, _load, path, stream="on") == (
        f"{path}: streaming needs a validation split in the cache (a carved one would need train "
        "in memory); re-extract with a validation fraction, or pass --stream off"
    )


def test_streaming_checks_the_classes(tmp_path):
    x, _ = separable(3, 2)
    path = cache_from(
        tmp_path / "c.h5", {"train": separable(3, 2), "validation": (x, np.zeros(len(x), int))}, ("a", "b")
    )
    assert _error(ConfigError, _load, path, stream="on") == (
        f"{path}: split 'validation' holds a single class ('a'); a classifier needs two or more"
    )


# ----------------------------------------------------------------------------- fitting and scoring


def test_tf_threads_are_set_only_before_tensorflow_starts(monkeypatch):
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    sweep._tf_threads(None)
    assert "TF_NUM_INTRAOP_THREADS" not in sweep.os.environ
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    sweep._tf_threads(3)
    assert "TF_NUM_INTRAOP_THREADS" not in sweep.os.environ
    monkeypatch.delitem(sys.modules, "tensorflow")
    sweep._tf_threads(3)
    assert (sweep.os.environ["TF_NUM_INTRAOP_THREADS"], sweep.os.environ["TF_NUM_INTEROP_THREADS"]) == ("3", "1")


def _data(views=True, default="clean", streams=None):
    train = separable(10, 2)
    v = (train[0] + 0.5, train[1]) if views else None
    return sweep.SweepData(train, separable(5, 2, seed=1), separable(5, 2, seed=2), v, default, [], streams)


def test_fit_one_scores_on_validation_and_returns_the_head(monkeypatch):
    data = _data()
    row, history, blob = sweep.fit_one(3, "logreg", {"C": 0.5, "pooling": "avg", "train_on": "both"}, 7, None, data)
    head = joblib.load(io.BytesIO(blob))
    assert history is None
    assert head.get_params()["random_state"] == 7 and head.C == 0.5 and head.pooling == "avg"
    expected = score(head.predict_proba(data.validation[0]), data.validation[1], head.classes_)
    assert (row["val_accuracy"], row["val_log_loss"]) == expected
    assert {k: row[k] for k in ("index", "head", "pooling", "train_on", "train_rows", "n_features", "params")} == {
        "index": 3,
        "head": "logreg",
        "pooling": "avg",
        "train_on": "both",
        "train_rows": 40,
        "n_features": 8,
        "params": '{"C": 0.5}',
    }
    assert row["epochs"] is None and row["fit_seconds"] >= 0
    assert row["full_params"] == head.get_params()
    row, _, _ = sweep.fit_one(0, "svm", {"random_state": 1}, 7, None, data)
    assert row["train_on"] == "clean" and row["train_rows"] == 20 and row["params"] == '{"random_state": 1}'
    assert row["full_params"]["random_state"] == 1  # the config's own value wins over the sweep's seed


def test_fit_one_without_views_says_how_to_make_them():
    err = _error(ConfigError, sweep.fit_one, 0, "logreg", {"train_on": "views"}, 0, None, _data(views=False))
    assert err == (
        "train_on='views' needs augmented views in the cache; make them with `make extract AUGMENT=K` (same options)"
    )
    streaming = _data(views=False, streams={"clean": None})
    assert "train_on='both' needs augmented views" in _error(
        ConfigError, sweep.fit_one, 0, "logreg", {"train_on": "both"}, 0, None, streaming
    )


def test_a_c_path_gives_each_config_its_own_row_and_head(monkeypatch):
    from pipeline.train import regpath

    paths = []
    real = regpath.fit_logreg_path
    monkeypatch.setattr(regpath, "fit_logreg_path", lambda hs, *a, **k: paths.append(len(hs)) or real(hs, *a, **k))
    data = _data()
    path = {"pooling": "avg", "train_on": "views"}
    configs = [("logreg", {"C": 0.01, **path}), ("svm", {}), ("logreg", {"C": 1.0, **path})]
    results = sweep.fit_path([0, 2], configs, 5, None, data)
    assert paths == [2]  # one warm-started path for both
    assert [r["index"] for r, _, _ in results] == [0, 2]
    for (row, _, blob), c in zip(results, (0.01, 1.0), strict=True):
        head = joblib.load(io.BytesIO(blob))
        assert (head.C, head.random_state, row["params"], row["train_rows"]) == (c, 5, json.dumps({"C": c}), 20)
        assert (row["head"], row["train_on"], row["pooling"]) == ("logreg", "views", "avg")
        alone = sweep.fit_one(row["index"], "logreg", {"C": c, **path}, 5, None, data)[0]
        assert row["val_accuracy"] == alone["val_accuracy"]
        assert row["val_log_loss"] == pytest.approx(alone["val_log_loss"], rel=1e-3)
        assert row["fit_seconds"] > 0
    [(single, _, _)] = sweep.fit_path([1], configs, 5, None, data)
    assert single["head"] == "svm"
    [(one, _, _)] = sweep.fit_path([2], configs, 5, None, data)
    assert one["head"] == "logreg" and paths == [2]  # a path of one is a plain fit
    streamed = _data(streams={"clean": None})
    with pytest.raises(ConfigError, match="needs augmented views"):  # streamed: each config alone (fit_one)
        sweep.fit_path([0, 2], configs, 5, None, streamed)
    assert paths == [2]


class _Stub:
    """A fitted head as _scored sees it, with the history an MLP keeps."""

    pooling = "max"
    n_features_in_ = 4
    classes_ = np.array([0, 1])
    history_ = {"loss": [0.9, 0.5, 0.4]}  # noqa: RUF012

    def predict_proba(self, x):
        return np.tile([0.25, 0.75], (len(x), 1))

    def get_params(self):
        return {"units": 3}


def test_scored_rows_keep_epochs_and_sorted_params():
    data = _data()
    row, history, blob = sweep._scored(
        4, "mlp", {"units": 3, "epochs": 9, "pooling": "max"}, "clean", _Stub(), data.train[1], 1.5, data
    )
    assert row["epochs"] == 3 and history == {"loss": [0.9, 0.5, 0.4]}
    assert row["params"] == '{"epochs": 9, "units": 3}'
    assert (row["index"], row["head"], row["fit_seconds"], row["n_features"], row["pooling"]) == (
        4,
        "mlp",
        1.5,
        4,
        "max",
    )
    assert row["val_accuracy"] == 0.5 and row["val_log_loss"] == pytest.approx(-(np.log(0.25) + np.log(0.75)) / 2)
    assert isinstance(joblib.load(io.BytesIO(blob)), _Stub)


def test_tasks_group_c_paths_and_put_the_costly_first():
    configs = [
        ("svm", {"pooling": "avg"}),
        ("logreg", {"C": 0.1, "pooling": "avg"}),
        ("logreg", {"C": 1.0, "pooling": "avg"}),
        ("logreg", {"pooling": "flatten"}),
        ("mlp", {"pooling": "avg"}),
        ("logreg", {"C": 2.0, "pooling": "avg", "train_on": "views"}),
        ("mlp", {}),
    ]
    data = _data()
    # costs: svm avg 1, C path of two 2, logreg flatten 16, mlp avg 2, one-config C path 1, mlp flatten 32
    assert sweep._tasks(configs, data, True) == [[6], [3], [1, 2], [4], [0], [5]]
    assert sweep._tasks(configs, data, False) == [[6], [3], [4], [0], [1], [2], [5]]
    views_default = _data(default="views")
    assert sweep._tasks(configs[1:3] + configs[5:6], views_default, True) == [[0, 1, 2]]
    path = [("logreg", {"C": float(c), "pooling": "avg"}) for c in range(1, 17)]
    flat = [("logreg", {"pooling": "flatten"})]
    assert sweep._tasks(path + flat, data, True) == [list(range(16)), [16]]  # 16 avg fits cost one flatten fit
    assert sweep._tasks(path[:8] + flat, data, True) == [[8], list(range(8))]


class _Sequential:
    """joblib.Parallel run in this process, recording how it was asked to run."""

    seen: ClassVar[dict] = {}

    def __init__(self, n_jobs):
        _Sequential.seen["n_jobs"] = n_jobs

    def __call__(self, calls):
        return [fn(*a, **k) for fn, a, k in calls]


def _fit_all(monkeypatch, configs, n_jobs, cores=8, warm=None, env=None):
    import contextlib

    _Sequential.seen = {}
    monkeypatch.setattr(joblib, "Parallel", _Sequential)
    monkeypatch.setattr(
        joblib,
        "parallel_config",
        lambda **kw: _Sequential.seen.update(config=kw) or contextlib.nullcontext(),
    )
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: cores)
    tasks = []
    real = sweep.fit_path

    def recorded(t, configs, seed, threads, data, keras):
        tasks.append(t)
        _Sequential.seen.setdefault("threads", set()).add(threads)
        _Sequential.seen.setdefault("keras", set()).add(keras)
        return real(t, configs, seed, threads, data, keras)

    monkeypatch.setattr(sweep, "fit_path", recorded)
    if env is not None:
        monkeypatch.setenv("FEATCACHE_WARM_PATH", env)
    else:
        monkeypatch.delenv("FEATCACHE_WARM_PATH", raising=False)
    results = sweep.fit_all(configs, _data(), 0, n_jobs, warm)
    return results, tasks, _Sequential.seen


def test_fit_all_shares_the_cores_and_keeps_config_order(monkeypatch):
    configs = [("logreg", {"C": 0.1, "pooling": "avg"}), ("svm", {}), ("logreg", {"C": 1.0, "pooling": "avg"})]
    results, tasks, seen = _fit_all(monkeypatch, configs, n_jobs=4)
    assert [r[0]["index"] for r in results] == [0, 1, 2]
    assert tasks == [[0, 2], [1]]
    assert seen == {
        "n_jobs": 2,
        "config": {"backend": "loky", "inner_max_num_threads": 4},
        "threads": {4},
        "keras": {False},  # no Keras head: workers do not import it
    }
    _, _, seen = _fit_all(monkeypatch, configs, n_jobs=2, cores=3)
    assert seen["threads"] == {1} and type(seen["config"]["inner_max_num_threads"]) is int
    _, tasks, seen = _fit_all(monkeypatch, configs, n_jobs=-1, cores=3, env="0")
    assert tasks == [[0], [1], [2]] and seen["n_jobs"] == 3 and seen["config"]["inner_max_num_threads"] == 1
    _, tasks, seen = _fit_all(monkeypatch, configs, n_jobs=1, env="1")
    assert tasks == [[0, 2], [1]] and seen["n_jobs"] == 1 and seen["config"]["inner_max_num_threads"] is None
    _, tasks, _ = _fit_all(monkeypatch, configs, n_jobs=1, warm=False)
    assert tasks == [[0], [1], [2]]
    _, _, seen = _fit_all(monkeypatch, configs, n_jobs=-1, cores=None)
    assert seen["n_jobs"] == 1


# ----------------------------------------------------------------------------- the run


def test_varying_params_only_are_shown_per_head():
    rows = [
        {"head": "logreg", "params": json.dumps({"C": 0.1, "max_iter": 5, "train_on": "x"})},
        {"head": "logreg", "params": json.dumps({"C": 1.0, "max_iter": 5})},
        {"head": "svm", "params": json.dumps({"C": 0.1})},
        {"head": "logreg", "params": json.dumps({"C": 1.0, "max_iter": 5, "class_weight": "balanced"})},
    ]
    sweep._show_varying_params(rows)
    assert [r["params"] for r in rows] == [
        '{"C": 0.1}',
        '{"C": 1.0}',
        "{}",
        '{"C": 1.0, "class_weight": "balanced"}',
    ]


def test_run_sweep_writes_and_reports_its_winner(tmp_path):
    path = cache_from(
        tmp_path / "c.h5",
        {"train": separable(10, 2), "validation": separable(6, 2, seed=1), "test": separable(6, 2, seed=2)},
        ("a", "b"),
    )
    toml = tmp_path / "s.toml"
    toml.write_text('[[head]]\nname = "logreg"\nC = [0.001, 1.0]\npooling = "avg"\n[[head]]\nname = "svm"\n')
    cfg = SweepConfig(sweep_file=toml, runs_dir=tmp_path / "runs", n_jobs=1, seed=2, name="t", track=False)
    result = sweep.run_sweep(cfg, path)
    assert result.run_dir.parent == tmp_path / "runs" and result.run_dir.name.endswith("-t")
    assert [r["index"] for r in result.rows] == [0, 1, 2]
    assert [r["params"] for r in result.rows] == ['{"C": 0.001}', '{"C": 1.0}', "{}"]
    assert all("full_params" not in r for r in result.rows)
    best = sweep.select(result.rows)
    assert result.winner is result.rows[best] and result.winner["winner"] is True
    assert [bool(r.get("winner")) for r in result.rows].count(True) == 1
    assert [("test_accuracy" in r) for r in result.rows] == [i == best for i in range(3)]
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["kind"] == "classify" and info["seed"] == 2 and info["cache"] == str(path.resolve())
    assert info["sweep"] == {"head": [{"name": "logreg", "C": [0.001, 1.0], "pooling": "avg"}, {"name": "svm"}]}
    assert info["winner"]["params"]["random_state"] == 2 and info["winner"]["index"] == best
    assert info["config"]["name"] == "t" and info["cache_meta"]["class_names"] == ["a", "b"]
    assert info["notes"] == result.table.splitlines()[4:-1]
    assert {p.name for p in result.run_dir.iterdir()} >= {"results.csv", "run.json", "confusion.png", "report.html"}
    assert not (result.run_dir / "curves").exists()  # no MLP: no curves
    w = result.winner
    summary = result.table.splitlines()[-1]
    assert re.fullmatch(
        rf"3 configs in \d+\.\d s; winner #{best} {w['head']} \({w['pooling']} {re.escape(w['params'])}\): "
        rf"validation accuracy {w['val_accuracy']:.4f}, test accuracy {w['test_accuracy']:.4f}",
        summary,
    )
    assert result.table.splitlines()[0].split() == ["index", *sweep.COLUMNS[1:-1]]


def test_run_sweep_without_test_split_says_so(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(10, 2), "validation": separable(6, 2, seed=1)})
    toml = tmp_path / "s.toml"
    toml.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    result = sweep.run_sweep(SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)
    assert result.table.endswith(", no test split")
    assert "test_accuracy" not in result.winner
    assert "no test split in the cache: the winner is not tested" in result.table


def test_fit_one_times_the_fit_and_sets_worker_threads(monkeypatch):
    import time

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    t0 = time.perf_counter()
    row, _, _ = sweep.fit_one(0, "logreg", {}, 0, 2, _data())
    assert 0 < row["fit_seconds"] <= time.perf_counter() - t0
    assert sweep.os.environ["TF_NUM_INTRAOP_THREADS"] == "2"


def test_fit_one_streams_train_from_the_file(tmp_path):
    path = _views_cache(tmp_path / "c.h5", n=20, views=1)
    data = _load(path, wants_views=True, stream="on")
    row, _, blob = sweep.fit_one(0, "logreg", {"pooling": "avg", "train_on": "both"}, 0, None, data)
    assert row["train_rows"] == 80 and row["train_on"] == "both"
    head = joblib.load(io.BytesIO(blob))
    assert head.n_features_in_ == 8
    vx, vy = data.validation
    assert (head.predict(vx) == vy).mean() > 0.9


def test_show_varying_params_per_head_with_three_heads():
    rows = [
        {"head": "logreg", "params": json.dumps({"C": 0.1})},
        {"head": "svm", "params": json.dumps({"C": 0.1})},
        {"head": "mlp", "params": json.dumps({"units": 3})},
        {"head": "logreg", "params": json.dumps({"C": 1.0})},
    ]
    sweep._show_varying_params(rows)
    assert [r["params"] for r in rows] == ['{"C": 0.1}', "{}", "{}", '{"C": 1.0}']


def test_write_run_hands_each_report_its_inputs(tmp_path, monkeypatch):
    from pipeline.runs import plots, report, tracking
    from pipeline.runs.folder import RunFolder
    from pipeline.train.heads import LogRegHead

    calls: dict = {"curves": []}
    monkeypatch.setattr(plots, "plot_learning_curves", lambda *a: calls["curves"].append(a))
    monkeypatch.setattr(plots, "plot_confusion_matrix", lambda *a: calls.update(cm=a))
    monkeypatch.setattr(report, "sweep_report", lambda *a: calls.update(html=a))
    monkeypatch.setattr(tracking, "log_sweep", lambda tracker, *a: calls.update(track=(tracker, a)) or {"runs": 3})
    x, y = separable(5, 2)
    winner = LogRegHead(pooling="avg").fit(x, y)
    meta = synthetic_meta(x, ("a", "b", "c"))
    rows = [
        {"index": 0, "head": "logreg", "pooling": "avg", "params": "{}", "val_accuracy": 1.0, "winner": True},
        {"index": 1, "head": "mlp", "pooling": "flatten", "params": '{"units": 3}', "val_accuracy": 0.5},
        {"index": 2, "head": "mlp", "pooling": "max", "params": '{"units": 4}', "val_accuracy": 0.5},
    ]
    histories = [None, {"loss": [1.0, 0.5]}, {"loss": [0.7]}]
    full = [{"C": 1.0}, {"units": 3}, {"units": 4}]
    y_eval = np.array([0, 1, 1, 2])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    cfg = SweepConfig(seed=3, name="w", track=False, runs_dir=tmp_path)
    run = RunFolder(tmp_path, "w")
    cache = cache_from(tmp_path / "c.h5", {"train": (x, y)}, ("a", "b", "c"))
    spec = {"head": [{"name": "logreg"}]}
    outcome = sweep.SweepOutcome(rows, histories, winner, full, ("test", y_eval, proba), ["n"], 1.25)
    sweep._write_run(run, cfg, spec, cache, meta, outcome)
    curves = run.path / "curves"
    assert calls["curves"] == [
        ({"loss": [1.0, 0.5]}, curves / "01-mlp.png", '#1 mlp flatten {"units": 3}'),
        ({"loss": [0.7]}, curves / "02-mlp.png", '#2 mlp max {"units": 4}'),
    ]
    assert curves.is_dir()
    cm, names, path, title = calls["cm"]
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]  # rows: true a, b, c; columns: predicted
    assert (names, path, title) == (["a", "b", "c"], run.path / "confusion.png", "winner #0 (logreg) on test")
    assert calls["html"] == (run.path, rows, [c for c in sweep.COLUMNS if c != "winner"], meta.to_dict(), ["n"])
    tracker, args = calls["track"]
    assert tracker.on is False
    assert args[:5] == (run.path, meta, rows, histories, full)
    assert args[5] == {**config_dict(cfg), "search": "grid"}
    info = json.loads((run.path / "run.json").read_text())
    assert info["sweep_seconds"] == 1.25 and info["tracking"] == {"runs": 3} and info["notes"] == ["n"]
    assert info["winner"] == {**rows[0], "params": {"C": 1.0}}
    assert info["sweep"] == spec and info["cache"] == str(cache.resolve()) and info["kind"] == "classify"
    assert (run.path / "winner.skops").is_file() and (run.path / "results.csv").is_file()
    calls["curves"].clear()
    on_validation = sweep.SweepOutcome(rows, histories, winner, full, ("validation", y_eval, proba), [], 1.0)
    sweep._write_run(RunFolder(tmp_path, "v"), cfg, {**spec, "search": "tpe"}, cache, meta, on_validation)
    assert calls["track"][1][5]["search"] == "tpe"
    assert calls["cm"][3] == "winner #0 (logreg) on validation"


def config_dict(cfg):
    from pipeline.core.config import as_dict

    return as_dict(cfg)


@pytest.mark.parametrize("train_on", ["clean", "views"])
def test_run_sweep_runs_a_search_when_the_file_asks(tmp_path, train_on):
    path = _views_cache(tmp_path / "c.h5", n=8, views=1)
    toml = tmp_path / "s.toml"
    toml.write_text(
        'search = "random"\ntrials = 2\n[[head]]\nname = "logreg"\npooling = ["avg", "max"]\n'
        f'train_on = ["{train_on}"]\n'
    )
    result = sweep.run_sweep(SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)
    assert len(result.rows) == 2 and [r["index"] for r in result.rows] == [0, 1]
    assert {r["train_on"] for r in result.rows} == {train_on}
    assert {r["train_rows"] for r in result.rows} == {16}
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["sweep"]["search"] == "random" and info["sweep"]["trials"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('search = "random"\ntrials = 0\n[[head]]\nname = "logreg"\n')
    with pytest.raises(ConfigError, match=f"{re.escape(str(bad))}: search = 'random' needs trials = N"):
        sweep.run_sweep(SweepConfig(sweep_file=bad, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)


def test_run_sweep_logs_what_it_does_and_marks_the_winner(tmp_path, caplog):
    import time

    path = _views_cache(tmp_path / "c.h5", n=8, views=1, test=True)
    toml = tmp_path / "s.toml"
    toml.write_text('[[head]]\nname = "logreg"\npooling = "avg"\ntrain_on = ["clean", "views"]\n')
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="pipeline.train.sweep"):
        result = sweep.run_sweep(SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)
    elapsed = time.perf_counter() - t0
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.sweep"]
    assert messages[0].startswith("train held in memory")
    assert messages[1] == "sweeping 2 configs on c.h5 (train 16 + 16 view rows, validation 16) with 1 worker(s)"
    assert [r["train_on"] for r in result.rows] == ["clean", "views"]
    winner_line = [line for line in result.table.splitlines() if line.startswith("* ")]
    assert len(winner_line) == 1 and winner_line[0].split()[1] == str(result.winner["index"])
    assert {"test_accuracy", "test_log_loss"} <= set(result.winner) and result.winner["test_log_loss"] > 0
    seconds = float(re.search(r"configs in (\S+) s", result.table).group(1))
    assert 0 <= seconds <= elapsed
    info = json.loads((result.run_dir / "run.json").read_text())
    assert 0 < info["sweep_seconds"] <= elapsed


def test_a_bad_grid_is_named_by_its_file(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(5, 2), "validation": separable(5, 2, seed=1)})
    toml = tmp_path / "s.toml"
    toml.write_text('[[head]]\nname = "logreg"\ngamma = 1\n')
    with pytest.raises(ConfigError, match=f"^{re.escape(str(toml))}: head #1: head 'logreg' has no parameter"):
        sweep.run_sweep(SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)


def test_the_winner_without_test_split_is_scored_on_validation(tmp_path, monkeypatch):
    from pipeline.runs import plots

    titles = []
    monkeypatch.setattr(plots, "plot_confusion_matrix", lambda cm, names, path, title: titles.append(title))
    path = cache_from(tmp_path / "c.h5", {"train": separable(10, 2), "validation": separable(6, 2, seed=1)})
    toml = tmp_path / "s.toml"
    toml.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    sweep.run_sweep(SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)
    assert titles == ["winner #0 (logreg) on validation"]


@pytest.mark.parametrize(("n_jobs", "cores", "batches"), [(1, 2, [1, 1, 1]), (-1, 2, [2, 1]), (-1, None, [1, 1, 1])])
def test_tpe_asks_one_batch_per_worker(tmp_path, monkeypatch, caplog, n_jobs, cores, batches):
    seen = []
    real = sweep.fit_all
    monkeypatch.setattr(
        sweep,
        "fit_all",
        lambda batch, data, seed, jobs, keras: seen.append(len(batch)) or real(batch, data, seed, 1, keras=keras),
    )
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: cores)
    path = cache_from(tmp_path / "c.h5", {"train": separable(8, 2), "validation": separable(8, 2, seed=1)})
    toml = tmp_path / "s.toml"
    toml.write_text('search = "tpe"\ntrials = 3\n[[head]]\nname = "logreg"\npooling = ["avg", "max"]\n')
    cfg = SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=n_jobs, track=False, seed=6)
    with caplog.at_level("INFO", logger="pipeline.train.sweep"):
        result = sweep.run_sweep(cfg, path)
    assert seen == batches
    assert any(r.getMessage().startswith("sweeping 3 tpe trials on c.h5") for r in caplog.records)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["winner"]["params"]["random_state"] == 6


def test_more_errors_name_their_source():
    assert _error(ConfigError, sweep.expand_grid, {"head": []}, "s.toml") == (
        's.toml: no [[head]] tables; add at least one, e.g. [[head]] name = "logreg"'
    )
    meta = synthetic_meta(np.zeros((1, 1)), ("a", "b"))
    assert _error(
        ConfigError, sweep.check_classes, "c.h5", meta, {"train": np.array([0, 1]), "test": np.array([1])}
    ) == ("c.h5: split 'test' holds a single class ('b'); a classifier needs two or more")


def test_in_memory_class_checks_name_the_cache(tmp_path):
    x, _ = separable(3, 2)
    path = cache_from(tmp_path / "c.h5", {"train": separable(3, 2), "validation": (x, np.ones(len(x), int))})
    assert _error(ConfigError, _load, path) == (
        f"{path}: split 'validation' holds a single class ('b'); a classifier needs two or more"
    )


def test_a_small_memory_budget_streams_train(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(10, 2), "validation": separable(3, 2, seed=1)})
    data = _load(path, memory_budget="1KB")
    assert data.streams is not None and data.notes[0].startswith("streaming train from c.h5 in chunks: 20 rows")
    assert _load(path, memory_budget="1GB").streams is None


@pytest.mark.parametrize("how", ["grid", "search"])
def test_clean_training_never_needs_the_cached_views(tmp_path, how):
    path = _views_cache(tmp_path / "c.h5", n=8, views=1, validation=False)  # views, but no validation split
    toml = tmp_path / "s.toml"
    toml.write_text(("trials = 1\n" if how == "search" else "") + '[[head]]\nname = "logreg"\npooling = "avg"\n')
    result = sweep.run_sweep(SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False), path)
    assert [r["train_on"] for r in result.rows] == ["clean"]


def test_a_search_is_seeded_and_logged(tmp_path, caplog):
    path = cache_from(tmp_path / "c.h5", {"train": separable(8, 2), "validation": separable(8, 2, seed=1)})
    toml = tmp_path / "s.toml"
    toml.write_text(
        'trials = 3\n[[head]]\nname = "logreg"\npooling = ["avg", "max", "flatten"]\nC = [0.01, 0.1, 1, 10]\n'
    )

    def run(seed):
        cfg = SweepConfig(sweep_file=toml, runs_dir=tmp_path / "r", n_jobs=1, track=False, seed=seed)
        return [(r["pooling"], json.loads(r["params"]).get("C")) for r in sweep.run_sweep(cfg, path).rows]

    with caplog.at_level("INFO", logger="pipeline.train.sweep"):
        first = run(4)
    assert "sweeping 3 random trials on c.h5 (train 16, validation 16) with 1 worker(s)" in [
        r.getMessage() for r in caplog.records
    ]
    assert run(4) == first
    assert run(5) != first


# ----------------------------------------------------------------------------- --exclude
# (issue 27: reached before only from test_inspect.py, outside `make mutate`'s selection)


def _exclude_cache(path):
    """train (6 rows), validation, test, and one view split whose rows carry train's paths."""
    x, y = separable(3, 2)
    paths = [f"train/{i}" for i in range(len(y))]
    parts = {"train": (x, y, paths), "train@aug1": (x + 1, y, paths)}
    for k, s in enumerate(("validation", "test"), 1):
        xs, ys = separable(3, 2, seed=k)
        parts[s] = (xs, ys, [f"{s}/{i}" for i in range(len(ys))])
    meta = synthetic_meta(x, ("a", "b"), augment={"views": 1, "seed": 0, "policy": "p", "splits": ["train@aug1"]})
    return store.write_cache(
        path, {s: {"features": a, "labels": b, "paths": p} for s, (a, b, p) in parts.items()}, meta
    )


def _exclude_file(tmp_path, *paths):
    f = tmp_path / "drop.csv"
    f.write_text("path,why\n" + "".join(f"{p},x\n" for p in paths))
    return f


def test_exclude_drops_exactly_the_listed_train_rows_and_their_views(tmp_path):
    path = _exclude_cache(tmp_path / "c.h5")
    drop = _exclude_file(tmp_path, "train/4", "train/1", "validation/0", "elsewhere/9")
    data = _load(path, wants_views=True, views=1, train_on="both", exclude=drop)
    x, y = store.load_split(path, "train")[:2]
    keep = [0, 2, 3, 5]
    np.testing.assert_array_equal(data.train[0], x[keep])
    assert data.train[1].tolist() == y[keep].tolist()
    np.testing.assert_array_equal(data.views[0], x[keep] + 1)  # a dropped image's views go too
    assert data.views[1].tolist() == y[keep].tolist()
    assert len(data.validation[1]) == 6 and len(data.test[1]) == 6  # validation and test keep every row
    assert data.excluded == {
        "file": str(drop.resolve()),
        "sha256": hashlib.sha256(drop.read_bytes()).hexdigest(),
        "listed": 4,
        "dropped": 2,
        "dropped_paths": ["train/1", "train/4"],
    }
    assert data.notes[1] == (
        f"--exclude {drop}: 2 of its 4 listed path(s) were train rows, left out of training "
        "(4 train rows remain); validation and test keep every row"
    )
    plain = _load(path, wants_views=True, views=1)
    assert plain.excluded is None and len(plain.train[1]) == 6 and len(plain.views[1]) == 6
    assert len(plain.notes) == 1


def test_exclude_with_a_streamed_train_is_refused_by_name(tmp_path):
    path = _exclude_cache(tmp_path / "c.h5")
    drop = _exclude_file(tmp_path, "train/1")
    assert _error(ConfigError, _load, path, stream="on", exclude=drop) == (
        f"--exclude needs train in memory, and {path} would be streamed: pass --stream off "
        "(or a larger --memory-budget)"
    )


def test_run_json_records_the_exclude_file_and_the_dropped_rows(tmp_path):
    path = _exclude_cache(tmp_path / "c.h5")
    drop = _exclude_file(tmp_path, "train/0", "train/3")
    toml = tmp_path / "s.toml"
    toml.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    cfg = SweepConfig(sweep_file=toml, runs_dir=tmp_path / "runs", n_jobs=1, name="x", track=False, exclude=drop)
    info = json.loads((sweep.run_sweep(cfg, path).run_dir / "run.json").read_text())
    assert info["exclude"]["dropped_paths"] == ["train/0", "train/3"] and info["exclude"]["listed"] == 2
    assert info["exclude"]["file"] == str(drop.resolve())
    cfg = SweepConfig(sweep_file=toml, runs_dir=tmp_path / "runs", n_jobs=1, name="y", track=False)
    assert json.loads((sweep.run_sweep(cfg, path).run_dir / "run.json").read_text())["exclude"] is None
