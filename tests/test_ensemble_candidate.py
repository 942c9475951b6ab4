"""Ensembles as sweep candidates: the ensemble row's validation figures are those of the mean
of its members' probabilities (members refitted here by hand), it can win, and a run it won
keeps its members under their config names so that loading the winner reproduces its test
probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.config import SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.runs.folder import score
from pipeline.train import ensemble, sweep
from pipeline.train.persist import load_winner
from pipeline.train.sweep_file import make_head

from conftest import separable, synthetic_meta

GRID = '[[head]]\nname = "logreg"\npooling = "flatten"\nC = [0.001, 0.01, 1.0]\n'


def noisy_cache(path):
    splits = {}
    for i, (split, n) in enumerate((("train", 25), ("validation", 30), ("test", 30))):
        x, y = separable(n, seed=i, spread=3.0)
        splits[split] = {"features": x, "labels": y, "paths": [f"{split}/{j}" for j in range(len(y))]}
    return store.write_cache(path, splits, synthetic_meta(splits["train"]["features"], ("a", "b")))


def test_ensemble_row_is_the_mean_of_its_members(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WARM_PATH", "0")  # each member fitted on its own, as refitted below
    cache = noisy_cache(tmp_path / "c.h5")
    (tmp_path / "s.toml").write_text("ensemble = 2\n" + GRID)
    result = sweep.run_sweep(SweepConfig(sweep_file=tmp_path / "s.toml", runs_dir=tmp_path / "r", n_jobs=1), cache)
    rows = result.rows
    assert len(rows) == 4 and rows[-1]["head"] == "ensemble"
    members = json.loads(rows[-1]["params"])["members"]
    assert members == ensemble.top_k(rows[:3], 2)
    x, y, _ = store.load_split(cache, "train")
    xv, yv, _ = store.load_split(cache, "validation")
    probas = []
    for i in members:  # refit each member as the sweep did: same parameters, same seed
        head = make_head("logreg", random_state=0, pooling="flatten", C=[0.001, 0.01, 1.0][i]).fit(x, y)
        assert score(head.predict_proba(xv), yv, head.classes_)[1] == pytest.approx(rows[i]["val_log_loss"])
        probas.append(head.predict_proba(xv))
    expected = score(np.mean(probas, axis=0), yv, head.classes_)
    assert (rows[-1]["val_accuracy"], rows[-1]["val_log_loss"]) == pytest.approx(expected)
    assert rows[-1]["passes"] is None  # a synthetic cache records no FLOPs: no made-up figure
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["ensemble"]["members"] == [ensemble.config_name(rows[i]) for i in members]


def test_a_winning_ensemble_is_saved_by_member_names_and_reproduced(tmp_path, monkeypatch):
    cache = noisy_cache(tmp_path / "c.h5")
    (tmp_path / "s.toml").write_text("ensemble = 3\n" + GRID)
    monkeypatch.setattr(sweep, "select", lambda rows: len(rows) - 1)  # the ensemble row wins
    result = sweep.run_sweep(SweepConfig(sweep_file=tmp_path / "s.toml", runs_dir=tmp_path / "r", n_jobs=1), cache)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["ensemble"]["won"] and result.winner["head"] == "ensemble"
    names = info["ensemble"]["members"]
    assert sorted(p.name for p in result.run_dir.glob("member-*.skops")) == sorted(f"member-{n}.skops" for n in names)
    assert not (result.run_dir / "winner.skops").exists()
    loaded = load_winner(result.run_dir, info)
    xt, yt, _ = store.load_split(cache, "test")
    proba = loaded.predict_proba(xt)
    np.testing.assert_allclose(proba, np.mean([m.predict_proba(xt) for m in loaded.members], axis=0))
    assert (result.winner["test_accuracy"], result.winner["test_log_loss"]) == pytest.approx(
        score(proba, yt, loaded.classes_)
    )


def test_ensemble_option_is_checked():
    with pytest.raises(ConfigError, match="ensemble must be an integer"):
        sweep.sweep_options({"ensemble": "3", "head": []}, "s.toml")
    with pytest.raises(ConfigError, match="ensemble must be an integer"):
        SweepConfig(ensemble=-1)
