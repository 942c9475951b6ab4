"""Test-time views: which extra images of every split are cached, and how each is made.

View 1 of an image is its horizontal mirror (no randomness). Views 2..N are the
augmentation policy's views (``images.augment``), seeded by ``[seed, k, h, SALT]`` with
``h = sources.path_hash(relative path)``: the same on every run and resume, following the
image when others are added, and a stream apart from the train split's ``train@aug<k>``
views (which use ``[seed, k, h]``). Stage two averages a head's probabilities over the
clean row and these views (``--tta``); ``predict`` makes the same views of new images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.core.vocab import tta_split
from pipeline.features import images, sources

MIRROR = images.MIRROR  # the transform of view 1
SALT = 7001  # separates the test-time views' random stream from train@aug<k>'s

POLICY = (
    "view 1: the horizontal mirror; views k >= 2: "
    + images.AUGMENT_POLICY
    + f" (test-time views seed numpy.random.default_rng([seed, k, h, {SALT}]))"
)


def transform(k: int, seed: int, path: str) -> Any:
    """What the decoder applies for view ``k`` of the image at relative ``path``."""
    if k < 1:
        raise ValueError(f"test-time views are numbered from 1; received k={k!r}")
    return MIRROR if k == 1 else (seed, k, sources.path_hash(path), SALT)


def apply(image: np.ndarray, spec: Any) -> np.ndarray:
    """View ``spec`` (from ``transform``) of a decoded (S,S,3) uint8 image."""
    return images.view(image, spec)


def splits(split: str, n: int) -> list[str]:
    """The cache's names of the ``n`` test-time views of ``split``."""
    return [tta_split(split, k) for k in range(1, n + 1)]


def items(split_items: Sequence[Any], paths: Sequence[str], k: int, seed: int) -> list[tuple[Any, Any]]:
    """Decoder items for view ``k`` of every image of a split: ``(item, transform)``."""
    return [(item, transform(k, seed, path)) for item, path in zip(split_items, paths, strict=True)]


def record(n: int, seed: int, split_names: Sequence[str]) -> dict[str, Any]:
    """What the cache says about its test-time views (``info["tta"]``)."""
    return {
        "views": n,
        "seed": seed,
        "policy": POLICY,
        "splits": {s: splits(s, n) for s in split_names},
    }


def of_images(batch: np.ndarray, paths: Sequence[str], n: int, seed: int) -> list[np.ndarray]:
    """The ``n`` test-time views of a decoded batch (``paths`` relative, as in a cache), each (B,S,S,3)."""
    return [
        np.stack([apply(img, transform(k, seed, p)) for img, p in zip(batch, paths, strict=True)])
        for k in range(1, n + 1)
    ]


def plans(
    source: sources.Source, index: store.RowIndex | None, n: int, seed: int
) -> dict[str, tuple[store.SplitPlan, list[tuple[Any, Any]], list[int]]]:
    """Per view split of every split of ``source``: (its plan, decoder items, rows to compute).
    A cached view row is reused when its image's (path, key) is unchanged, like any other row."""
    out = {}
    for split, base in source.splits.items():
        split_items = source.items(split)
        for k in range(1, n + 1):
            name = tta_split(split, k)
            plan = store.SplitPlan(base.paths, base.labels, base.keys or [""] * len(base), {}, {}, [])
            out[name] = (plan, items(split_items, base.paths, k, seed), store.plan_view_rows(plan, name, index))
    return out
