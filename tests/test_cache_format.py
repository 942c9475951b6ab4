"""pipeline.cache.store without TensorFlow: every refusal of a bad cache names the file and what
is wrong, the HDF5 layout (chunks, checksums, filters, text dtypes), reuse of rows, shard
caches as virtual datasets, partial chunks and the writer lock (issue 16: `make mutate`
runs this file; TESTING.md)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.errors import CacheError

from conftest import cache_from, flip_byte, separable, synthetic_meta

REBUILD = "rebuild it with `make extract FORCE=1` (same options)"


def _cache(tmp_path: Path, n: int = 3, name: str = "c.h5", **splits) -> Path:
    return cache_from(tmp_path / name, splits or {"train": separable(n, 2)}, ("a", "b"))


def _error(fn, *args) -> str:
    with pytest.raises(CacheError) as info:
        fn(*args)
    return str(info.value)


# ----------------------------------------------------------------------------- reading: refusals


def test_a_missing_cache_says_how_to_make_it(tmp_path):
    path = tmp_path / "none.h5"
    assert _error(store.read_meta, path) == (
        f"no cache file at {path}; run `make extract` (or `featcache extract`) with the same options to make it"
    )


def test_an_hdf5_file_without_format_version_is_not_a_cache(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(2)
    assert _error(store.read_meta, path) == (
        f"{path} is an HDF5 file but not a featcache cache (no format_version attribute)"
    )


def test_another_format_version_is_refused_by_number(tmp_path):
    path = _cache(tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 2
    assert _error(store.read_meta, path) == (
        f"{path} has format_version=2; this featcache reads {store.FORMAT_VERSION}. "
        f"It was made by another version: {REBUILD}"
    )
    assert store.FORMAT_VERSION == 3


@pytest.mark.parametrize("marker", ["false", "absent"])
def test_a_cache_without_the_complete_marker_is_incomplete(tmp_path, marker):
    path = _cache(tmp_path)
    with h5py.File(path, "a") as f:
        if marker == "absent":
            del f.attrs["complete"]
        else:
            f.attrs["complete"] = False
    assert _error(store.read_meta, path) == (
        f"{path} is incomplete (no complete=True marker): the run that wrote it did not finish; {REBUILD}"
    )


def test_a_file_that_is_not_hdf5_is_named(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    err = _error(store.read_meta, path)
    assert err.startswith(f"{path} is not a readable featcache cache (OSError: ")
    assert err.endswith(f"); {REBUILD}")


def test_rows_that_disagree_are_corruption_named_by_split(tmp_path):
    path = _cache(tmp_path)
    with h5py.File(path, "a") as f:
        del f["train/paths"]
        f["train/paths"] = np.array([b"p"] * 5)
    assert _error(store.read_meta, path) == (
        f"{path} is corrupt: split 'train' has 6 feature rows, 6 labels and 5 paths; "
        "rebuild it with `make extract FORCE=1`"
    )
    path = _cache(tmp_path, name="d.h5")
    with h5py.File(path, "a") as f:
        del f["train/labels"]
        f["train/labels"] = np.zeros(5, np.int64)
    assert _error(store.read_meta, path) == (
        f"{path} is corrupt: split 'train' has 6 feature rows, 5 labels and 6 paths; "
        "rebuild it with `make extract FORCE=1`"
    )


def test_features_of_another_shape_than_the_metadata_are_corruption(tmp_path):
    path = _cache(tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["feature_shape"] = json.dumps([1, 1, 8])
    assert _error(store.read_meta, path) == (
        f"{path} is corrupt: split 'train' holds features of shape (2, 2, 8), its metadata "
        "says (1, 1, 8); rebuild it with `make extract FORCE=1`"
    )


def test_labels_outside_the_classes_are_corruption(tmp_path):
    x, _ = separable(2, 2)
    path = cache_from(tmp_path / "c.h5", {"train": (x, np.array([0, 1, 2, -1]))}, ("a", "b"))
    message = (
        f"{path} is corrupt: split 'train' has 2 label(s) outside the 2 classes (e.g. 2); rebuild it with "
        "`make extract FORCE=1`"
    )
    assert _error(store.load_split, path, "train") == message
    assert _error(lambda: list(store.iter_split(path, "train"))) == message
    ok = cache_from(tmp_path / "d.h5", {"train": (x, np.array([0, 1, 1, 0]))}, ("a", "b"))
    assert store.load_split(ok, "train")[1].tolist() == [0, 1, 1, 0]  # the last class is inside


def test_a_missing_split_lists_the_ones_there(tmp_path):
    path = _cache(tmp_path)
    assert _error(store.load_split, path, "test") == f"{path} has no split 'test'; it has ['train']"


def test_flipped_feature_bytes_fail_the_checksum(tmp_path):
    x, y = separable(3, 2)
    path = cache_from(tmp_path / "c.h5", {"train": (x, y)}, ("a", "b"))
    with h5py.File(path) as f:
        offset = f["train/features"].id.get_chunk_info(0).byte_offset
    flip_byte(path, offset + 5)
    err = _error(store.load_split, path, "train")
    assert err.startswith(f"{path}: split 'train' failed its checksum or could not be read (")
    assert err.endswith("); the file is corrupt: rebuild it with `make extract FORCE=1`")


# ----------------------------------------------------------------------------- reading: content


def test_meta_decodes_every_attribute_to_its_python_type(tmp_path):
    x, y = separable(2, 2)
    meta = synthetic_meta(x, ("a", "b"), seed=5, info={"data": "d", "n": [1, 2]}, weights_source="w.h5")
    path = store.write_cache(tmp_path / "c.h5", {"train": {"features": x, "labels": y, "paths": ["p"] * 4}}, meta)
    back = store.read_meta(path)
    assert back.to_attrs() == meta.to_attrs()
    assert type(back.size) is int and type(back.seed) is int and type(back.format_version) is int
    assert back.augment is None and back.info == {"data": "d", "n": [1, 2]}
    assert back.class_names == ("a", "b") and back.splits == ("train",)
    with h5py.File(path) as f:
        assert json.loads(f.attrs["json_attrs"]) == ["augment", "class_names", "feature_shape", "info"]
        assert f.attrs["augment"] == "null"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", f.attrs["created"])


def test_decode_attr():
    assert store._decode_attr(b"abc", False) == "abc"
    assert store._decode_attr(b"[1]", True) == [1]
    assert store._decode_attr("[1]", False) == "[1]"
    assert store._decode_attr(np.int64(3), False) == 3 and type(store._decode_attr(np.int64(3), False)) is int
    assert store._decode_attr(np.bool_(True), False) is True


def test_natural_order_of_view_splits():
    assert store._natural("train@aug10") == ("train@", 10)
    assert store._natural("train@aug2") < store._natural("train@aug10")
    assert store._natural("augment") == ("augment", 0)
    assert store._natural("zeta") == ("zeta", 0)
    assert sorted(["train@aug10", "b", "train@aug9", "a"], key=store._natural) == [
        "a",
        "b",
        "train@aug9",
        "train@aug10",
    ]


def test_iter_split_streams_blocks_of_rows(tmp_path):
    x, y = separable(600, 2)
    path = cache_from(tmp_path / "c.h5", {"train": (x, y)}, ("a", "b"))
    blocks = list(store.iter_split(path, "train"))  # 1200 rows, 1024 per block by default
    assert [len(b) for _, b in blocks] == [1024, 176]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), x)
    assert blocks[0][1].dtype == np.int64 and np.concatenate([b for _, b in blocks]).tolist() == y.tolist()


def test_iter_split_blocks_are_consecutive_slices(tmp_path):
    x, y = separable(5, 2)
    path = cache_from(tmp_path / "c.h5", {"train": (x, y)}, ("a", "b"))
    blocks = list(store.iter_split(path, "train", rows=4))
    assert [len(b) for _, b in blocks] == [4, 4, 2]
    for i, (bx, by) in enumerate(blocks):
        np.testing.assert_array_equal(bx, x[4 * i : 4 * i + 4])
        assert by.tolist() == y[4 * i : 4 * i + 4].tolist()


def test_decode_path_keeps_undecodable_bytes():
    assert store.decode_path(b"caf\xe9") == "caf\udce9"
    assert store.decode_path("x") == "x"


# ----------------------------------------------------------------------------- the layout


@pytest.mark.parametrize(
    ("compression", "filters"), [("none", (None, None)), ("lzf", ("lzf", None)), ("gzip", ("gzip", 1))]
)
def test_compression_and_chunks(tmp_path, compression, filters):
    x, y = separable(40, 2)
    meta = synthetic_meta(x, ("a", "b"))
    path = store.write_cache(
        tmp_path / "sub" / "c.h5",
        {
            "train": {"features": x, "labels": y, "paths": [str(i) for i in range(80)]},
            "test": {"features": x[:0], "labels": y[:0], "paths": []},
        },
        meta,
        compression=compression,
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.h5"]  # the .tmp was renamed
    with h5py.File(path) as f:
        ds = f["train/features"]
        assert (ds.compression, ds.compression_opts) == filters
        assert ds.chunks == (64, 2, 2, 8) and ds.fletcher32
        assert f["train/labels"].chunks == (80,) and f["train/labels"].fletcher32
        assert f["test/features"].shape == (0, 2, 2, 8)  # no (0, ...) chunks asked for: HDF5 refuses them
        assert f["test/labels"].chunks is None and not f["test/labels"].fletcher32
    np.testing.assert_array_equal(store.load_split(path, "train")[0], x)


def test_a_cache_without_checksums_on_request(tmp_path):
    x, y = separable(2, 2)
    path = store.write_cache(
        tmp_path / "c.h5",
        {"train": {"features": x, "labels": y, "paths": ["p"] * 4}},
        synthetic_meta(x, ("a", "b")),
        checksum=False,
    )
    with h5py.File(path) as f:
        assert f["train/features"].chunks == (4, 2, 2, 8) and not f["train/features"].fletcher32


def test_text_keeps_non_utf8_bytes_and_labels_utf8_only_when_it_is(tmp_path):
    x, y = separable(1, 2)
    path = store.write_cache(
        tmp_path / "c.h5",
        {
            "train": {
                "features": x,
                "labels": y,
                "paths": ["caf\udce9.png", "ok.png"],
                "keys": ["k1", "k2"],
                "skipped": [("bad.png", "truncated")],
            },
            "test": {"features": x, "labels": y, "paths": ["é.png", "b.png"]},
        },
        synthetic_meta(x, ("a", "b")),
    )
    with h5py.File(path) as f:
        assert h5py.check_string_dtype(f["train/paths"].dtype).encoding == "ascii"
        assert h5py.check_string_dtype(f["test/paths"].dtype).encoding == "utf-8"
        assert f["train/paths"][0] == b"caf\xe9.png"
        assert [k.decode() for k in f["test/keys"][()]] == ["", ""]
        assert [k.decode() for k in f["train/skipped/keys"][()]] == [""]
    assert store.load_split(path, "train")[2] == ["caf\udce9.png", "ok.png"]
    assert store.load_split(path, "test")[2] == ["é.png", "b.png"]
    index = store.read_index(path)
    assert index.rows["train"] == {"caf\udce9.png": (0, "k1"), "ok.png": (1, "k2")}
    assert index.skipped == {"train": {"bad.png": ("truncated", "")}, "test": {}}
    assert index.virtual is False


def _with_skips(tmp_path: Path, name: str = "c.h5") -> Path:
    x, y = separable(1, 2)
    return store.write_cache(
        tmp_path / name,
        {
            "train": {
                "features": x,
                "labels": y,
                "paths": ["p0", "p1"],
                "keys": ["k0", "k1"],
                "skipped": [("bad.png", "truncated")],
            }
        },
        synthetic_meta(x, ("a", "b")),
    )


def test_read_index_of_a_cache_without_keys(tmp_path):
    path = _with_skips(tmp_path)
    with h5py.File(path, "a") as f:  # caches written before per-row keys
        del f["train/keys"]
        del f["train/skipped/keys"]
    index = store.read_index(path)
    assert index.rows["train"] == {"p0": (0, ""), "p1": (1, "")}
    assert index.skipped["train"] == {"bad.png": ("truncated", "")}


@pytest.mark.parametrize("where", ["train/keys", "train/skipped/keys", "train/skipped/reasons"])
def test_an_index_whose_keys_disagree_with_its_paths_is_never_half_read(tmp_path, where):
    path = _with_skips(tmp_path)
    with h5py.File(path, "a") as f:  # one entry short: a damaged file, not a smaller cache
        values = f[where][()][:-1]
        del f[where]
        f[where] = values
    with pytest.raises(ValueError, match="zip"):
        store.read_index(path)


# ----------------------------------------------------------------------------- assembling


def _block(chunks: store.ChunkStore, split: str, i: int, x, rows, skipped=(), reasons=()):
    chunks.save(split, i, x, np.asarray(rows), np.asarray(skipped, np.int64), list(reasons))


def test_runs_coalesce_consecutive_rows_and_list_skips_in_item_order():
    plan = store.SplitPlan(
        [f"p{i}" for i in range(7)],
        np.zeros(7, np.int64),
        [f"k{i}" for i in range(7)],
        {0: ("train", 4), 1: ("train", 5), 3: ("train", 9)},
        {5: "was bad"},
        [store.Block(np.array([2, 4]), [(6, "never")])],
    )
    runs, skipped = store._runs(plan)
    assert runs == [(("old", "train"), 4, 2), (("block", 0), 0, 1), (("old", "train"), 9, 1), (("block", 0), 1, 1)]
    assert skipped == [("p5", "was bad", "k5"), ("p6", "never", "k6")]


def test_an_item_without_a_row_is_an_internal_error():
    plan = store.SplitPlan(["p0", "p1"], np.zeros(2, np.int64), ["", ""], {0: ("train", 0)}, {}, [])
    assert _error(store._runs, plan) == "internal: no row computed for 'p1'"


def test_assemble_reuses_old_rows_and_adds_computed_ones(tmp_path):
    x, y = separable(3, 2)  # 6 rows
    old = cache_from(tmp_path / "old.h5", {"train": (x[:4], y[:4])}, ("a", "b"))
    chunks = store.ChunkStore(tmp_path / "new.h5", {"k": 1})
    _block(chunks, "train", 0, x[4:6], [1, 3], [4], ["truncated"])
    plan = store.SplitPlan(
        ["n0", "n1", "n2", "n3", "n4"],
        np.array([y[2], y[4], y[0], y[5], 1]),
        ["k0", "k1", "k2", "k3", "k4"],
        {0: ("train", 2), 2: ("train", 0)},
        {},
        chunks.blocks("train", 1),
    )
    skipped = store.assemble(
        tmp_path / "new.h5", {"train": plan}, x.shape[1:], "float16", synthetic_meta(x, ("a", "b")), old=old
    )
    assert skipped == {"train": [("n4", "truncated")]}
    got, labels, paths = store.load_split(tmp_path / "new.h5", "train")
    np.testing.assert_array_equal(got, x[[2, 4, 0, 5]].astype(np.float16))
    assert labels.tolist() == [y[2], y[4], y[0], y[5]]
    assert paths == ["n0", "n1", "n2", "n3"]
    index = store.read_index(tmp_path / "new.h5")
    assert index.rows["train"]["n3"] == (3, "k3")
    assert index.skipped["train"] == {"n4": ("truncated", "k4")}
    assert not (tmp_path / "new.h5.tmp").exists()


def _shard(path: Path, x: np.ndarray) -> store.Block:
    with h5py.File(path, "w") as f:
        f["train/features"] = x
    return store.Block(np.arange(len(x)), [], h5=path, dataset="train/features")


def test_a_virtual_cache_maps_shard_files_by_relative_name(tmp_path):
    x, y = separable(3, 2)
    folder = tmp_path / "cache"
    folder.mkdir()
    blocks = [_shard(folder / "s0.h5", x[:4]), _shard(folder / "s1.h5", x[4:])]
    blocks[1].rows = np.arange(4, 6)
    assert blocks[1].load(1, 2).tolist() == x[5:6].tolist()
    plans = {
        "train": store.SplitPlan([f"p{i}" for i in range(6)], y, [""] * 6, {}, {}, blocks),
        "test": store.SplitPlan([], np.zeros(0, np.int64), [], {}, {}, []),
    }
    store.assemble(folder / "c.h5", plans, x.shape[1:], "float32", synthetic_meta(x, ("a", "b")), virtual=True)
    with h5py.File(folder / "c.h5") as f:
        assert f["train/features"].is_virtual
        assert sorted(vs.file_name for vs in f["train/features"].virtual_sources()) == ["s0.h5", "s1.h5"]
        assert f["test/features"].shape == (0, 2, 2, 8)
    assert store.read_index(folder / "c.h5").virtual is True
    moved = tmp_path / "moved"
    folder.rename(moved)  # the cache folder moves as a whole
    np.testing.assert_array_equal(store.load_split(moved / "c.h5", "train")[0], x)
    (moved / "s1.h5").unlink()
    assert _error(store.read_meta, moved / "c.h5") == (
        f"{moved / 'c.h5'} is merged from shards and its shard file {moved / 's1.h5'} is missing; "
        "rerun the shards (or `make extract FORCE=1`)"
    )


def test_a_virtual_cache_refuses_rows_that_are_not_shard_files(tmp_path):
    x, y = separable(1, 2)
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    _block(chunks, "train", 0, x, [0, 1])
    plans = {"train": store.SplitPlan(["a", "b"], y, ["", ""], {}, {}, chunks.blocks("train", 1))}
    err = _error(store.assemble, tmp_path / "c.h5", plans, x.shape[1:], "float32", synthetic_meta(x), None, None, True)
    assert err == "internal: a virtual cache can only map shard files"
    old = _cache(tmp_path, n=1, name="old.h5")
    plans = {"train": store.SplitPlan(["a"], y[:1], [""], {0: ("train", 0)}, {}, [])}
    err = _error(store.assemble, tmp_path / "c.h5", plans, x.shape[1:], "float32", synthetic_meta(x), "none", old, True)
    assert err == "internal: a virtual cache can only map shard files"


# ----------------------------------------------------------------------------- partial chunks


def test_chunks_live_in_a_hidden_partial_folder_with_their_identity(tmp_path):
    chunks = store.ChunkStore(tmp_path / "c.h5", {"weights": "w", "n": (1, 2)})
    assert chunks.dir == tmp_path / ".c.partial"
    assert json.loads((chunks.dir / "meta.json").read_text()) == {"weights": "w", "n": [1, 2]}
    assert chunks.chunk_file("train", 3) == chunks.dir / "train-000003.npz"
    x, _ = separable(1, 2)
    _block(chunks, "train", 3, x, [0, 1], [2], ["bad"])
    assert chunks.done("train", 3) and not chunks.done("train", 2)
    assert sorted(p.name for p in chunks.dir.iterdir()) == ["meta.json", "train-000003.npz"]  # no .tmp left
    with np.load(chunks.chunk_file("train", 3)) as z:
        assert z["rows"].dtype == np.int64 and z["skipped_rows"].tolist() == [2]
        assert z["skipped_reasons"].tolist() == ["bad"]
    same = store.ChunkStore(tmp_path / "c.h5", {"n": [1, 2], "weights": "w"})  # same identity: kept
    assert same.done("train", 3)
    other = store.ChunkStore(tmp_path / "c.h5", {"weights": "v", "n": [1, 2]})
    assert not other.done("train", 3)
    assert json.loads((other.dir / "meta.json").read_text())["weights"] == "v"
    other.discard()
    assert not other.dir.exists()


def test_partial_work_with_an_unreadable_identity_is_discarded(tmp_path):
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    x, _ = separable(1, 2)
    _block(chunks, "train", 0, x, [0, 1])
    (chunks.dir / "meta.json").write_text("{not json")
    assert not store.ChunkStore(tmp_path / "c.h5", {"k": 1}).done("train", 0)
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    _block(chunks, "train", 0, x, [0, 1])
    (chunks.dir / "meta.json").unlink()
    assert not store.ChunkStore(tmp_path / "c.h5", {"k": 1}).done("train", 0)


def test_blocks_read_back_rows_and_skips(tmp_path):
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    x, _ = separable(2, 2)
    _block(chunks, "train", 0, x[:2], [0, 2], [1], ["truncated"])
    _block(chunks, "train", 1, x[2:], [3, 4, 5, 6], [], [])
    blocks = chunks.blocks("train", 2)
    assert [b.rows.tolist() for b in blocks] == [[0, 2], [3, 4, 5, 6]]
    assert blocks[0].rows.dtype == np.int64
    assert [b.skipped for b in blocks] == [[(1, "truncated")], []]
    assert blocks[1].npz == chunks.chunk_file("train", 1)
    np.testing.assert_array_equal(blocks[1].load(1, 3), x[3:5])


# ----------------------------------------------------------------------------- the writer lock


def test_the_writer_lock_names_its_holder_and_is_released(tmp_path):
    final = tmp_path / "sub" / "c.h5"
    with store.writer_lock(final):
        info = json.loads((tmp_path / "sub" / "c.h5.lock.json").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        err = _error(lambda: store.writer_lock(final).__enter__())
        assert err == (
            f"{final} is being written by pid {info['pid']} on {info['host']} since {info['since']} "
            f"(lock {final}.lock); wait for it to finish"
        )
        (tmp_path / "sub" / "c.h5.lock.json").write_text("garbage")
        err = _error(lambda: store.writer_lock(final).__enter__())
        assert err == f"{final} is being written by another process (lock {final}.lock); wait for it to finish"
    assert not (tmp_path / "sub" / "c.h5.lock.json").exists()
    with store.writer_lock(final):  # released: the next writer gets it
        pass


def test_identity_diff_ignores_the_input_fingerprint():
    x, _ = separable(1, 2)
    key = synthetic_meta(x).key()
    other = store.CacheKey(**{**key.__dict__, "fingerprint": "other", "layer": "block4_pool"})
    assert key.identity_diff(other) == ["layer: cache has 'block5_pool', asked for 'block4_pool'"]
    assert key.diff(other) == [
        "layer: cache has 'block5_pool', asked for 'block4_pool'",
        "fingerprint: cache has 'synthetic', asked for 'other'",
    ]
    assert store.IDENTITY_FIELDS == ("backbone", "weights", "layer", "size", "dtype", "precision", "preprocessing")


def test_natural_order_splits_at_the_last_aug():
    assert store._natural("augmented@aug2") == ("augmented@", 2)


def test_discarding_partial_work_twice_is_fine(tmp_path):
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    chunks.discard()
    chunks.discard()
    assert not chunks.dir.exists()


def test_a_virtual_cache_of_three_shards_keeps_row_order_and_dtype(tmp_path):
    x, y = separable(3, 2)
    x = x.astype(np.float16)
    blocks = [_shard(tmp_path / f"s{i}.h5", x[2 * i : 2 * i + 2]) for i in range(3)]
    for i, b in enumerate(blocks):
        b.rows = np.arange(2 * i, 2 * i + 2)
    plans = {
        "train": store.SplitPlan([f"p{i}" for i in range(6)], y, [""] * 6, {}, {}, blocks),
        "test": store.SplitPlan([], np.zeros(0, np.int64), [], {}, {}, []),
    }
    store.assemble(tmp_path / "c.h5", plans, x.shape[1:], "float16", synthetic_meta(x, ("a", "b")), virtual=True)
    got = store.load_split(tmp_path / "c.h5", "train")[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["test/features"].dtype == np.float16
    (tmp_path / "s2.h5").unlink()
    with h5py.File(tmp_path / "c.h5") as f:  # a reader that skips read_meta sees NaN, never plausible zeros
        assert np.isnan(f["train/features"][4:]).all()
        np.testing.assert_array_equal(f["train/features"][:4], x[:4])


def test_assembled_caches_keep_the_compression_asked_for(tmp_path):
    x, y = separable(2, 2)
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    _block(chunks, "train", 0, x, [0, 1, 2, 3])
    plans = {"train": store.SplitPlan(["a", "b", "c", "d"], y, [""] * 4, {}, {}, chunks.blocks("train", 1))}
    store.assemble(tmp_path / "c.h5", plans, x.shape[1:], "float32", synthetic_meta(x, ("a", "b")), "gzip")
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["train/features"].compression == "gzip"
    np.testing.assert_array_equal(store.load_split(tmp_path / "c.h5", "train")[0], x)


def test_partial_work_for_other_inputs_is_discarded_with_a_warning(tmp_path, caplog):
    final = tmp_path / "new" / "folder" / "c.h5"  # the cache folder need not exist yet
    chunks = store.ChunkStore(final, {"k": 1})
    assert chunks.dir.is_dir()
    with caplog.at_level("WARNING", logger="pipeline.cache.store"):
        store.ChunkStore(final, {"k": 1})
        assert caplog.records == []
        store.ChunkStore(final, {"k": 2})
    assert [r.getMessage() for r in caplog.records] == [
        f"discarding partial work in {chunks.dir}: it was made for other inputs or options"
    ]


def test_a_one_row_split_is_chunked_and_checksummed_like_any(tmp_path):
    x, y = separable(1, 2)
    x = x.astype(np.float16)
    path = store.write_cache(
        tmp_path / "a" / "b" / "c.h5",  # folders made as needed
        {
            "train": {"features": x, "labels": y.astype(np.int32), "paths": ["p0", "p1"]},
            "test": {"features": x[:1], "labels": y[:1], "paths": ["t"]},
        },
        synthetic_meta(x, ("a", "b")),
    )
    with h5py.File(path) as f:
        one = f["test/features"]
        assert one.chunks == (1, 2, 2, 8) and one.fletcher32 and one.dtype == np.float16
        assert f["test/labels"].chunks == (1,) and f["test/labels"].fletcher32
        assert f["train/labels"].dtype == np.int64  # the documented layout, whatever the labels came as
    assert store.load_split(path, "test")[1].tolist() == y[:1].tolist()


def test_assembled_caches_are_checksummed(tmp_path):
    x, y = separable(1, 2)
    chunks = store.ChunkStore(tmp_path / "c.h5", {"k": 1})
    _block(chunks, "train", 0, x, [0, 1])
    plans = {"train": store.SplitPlan(["a", "b"], y.astype(np.int32), ["", ""], {}, {}, chunks.blocks("train", 1))}
    store.assemble(tmp_path / "c.h5", plans, x.shape[1:], "float32", synthetic_meta(x, ("a", "b")))
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["train/features"].fletcher32 and f["train/labels"].dtype == np.int64


def test_meta_to_dict_writes_any_value_as_text():
    x, _ = separable(1, 2)
    meta = synthetic_meta(x, info={"weights": Path("/w/v.h5"), "rows": np.int64(3)})
    assert meta.to_dict()["info"] == {"weights": "/w/v.h5", "rows": "3"}
