"""Reading a cache's splits into memory for training: one copy for the sweep and finetune.

The labelled arrays of the splits a cache holds, its cached augmented views of train
(stacked, optionally less the rows of ``--exclude``), and the rows a head trains on for
each ``train_on`` value.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.cache import store
from pipeline.core.errors import ConfigError
from pipeline.train import exclude


def load_splits(cache: Path, meta: store.CacheMeta, names: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of each of ``names`` that the cache holds, in the order given."""
    return {s: store.load_split(cache, s)[:2] for s in names if s in meta.splits}


def load_views(
    cache: Path, meta: store.CacheMeta, limit: int | None, listed: frozenset[str] = frozenset()
) -> tuple[np.ndarray, np.ndarray] | None:
    """The first ``limit`` (all when None) cached augmented views of train, stacked (without
    the views of ``listed`` paths: --exclude)."""
    names = meta.view_splits[:limit]
    if not names:
        return None
    parts = [without(store.load_split(cache, name), listed)[0] for name in names]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def without(
    split: tuple[np.ndarray, np.ndarray, list[str]], listed: frozenset[str]
) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    """(features, labels) of a loaded split less the rows whose path is ``listed``, and those paths."""
    x, y, paths = split
    if not listed:
        return (x, y), []
    keep = exclude.keep_mask(paths, listed)
    return (x[keep], y[keep]), [p for p, k in zip(paths, keep, strict=True) if not k]


def training_rows(
    train: tuple[np.ndarray, np.ndarray],
    views: tuple[np.ndarray, np.ndarray] | None,
    train_on: str,
    tta: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clean train rows, the cached augmented views, or both stacked; "tta": clean rows and
    the train split's cached test-time views (the mirror first)."""
    if train_on == "clean":
        return train
    if train_on == "tta":
        if tta is None:
            raise ConfigError(
                "train_on='tta' needs test-time views of train in the cache; make them with "
                "`make extract TTA_VIEWS=N` (same options)"
            )
        return np.concatenate([train[0], tta[0]]), np.concatenate([train[1], tta[1]])
    if views is None:
        raise ConfigError(
            f"train_on={train_on!r} needs augmented views in the cache; make them with "
            "`make extract AUGMENT=K` (same options)"
        )
    if train_on == "views":
        return views
    return np.concatenate([train[0], views[0]]), np.concatenate([train[1], views[1]])
