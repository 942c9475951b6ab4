"""Fast checks without TensorFlow of the promises that live in store, sources, sweep, heads
and config: what `make mutate` runs (see TESTING.md), so each asserts an exact property."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.features import sources

from conftest import cache_from, make_image, separable, synthetic_meta

# ----------------------------------------------------------------------------- fingerprint


def _fingerprint(root: Path, **kw) -> str:
    return sources.resolve(ExtractConfig(data=str(root), **kw)).fingerprint


@pytest.fixture
def unsplit(tmp_path: Path) -> Path:
    for cls in ("b_dogs", "a_cats"):
        for i in range(4):
            make_image(tmp_path / "d" / cls / f"{i}.png", (10, 20, 30), 8, i)
    return tmp_path / "d"


def test_fingerprint_covers_path_size_and_mtime(unsplit):
    f = unsplit / "a_cats" / "0.png"
    base = _fingerprint(unsplit)
    assert _fingerprint(unsplit) == base  # deterministic
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same bytes, other mtime
    touched = _fingerprint(unsplit)
    assert touched != base
    with open(f, "ab") as fh:  # one byte longer, mtime put back
        fh.write(b"\0")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _fingerprint(unsplit) not in (base, touched)
    moved = _fingerprint(unsplit)
    f.rename(unsplit / "a_cats" / "9.png")
    assert _fingerprint(unsplit) != moved
    assert _fingerprint(unsplit, seed=1) != _fingerprint(unsplit)  # the stratified split is part of it
    assert _fingerprint(unsplit, split=(0.5, 0.25, 0.25)) != _fingerprint(unsplit)


def test_unsplit_folder_labels_follow_sorted_class_names(unsplit):
    src = sources.resolve(ExtractConfig(data=str(unsplit), split=(0.5, 0.25, 0.25)))
    assert src.class_names == ["a_cats", "b_dogs"]
    assert src.kind == "folder"
    for split in src.splits.values():
        for path, label in zip(split.paths, split.labels, strict=True):
            assert path.split("/")[0] == src.class_names[label]
    every = [p for s in src.splits.values() for p in s.paths]
    assert len(every) == len(set(every)) == 8  # each file in exactly one split


def test_stratified_assignment_keeps_each_class_share_and_is_seeded():
    labels = np.repeat([0, 1, 2], [20, 40, 100])
    a = sources.stratified_assignment(labels, (0.7, 0.15, 0.15), 0)
    for c, n in ((0, 20), (1, 40), (2, 100)):
        counts = np.bincount(a[labels == c], minlength=3)
        assert counts.tolist() == [round(0.7 * n), round(0.85 * n) - round(0.7 * n), n - round(0.85 * n)]
    assert np.array_equal(a, sources.stratified_assignment(labels, (0.7, 0.15, 0.15), 0))
    assert not np.array_equal(a, sources.stratified_assignment(labels, (0.7, 0.15, 0.15), 1))


def test_npz_class_names_and_split(tmp_path):
    x = np.zeros((20, 8, 8), np.uint8)
    x[10:] = 200
    y = np.repeat([1, 0], 10)
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["zero", "one"]))
    src = sources.resolve(ExtractConfig(data=str(tmp_path / "d.npz")))
    assert src.class_names == ["zero", "one"]
    assert src.kind == "npz"
    assert sum(len(s) for s in src.splits.values()) == 20
    for s in src.splits.values():
        assert s.arrays.shape[1:] == (8, 8, 3)  # grayscale made RGB
        assert np.all(s.arrays[s.labels == 1] == 0)
        assert np.all(s.arrays[s.labels == 0] == 200)


# ----------------------------------------------------------------------------- the cache format


def _splits(n: int = 4) -> dict:
    x, y = separable(n, 2)
    return {
        "train": {"features": x, "labels": y, "paths": [f"t/{i}" for i in range(len(y))]},
        "validation": {"features": x[:4], "labels": y[:4], "paths": ["v/0", "v/1", "v/2", "v/3"]},
    }


def test_a_cache_killed_while_writing_is_marked_incomplete(tmp_path, monkeypatch):
    """complete=True is written last: a file whose writer died reads as incomplete."""
    calls = {"n": 0}
    original = store._write_rows_meta

    def dies_on_second_split(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(store, "_write_rows_meta", dies_on_second_split)
    final = tmp_path / "c.h5"
    x = _splits()["train"]["features"]
    with pytest.raises(KeyboardInterrupt):
        store.write_cache(final, _splits(), synthetic_meta(x, ("a", "b")))
    assert not final.exists()
    [tmp] = tmp_path.glob("c.h5*")
    with h5py.File(tmp) as f:
        assert not f.attrs["complete"]
        assert "train" in f
    with pytest.raises(CacheError, match="incomplete"):
        store.read_meta(tmp)


def _plan(paths: list[str], labels: np.ndarray, blocks: list) -> store.SplitPlan:
    """A split written from computed chunks only (nothing reused from an older cache)."""
    return store.SplitPlan(paths, labels, [f"k{i}" for i in range(len(paths))], {}, {}, blocks)


def test_chunk_assembly_killed_midway_leaves_no_complete_file(tmp_path, monkeypatch):
    final = tmp_path / "c.h5"
    chunks = store.ChunkStore(final, {"k": 1})
    x, y = separable(4, 2)
    for i in range(2):
        chunks.save("train", i, x[4 * i : 4 * i + 4], np.arange(4 * i, 4 * i + 4), np.array([], np.int64), [])
    original = store._write_rows_meta
    monkeypatch.setattr(store, "_write_rows_meta", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    plans = {"train": _plan([f"p{i}" for i in range(8)], y, chunks.blocks("train", 2))}
    with pytest.raises(KeyboardInterrupt):
        store.assemble(final, plans, x.shape[1:], "float32", synthetic_meta(x, ("a", "b")))
    assert not final.exists()
    assert chunks.done("train", 0)
    assert chunks.done("train", 1)
    with pytest.raises(CacheError, match="incomplete"):
        store.read_meta(final.with_name(final.name + ".tmp"))
    monkeypatch.setattr(store, "_write_rows_meta", original)
    store.assemble(final, plans, x.shape[1:], "float32", synthetic_meta(x, ("a", "b")))
    got, labels, paths = store.load_split(final, "train")
    np.testing.assert_array_equal(got, x)
    assert np.array_equal(labels, y)
    assert paths == [f"p{i}" for i in range(8)]


def test_chunks_keep_skipped_rows_out_of_the_features(tmp_path):
    final = tmp_path / "c.h5"
    chunks = store.ChunkStore(final, {"k": 1})
    x, y = separable(2, 2)
    chunks.save("train", 0, x[[0, 2, 3]], np.array([0, 2, 3]), np.array([1]), ["truncated"])
    plans = {"train": _plan(["a", "b", "c", "d"], y, chunks.blocks("train", 1))}
    skipped = store.assemble(final, plans, x.shape[1:], "float16", synthetic_meta(x, ("a", "b")))
    assert skipped == {"train": [("b", "truncated")]}
    got, labels, paths = store.load_split(final, "train")
    assert got.dtype == np.float16
    assert paths == ["a", "c", "d"]
    assert labels.tolist() == y[[0, 2, 3]].tolist()
    with h5py.File(final) as f:
        assert [p.decode() for p in f["train/skipped/reasons"][()]] == ["truncated"]


def test_meta_round_trips_and_names_what_differs(tmp_path):
    x, y = separable(3, 2)
    meta = synthetic_meta(
        x, ("a", "b"), seed=7, augment={"views": 1, "seed": 7, "policy": "p", "splits": ["train@aug1"]}
    )
    path = store.write_cache(
        tmp_path / "c.h5",
        {
            "train": {"features": x, "labels": y, "paths": ["p"] * 6},
            "train@aug1": {"features": x, "labels": y, "paths": ["p"] * 6},
        },
        meta,
    )
    back = store.read_meta(path)
    assert back.key() == meta.key()
    assert back.class_names == ("a", "b")
    assert back.seed == 7
    assert back.feature_shape == x.shape[1:]
    assert back.split_sizes == {"train": 6, "train@aug1": 6}
    assert back.view_splits == ["train@aug1"]
    assert back.path == str(path)
    other = store.CacheKey(**{**meta.key().__dict__, "size": 64, "precision": "bfloat16"})
    assert meta.key().diff(other) == [
        "size: cache has 32, asked for 64",
        "precision: cache has 'float32', asked for 'bfloat16'",
    ]
    assert meta.key().diff(other, ["size"]) == ["size: cache has 32, asked for 64"]
    assert meta.key().diff(meta.key()) == []
    with pytest.raises(CacheError, match="lacks \\['fingerprint'\\]"):
        store.CacheMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "fingerprint"})


def test_view_splits_are_listed_in_natural_order(tmp_path):
    x, y = separable(2, 2)
    names = ["train", "train@aug10", "train@aug2", "train@aug1", "test"]
    path = store.write_cache(
        tmp_path / "c.h5",
        {s: {"features": x, "labels": y, "paths": ["p"] * 4} for s in names},
        synthetic_meta(x, ("a", "b")),
    )
    assert store.read_meta(path).splits == ("train", "test", "train@aug1", "train@aug2", "train@aug10")


def test_a_missing_split_or_cache_is_a_cache_error(tmp_path):
    path = cache_from(tmp_path / "c.h5", {"train": separable(2, 2)}, ("a", "b"))
    with pytest.raises(CacheError, match="no split 'test'"):
        store.load_split(path, "test")
    with pytest.raises(CacheError, match="no cache file"):
        store.read_meta(tmp_path / "missing.h5")
    blocks = list(store.iter_split(path, "train", rows=3))
    assert [len(b[1]) for b in blocks] == [3, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), store.load_split(path, "train")[0])


def test_features_are_chunked_along_n_with_checksums(tmp_path):
    x, y = separable(100, 2)
    path = cache_from(tmp_path / "c.h5", {"train": (x, y)}, ("a", "b"))
    with h5py.File(path) as f:
        ds = f["train/features"]
        assert ds.chunks == (store.FEATURE_CHUNK_ROWS, *x.shape[1:])
        assert ds.fletcher32
        assert f["train/labels"].fletcher32


# ----------------------------------------------------------------------------- heads and sweep


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_every_linear_head_pools_as_asked(name):
    from pipeline.train.heads import pool_features
    from pipeline.train.sweep_file import make_head

    x, y = separable(10, shape=(2, 3, 4))
    sizes = {p: make_head(name, pooling=p).fit(x, y).n_features_in_ for p in ("flatten", "avg", "max")}
    assert sizes == {"flatten": 24, "avg": 4, "max": 4}
    np.testing.assert_allclose(pool_features(x, "avg"), x.mean(axis=(1, 2)))
    np.testing.assert_allclose(pool_features(x, "max"), x.max(axis=(1, 2)))
    np.testing.assert_array_equal(pool_features(x, "flatten"), x.reshape(len(x), -1))
    fitted = make_head(name, pooling="avg").fit(x, y)
    with pytest.raises(ValueError, match="fitted on 4"):
        fitted.predict(x.reshape(len(x), -1))  # flat (N,24) rows: not what it was fitted on


def test_select_prefers_accuracy_then_log_loss_then_order():
    from pipeline.train.sweep import select

    rows = [
        {"val_accuracy": 0.8, "val_log_loss": 0.1},
        {"val_accuracy": 0.9, "val_log_loss": 0.5},
        {"val_accuracy": 0.9, "val_log_loss": 0.3},
        {"val_accuracy": 0.9, "val_log_loss": 0.3},
    ]
    assert select(rows) == 2
    assert select(rows[:2]) == 1
    assert select([rows[0], {"val_accuracy": 0.8, "val_log_loss": 0.1}]) == 0


def test_training_rows_follow_train_on():
    from pipeline.train.splits import training_rows

    train = (np.zeros((3, 1)), np.array([0, 1, 0]))
    views = (np.ones((6, 1)), np.array([0, 1, 0, 0, 1, 0]))
    assert training_rows(train, views, "clean") is train
    assert training_rows(train, views, "views") is views
    x, y = training_rows(train, views, "both")
    assert x.shape == (9, 1)
    assert x[:3].sum() == 0
    assert x[3:].sum() == 6
    assert y.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0]
    with pytest.raises(ConfigError, match="AUGMENT"):
        training_rows(train, None, "both")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"train_on": "all"}, "train_on must be one of"),
        ({"views": 0}, "views must be a positive integer"),
        ({"carve_fraction": 1.0}, "carve_fraction must be in"),
        ({"n_jobs": 0}, "n_jobs must be a non-zero integer"),
    ],
)
def test_sweep_config_refuses_bad_values(kw, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig(**kw)


def test_scores_of_float32_probabilities_raise_no_sum_warning_and_match_float64():
    """A Keras head's float32 probabilities of five classes: no "do not sum to one" warning
    on every score, and the same accuracy and log-loss as the exact float64 rows."""
    import warnings

    from pipeline.runs.folder import score

    rng = np.random.default_rng(0)
    exact = rng.dirichlet(np.ones(5), size=400)
    y = np.array(list("abcde"))[rng.integers(0, 5, 400)]
    classes = np.array(list("abcde"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = score(exact.astype(np.float32), y, classes)
    want = score(exact, y, classes)
    assert got[0] == want[0] and abs(got[1] - want[1]) < 1e-6
