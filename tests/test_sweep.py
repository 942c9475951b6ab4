"""Sweep: regression tests from the stage-two review (each fails on 2bfb1ea)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.core.config import SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.train.sweep import expand_grid, run_sweep

from conftest import cache_from, separable


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"head": [{"name": "logreg", "C": []}]}, r"empty list for \['C'\]"),
        ({"head": ["logreg"]}, "head #1 must be a"),
    ],
)
def test_malformed_grids_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid(spec)


def test_a_class_missing_from_train_is_named(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\n')
    cache = cache_from(tmp_path / "c.h5", {"train": separable(10, 2), "validation": separable(5, 3, seed=1)})
    with pytest.raises(ConfigError, match=r"'validation' holds class\(es\) \['c'\] that train lacks"):
        run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache)


def test_run_json_names_every_parameter_of_the_winner(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\nC = 0.5\n')  # one config: nothing varies, the table shows {}
    cache = cache_from(tmp_path / "c.h5", {"train": separable(10), "validation": separable(5, seed=1)})
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1, seed=4), cache)
    winner = json.loads((result.run_dir / "run.json").read_text())["winner"]
    assert winner["params"] == {
        "C": 0.5,
        "class_weight": None,
        "max_iter": 1000,
        "pooling": "flatten",
        "random_state": 4,
    }
    assert "OMP_NUM_THREADS" not in os.environ  # one job runs here: this process's thread settings are left alone


def test_parent_loads_keras_only_for_an_mlp_winner(tmp_path):
    """Workers fit the MLPs; a scikit-learn winner must not make the parent import TensorFlow."""
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\n[[head]]\nname = "mlp"\nepochs = 1\nunits = 2\nlearning_rate = 1e-6\n')
    cache = cache_from(tmp_path / "c.h5", {"train": separable(10), "validation": separable(5, seed=1)})
    code = (
        "import sys; from pathlib import Path; from pipeline.core.config import SweepConfig; "
        "from pipeline.train.sweep import run_sweep; "
        f"r = run_sweep(SweepConfig(sweep_file=Path({str(sweep)!r}), "
        f"runs_dir=Path({str(tmp_path / 'runs')!r}), n_jobs=2), "
        f"Path({str(cache)!r})); print(r.winner['head'], 'tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.stdout.split()[-2:] == ["logreg", "False"], out.stdout + out.stderr
