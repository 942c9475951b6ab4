"""Ensembles as sweep candidates: the mean of the top-k configs' class probabilities.

Kept deliberately plain so that predict and an export reproduce it from the run folder
alone: members are fitted heads saved as ``member-<config name>`` next to run.json, whose
``ensemble`` entry lists their config names in order; the ensemble's probability for a
class is the unweighted mean of the members' ``predict_proba``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError

COMBINE = "mean of the members' predict_proba (equal weights)"


def config_name(row: dict[str, Any]) -> str:
    """A sweep row's name in a run folder: ``<index>-<head>-<pooling>`` (unique within a sweep)."""
    return f"{int(row['index']):02d}-{row['head']}-{row['pooling']}"


def top_k(rows: Sequence[dict[str, Any]], k: int) -> list[int]:
    """Indices of the best ``k`` rows by the sweep's own order: validation accuracy, then log-loss, then index."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_log_loss"], i))
    return order[:k]


class Ensemble:
    """Fitted heads combined by the mean of their probabilities (the scikit-learn predict contract)."""

    def __init__(self, members: Sequence[Any], names: Sequence[str]):
        if len(members) < 2 or len(members) != len(names):
            raise ConfigError(f"an ensemble needs two or more named members; received {len(members)} head(s)")
        classes = [np.asarray(m.classes_) for m in members]
        if any(not np.array_equal(c, classes[0]) for c in classes[1:]):
            raise ConfigError(f"ensemble members {list(names)} were fitted on different classes; cannot average them")
        self.members, self.names = list(members), list(names)
        self.classes_ = classes[0]
        self.pooling = "+".join(dict.fromkeys(m.pooling for m in members))

    def fit(self, x: Any, y: Any) -> Ensemble:
        """Members come fitted from the sweep; refitting them here is not what the ensemble means."""
        raise NotImplementedError("an Ensemble is built from fitted sweep members; fit the members instead")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.mean([m.predict_proba(x) for m in self.members], axis=0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(x), axis=1)]


def stem(name: str) -> str:
    """The file stem of a member in the run folder (``persist.save_head``'s ``stem``)."""
    return f"member-{name}"
