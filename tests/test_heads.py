"""Heads: regression tests from the stage-two review (each fails on 2bfb1ea)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from pipeline.train.heads import HEADS, MLPHead
from pipeline.train.sweep_file import make_head

from conftest import separable


@pytest.mark.parametrize("name", sorted(HEADS))
def test_predict_before_fit_is_not_fitted_error(name):
    x, _ = separable(3)
    with pytest.raises(NotFittedError):
        make_head(name).predict(x)


@pytest.mark.parametrize("where", ["fit", "predict"])
def test_non_finite_features_are_named(where):
    x, y = separable(10)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    if where == "fit":
        with pytest.raises(ValueError, match="NaN or infinite"):
            make_head("logreg").fit(bad, y)
    else:
        head = make_head("logreg").fit(x, y)
        with pytest.raises(ValueError, match="NaN or infinite"):
            head.predict_proba(bad)


def test_mlp_says_when_it_cannot_hold_out_a_validation_set(caplog):
    x, y = separable(3)  # 6 rows: 10% is less than one row per class
    with caplog.at_level(logging.WARNING, logger="pipeline.train.heads"):
        head = MLPHead(epochs=2, units=4, validation_fraction=0.1).fit(x, y)
    assert "val_loss" not in head.history_
    assert "without early stopping" in caplog.text


def test_many_keras_heads_in_one_process_print_no_retracing_warning(capfd, caplog):
    """A sweep worker builds a model per MLP config and fold; TensorFlow would call each one's first
    predict a retrace and print a paragraph from the fifth on (heads._NewModelNotRetracing)."""
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    for i in range(7):
        make_head("mlp", random_state=i, pooling="avg", epochs=1, patience=0).fit(x, y).predict_proba(x[: 10 + i])
    assert "retracing" not in capfd.readouterr().err + caplog.text
