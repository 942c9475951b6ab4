"""README promises that end-to-end runs guard (issue 16): an image overwritten in place is
never served from its old features, partial work from another weights file is never
mixed in, views made with another SEED are never added to a cache, --views N is honoured,
FORCE=1 keeps the old file until the new one is complete. Each test was checked by
breaking the code it guards (see TESTING.md)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError
from pipeline.core.vocab import view_split
from pipeline.features.extract import extract

from conftest import interrupt_extract, make_folder, make_image, vgg16_weights_file


def _cfg(root: Path, cache_dir: Path, **kw) -> ExtractConfig:
    kw.setdefault("size", 32)
    kw.setdefault("weights", "random")
    return ExtractConfig(data=str(root), cache_dir=cache_dir, quiet=True, chunk_size=4, batch_size=4, **kw)


def _row(path: Path, split: str, name: str) -> np.ndarray:
    x, _, paths = store.load_split(path, split)
    return x[paths.index(name)]


def _overwrite_keeping(target: Path, *, keep: str) -> None:
    """Overwrite ``target`` with other pixels, keeping its byte size (``keep="size"``, BMP files
    have a fixed size per dimension) or its modification time (``keep="mtime"``)."""
    st = target.stat()
    if keep == "size":
        make_image(target, (0, 255, 0), 32, 4242, fmt="BMP")
        assert target.stat().st_size == st.st_size
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    else:
        make_image(target, (0, 255, 0), 36, 4242, fmt="BMP")  # other dimensions: other size
        assert target.stat().st_size != st.st_size
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep", ["size", "mtime"])
def test_an_image_overwritten_in_place_is_never_served_from_its_old_features(tmp_path, keep):
    """Same name, and the same size (other mtime) or the same mtime (other size): the cache must
    either refuse (exit 3 naming the fingerprint) or recompute that image, never answer with
    the old features. Holds for 'refuse' and for 'recompute changed rows' designs alike."""
    root = tmp_path / "imgs"
    for cls, colour in (("cats", (200, 40, 40)), ("dogs", (40, 40, 200))):
        for i in range(3):
            make_image(root / "train" / cls / f"{cls}.{i}.bmp", colour, 32, 10 * i + len(cls), fmt="BMP")
    first = extract(_cfg(root, tmp_path / "c"))
    name = "train/cats/cats.0.bmp"
    old = _row(first.path, "train", name)
    _overwrite_keeping(root / name, keep=keep)
    try:
        again = extract(_cfg(root, tmp_path / "c"))
    except CacheError as e:  # the "refuse" design: it must name the field and the file
        assert "fingerprint" in str(e)  # noqa: PT017
        assert str(first.path) in str(e)  # noqa: PT017
        return
    assert not again.hit, "an overwritten image was answered from the cache"
    fresh = extract(_cfg(root, tmp_path / "fresh")).path
    new = _row(again.path, "train", name)
    np.testing.assert_allclose(new, _row(fresh, "train", name), rtol=1e-5, atol=1e-5)
    assert not np.allclose(new, old)


def test_partial_work_from_another_weights_file_of_the_same_name_is_not_reused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"train": 4}, size=32)
    weights = vgg16_weights_file(tmp_path / "w.weights.h5", 1)
    cfg = _cfg(root, tmp_path / "c", weights=str(weights))
    interrupt_extract(cfg, monkeypatch)
    assert list((tmp_path / "c").rglob(".*.partial/train-000000.npz"))
    vgg16_weights_file(weights, 2)  # same path and name, other values
    result = extract(cfg)
    assert result.resumed_chunks == 0
    fresh = extract(_cfg(root, tmp_path / "fresh", weights=str(weights))).path
    np.testing.assert_array_equal(store.load_split(result.path, "train")[0], store.load_split(fresh, "train")[0])


def test_force_keeps_the_old_cache_until_the_new_one_is_complete(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"train": 4}, size=32)
    first = extract(_cfg(root, tmp_path / "c"))
    before = first.path.read_bytes()
    interrupt_extract(_cfg(root, tmp_path / "c", force=True), monkeypatch)
    assert first.path.read_bytes() == before
    assert store.read_meta(first.path).split_sizes == {"train": 8}


def test_views_made_with_another_seed_are_never_added_to_a_cache(tmp_path):
    """A weights file keeps the cache key free of the seed, so only the views' seed differs."""
    root = make_folder(tmp_path / "imgs", {"train": 2, "validation": 1}, size=32)
    weights = vgg16_weights_file(tmp_path / "w.weights.h5", 1)
    first = extract(_cfg(root, tmp_path / "c", weights=str(weights), augment=1, seed=0))
    before = first.path.read_bytes()
    with pytest.raises(CacheError, match="seed 0") as e:
        extract(_cfg(root, tmp_path / "c", weights=str(weights), augment=2, seed=1))
    assert str(first.path) in str(e.value)
    assert first.path.read_bytes() == before
    same = extract(_cfg(root, tmp_path / "c", weights=str(weights), augment=2, seed=0))
    assert store.read_meta(same.path).augment["views"] == 2
    assert same.images == 4
    other = extract(_cfg(root, tmp_path / "seed1", weights=str(weights), augment=1, seed=1)).path
    assert not np.allclose(store.load_split(other, view_split(1))[0], store.load_split(first.path, view_split(1))[0])


def _views_cache(path: Path, views: int) -> Path:
    """A synthetic cache whose view k shifts the features by 10*k, so the rows used show which views."""
    from conftest import separable, synthetic_meta

    x, y = separable(6, 2)
    splits = {"train": (x, y), "validation": separable(3, 2, seed=1)}
    for k in range(1, views + 1):
        splits[view_split(k)] = (x + 10 * k, y)
    meta = synthetic_meta(
        x,
        ("a", "b"),
        augment={"views": views, "seed": 0, "policy": "p", "splits": [view_split(k) for k in range(1, views + 1)]},
    )
    return store.write_cache(
        path,
        {s: {"features": a, "labels": b, "paths": [f"{s}/{i}" for i in range(len(b))]} for s, (a, b) in splits.items()},
        meta,
    )


def test_views_n_uses_the_first_n_views(tmp_path, capsys):
    from pipeline.core.config import SweepConfig
    from pipeline.train.sweep import load_data

    cache = _views_cache(tmp_path / "c.h5", 3)
    meta = store.read_meta(cache)
    for n, expected in ((1, [1]), (2, [1, 2]), (None, [1, 2, 3])):
        data = load_data(SweepConfig(train_on="views", views=n, runs_dir=tmp_path), cache, meta, True)
        shifts = sorted(
            {
                round(float(v))
                for v in (data.views[0] - np.tile(data.train[0], (len(expected), 1, 1, 1))).mean(axis=(1, 2, 3))
            }
        )
        assert shifts == [10 * k for k in expected], n
        assert len(data.views[1]) == 12 * len(expected), n
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\ntrain_on = "both"\n')
    assert (
        main(
            [
                "classify",
                "--cache",
                str(cache),
                "--sweep",
                str(sweep),
                "--jobs",
                "1",
                "--views",
                "2",
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    [results] = (tmp_path / "runs").glob("*/results.csv")
    [row] = list(csv.DictReader(results.open()))
    assert int(row["train_rows"]) == 12 * 3  # clean + 2 of the 3 views
