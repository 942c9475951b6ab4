"""Test-time views of every split: view 1 is the mirror (its features equal the backbone's
on mirrored images), views are seeded, identical across runs and across an interrupted and
resumed extraction, and a cache with views of another seed is refused."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError
from pipeline.core.vocab import tta_split
from pipeline.features import images, tta_views
from pipeline.features.extract import extract

from conftest import interrupt_extract, make_folder, vgg16_weights_file


def cfg_for(root, cache_dir, **kw):
    kw.setdefault("weights", "random")
    return ExtractConfig(data=str(root), size=32, cache_dir=cache_dir, quiet=True, chunk_size=4, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("tta") / "imgs", {"train": 3, "validation": 2, "test": 2}, size=32)


@pytest.fixture(scope="module")
def two_views(root, tmp_path_factory):
    """A cache with two test-time views of every image, made once for the module."""
    return extract(cfg_for(root, tmp_path_factory.mktemp("a"), tta_views=2)).path


def test_views_of_every_split_are_cached_and_view_one_is_the_mirror(root, two_views):
    from pipeline.features import backbone
    from pipeline.features.weights import resolve

    cache = two_views
    meta = store.read_meta(cache)
    for split in ("train", "validation", "test"):
        assert meta.tta_splits(split) == [tta_split(split, 1), tta_split(split, 2)]
    assert meta.info["tta"]["views"] == 2 and meta.info["tta"]["seed"] == 0
    x, y, paths = store.load_split(cache, "test")
    mirror, y1, paths1 = store.load_split(cache, tta_split("test", 1))
    assert paths1 == paths and np.array_equal(y1, y)
    model = backbone.build("vgg16", size=32, layer="block5_pool", weights=resolve("random", "vgg16", 0))
    by_hand = backbone.forward(model, np.stack([images.load(str(root / p), 32)[:, ::-1] for p in paths]), 8)
    np.testing.assert_allclose(mirror, by_hand, rtol=1e-4, atol=1e-4)
    assert not np.allclose(mirror, x, atol=1e-3)
    aug = store.load_split(cache, tta_split("test", 2))[0]
    assert not np.allclose(aug, x, atol=1e-3) and not np.allclose(aug, mirror, atol=1e-3)


def test_views_are_seeded_and_identical_across_runs_and_resumes(root, two_views, tmp_path, monkeypatch):
    first = two_views
    interrupt_extract(cfg_for(root, tmp_path / "b", tta_views=2), monkeypatch, after=3)
    resumed = extract(cfg_for(root, tmp_path / "b", tta_views=2))
    assert resumed.resumed_chunks >= 3
    for split in ("validation", "test"):
        for view in store.read_meta(first).tta_splits(split):
            a, _, pa = store.load_split(first, view)
            b, _, pb = store.load_split(resumed.path, view)
            assert pa == pb
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # another seed gives other augmented views (the mirror has no randomness)
    spec = tta_views.transform(2, 0, "test/cats/cats.1.png")
    assert spec != tta_views.transform(2, 1, "test/cats/cats.1.png")
    assert tta_views.transform(1, 0, "x") == tta_views.transform(1, 5, "y") == images.MIRROR


def test_adding_views_computes_only_them_and_another_seed_is_refused(root, tmp_path):
    weights = str(vgg16_weights_file(tmp_path / "w.weights.h5", 0))  # a file: the seed is not in the cache name
    plain = extract(cfg_for(root, tmp_path / "a", weights=weights))
    more = extract(cfg_for(root, tmp_path / "a", weights=weights, tta_views=1))
    assert more.path == plain.path and more.images == 14  # one view of each of the 14 images
    assert extract(cfg_for(root, tmp_path / "a", weights=weights, tta_views=1)).hit
    assert extract(cfg_for(root, tmp_path / "a", weights=weights)).hit  # views kept: a plain request is a hit
    with pytest.raises(CacheError, match="test-time view"):
        extract(cfg_for(root, tmp_path / "a", weights=weights, tta_views=1, seed=3))
