"""Cross-validated selection (``--cv K``, sweep-file ``cv = K``): pick on out-of-fold
predictions over train + validation, then refit the pick on all of them.

Why: with a few thousand labelled images the best configs of a sweep differ by a few
validation images, too few to choose among tens of configs; the winner on 1,000 validation
images is partly the luckiest one. Stratified K-fold over train + validation gives every
labelled image one held-out prediction per config, three times the evidence on the seeds'
split (BENCHMARKS.md 9b: +0.9 point test on cats vs dogs, +2.1 on flowers). Test is still read
once, for the winner only.

What changes in a run: ``val_accuracy``/``val_log_loss`` are out-of-fold figures over train +
validation, and the saved winner (each ensemble member) is refitted on train + validation, so
no held-out validation figure of the saved model is left; run.json's ``cv`` says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError

COLUMN_MEANING = "val_accuracy and val_log_loss are out of fold over the folded splits"


def check_folds(k: Any, source: str) -> int:
    """``k`` as a fold count: 0 (off) or an integer >= 2."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
        raise ConfigError(
            f"{source}: cv must be 0 (off: select on validation) or a number of folds >= 2; received cv = {k!r}"
        )
    return k


def folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled ``k`` folds of ``y`` (seeded): [(fit rows, held-out rows)]."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min()) if len(y) else 0
    if smallest < k:
        fewer = f"cv <= {smallest} or cv = 0" if smallest >= 2 else "cv = 0"
        raise ConfigError(
            f"cv = {k}: a class has only {smallest} labelled image(s) to fold, fewer than the folds; use {fewer}"
        )
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def out_of_fold(per_fold: list[np.ndarray], splits: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """One config's held-out probabilities, each fold's rows put back in image order."""
    out = np.full((n, per_fold[0].shape[1]), np.nan)
    for proba, (_, held) in zip(per_fold, splits, strict=True):
        out[held] = proba
    if np.isnan(out).any():  # every image is held out exactly once: a gap is a bug, not data
        raise AssertionError("out-of-fold probabilities left rows unset")
    return out
