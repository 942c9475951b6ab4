"""Random and TPE search (Optuna): trial count, ranges kept, selection on validation, test once."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.train.search import check, is_search, run_search
from pipeline.train.sweep import run_sweep, select

from conftest import cache_from, separable

pytest.importorskip("optuna", reason="Optuna is not installed (the `track` extra: pip install -e '.[track]')")

SEARCH = """
search = "{sampler}"
trials = {trials}

[[head]]
name = "logreg"
pooling = ["flatten", "avg", "max"]
C = {{low = 1e-4, high = 10, log = true}}
max_iter = {{low = 50, high = 300}}
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    return cache_from(
        tmp / "c.h5",
        {
            "train": separable(10, spread=2.5),
            "validation": separable(6, seed=1, spread=2.5),
            "test": separable(6, seed=2, spread=2.5),
        },
    )


def _sweep(tmp_path, cache, sampler, trials=6, seed=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sweep = tmp_path / f"{sampler}.toml"
    sweep.write_text(SEARCH.format(sampler=sampler, trials=trials))
    return run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1, seed=seed), cache)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_search_runs_n_trials_inside_the_ranges_and_picks_on_validation(tmp_path, cache, sampler):
    result = _sweep(tmp_path, cache, sampler)
    rows = result.rows
    assert [r["index"] for r in rows] == list(range(6))
    info = json.loads((result.run_dir / "run.json").read_text())
    params = [json.loads(r["params"]) for r in rows]
    assert all(r["head"] == "logreg" and r["pooling"] in ("flatten", "avg", "max") for r in rows)
    for p in params:
        assert 1e-4 <= p["C"] <= 10
        assert isinstance(p["max_iter"], int)
        assert 50 <= p["max_iter"] <= 300
    assert len({p["C"] for p in params}) == 6  # continuous: every trial its own value
    best = select(rows)
    assert rows[best].get("winner")
    assert sum(bool(r.get("winner")) for r in rows) == 1
    assert [i for i, r in enumerate(rows) if r.get("test_accuracy") is not None] == [best]  # test scored once
    assert info["winner"]["params"]["C"] == params[best]["C"]
    assert info["tracking"]["note"].startswith("tracking off")


def test_the_same_seed_gives_the_same_trials(tmp_path, cache):
    first = [r["params"] for r in _sweep(tmp_path / "a", cache, "random", trials=3, seed=7).rows]
    again = [r["params"] for r in _sweep(tmp_path / "b", cache, "random", trials=3, seed=7).rows]
    other = [r["params"] for r in _sweep(tmp_path / "c", cache, "random", trials=3, seed=8).rows]
    assert first == again
    assert first != other


def test_tpe_is_told_each_batch_before_asking_the_next():
    """Batches of n_jobs: the fitter sees 2, 2, 1 configs, and several heads are one choice."""
    spec = {
        "search": "tpe",
        "trials": 5,
        "head": [{"name": "logreg", "C": {"low": 0.01, "high": 1.0}}, {"name": "svm", "C": [0.1, 1.0]}],
    }
    batches = []

    def fit(configs):
        batches.append(len(configs))
        return [({"val_accuracy": params["C"], "val_log_loss": 0.0}, None, b"") for _, params in configs]

    configs, results = run_search(spec, "s.toml", fit, seed=0, batch=2)
    assert batches == [2, 2, 1]
    assert [r[0]["index"] for r in results] == [0, 1, 2, 3, 4]
    assert {name for name, _ in configs} <= {"logreg", "svm"}
    for name, params in configs:
        assert 0.01 <= params["C"] <= 1.0 if name == "logreg" else params["C"] in (0.1, 1.0)


def test_a_grid_file_is_not_a_search():
    assert not is_search({"head": [{"name": "logreg"}]})
    assert is_search({"search": "tpe", "trials": 3, "head": [{"name": "logreg"}]})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"search": "grid", "trials": 3}, r"search must be one of \('random', 'tpe'\)"),
        ({"search": "tpe"}, "needs trials = N"),
        ({"search": "tpe", "trials": 0}, "needs trials = N"),
        (
            {"search": "tpe", "trials": 2, "head": [{"name": "logreg", "C": {"low": 10, "high": 1}}]},
            "low must be below high",
        ),
        (
            {"search": "tpe", "trials": 2, "head": [{"name": "logreg", "C": {"low": 0, "high": 1, "log": True}}]},
            "log range needs low > 0",
        ),
        (
            {"search": "tpe", "trials": 2, "head": [{"name": "logreg", "C": {"min": 0, "max": 1}}]},
            r"a range is \{low = ..., high = ...\}",
        ),
        ({"search": "tpe", "trials": 2, "head": [{"name": "logreg", "C": {"low": -1, "high": 1}}]}, "head 'logreg'"),
        (
            {"search": "tpe", "trials": 2, "head": [{"name": "logreg", "pooling": {"low": 0, "high": 1}}]},
            "pooling is a choice",
        ),
        (
            {"search": "tpe", "trials": 2, "head": [{"name": "logreg", "gamma": [1, 2]}]},
            r"no parameter\(s\) \['gamma'\]",
        ),
        (
            {"search": "tpe", "trials": 2, "seed": 3, "head": [{"name": "logreg"}]},
            r"unknown top-level key\(s\) \['seed'\]",
        ),
        ({"search": "tpe", "trials": 2, "head": [{"name": "forest"}]}, "unknown head 'forest'"),
    ],
)
def test_bad_search_files_are_config_errors_naming_the_problem(spec, message):
    spec.setdefault("head", [{"name": "logreg"}])
    with pytest.raises(ConfigError, match=message):
        check(spec, "s.toml")
