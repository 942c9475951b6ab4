"""predict reproduces the sweep's scoring: with test-time views (mirror and a seeded
augmented view) and a winning ensemble, the probabilities predict writes for the test images
equal the mean over the cached views of the members' mean, and its accuracy is the sweep's."""

from __future__ import annotations

import csv
import json

import numpy as np

from pipeline.app.predict import predict
from pipeline.cache import store
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.features.extract import extract
from pipeline.train import sweep
from pipeline.train.persist import load_winner

from conftest import make_folder


def test_predict_with_tta_and_ensemble_equals_the_sweeps_scoring(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"train": 4, "validation": 3, "test": 3}, size=32)
    cfg = ExtractConfig(data=str(root), size=32, weights="random", cache_dir=tmp_path / "c", quiet=True, tta_views=2)
    cache = extract(cfg).path
    (tmp_path / "s.toml").write_text(
        'tta = true\nensemble = 2\n[[head]]\nname = "logreg"\npooling = ["avg", "max"]\nC = 0.1\n'
    )
    monkeypatch.setattr(sweep, "select", lambda rows: len(rows) - 1)  # the ensemble wins
    result = sweep.run_sweep(SweepConfig(sweep_file=tmp_path / "s.toml", runs_dir=tmp_path / "r", n_jobs=1), cache)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["ensemble"]["won"] and info["tta"]["views"] == 2

    # the sweep's scoring of test, by hand from the cache: mean over the clean row and its views
    winner = load_winner(result.run_dir, info)
    x, y, paths = store.load_split(cache, "test")
    probas = [winner.predict_proba(x)]
    for name in store.read_meta(cache).tta_splits("test"):
        xv, _, pv = store.load_split(cache, name)
        order = {p: i for i, p in enumerate(pv)}
        probas.append(winner.predict_proba(xv[[order[p] for p in paths]]))
    expected = dict(zip(paths, np.mean(probas, axis=0), strict=True))

    out = predict(root, run_dir=result.run_dir, out=tmp_path / "p.csv")  # the data root: same relative paths
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    names = store.read_meta(cache).class_names
    got = np.array([[float(rows[p][f"p_{c}"]) for c in names] for p in paths])
    np.testing.assert_allclose(got, np.array([expected[p] for p in paths]), atol=2e-5)
    assert not np.allclose(got, probas[0], atol=1e-4)  # the views changed the probabilities
    accuracy = np.mean([names.index(rows[p]["class"]) == label for p, label in zip(paths, y, strict=True)])
    assert accuracy == result.winner["test_accuracy"]
