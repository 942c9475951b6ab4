"""pipeline.features.sources without TensorFlow: the .npz errors, array sources (digits, a stubbed
cifar10), content keys and the hashed split, each checked exactly (issue 16: `make mutate`
runs this file; TESTING.md)."""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import ExtractConfig
from pipeline.core.errors import ConfigError
from pipeline.features import sources

from conftest import make_image

NPZ_HOW = "DATA=*.npz must be written by numpy.savez(path, x=images, y=labels)"


def _resolve(data: Path | str, **kw) -> sources.Source:
    return sources.resolve(ExtractConfig(data=str(data), **kw))


def _refused(data: Path) -> str:
    with pytest.raises(ConfigError) as info:
        _resolve(data)
    return str(info.value)


# ----------------------------------------------------------------------------- .npz files


def test_a_missing_npz_is_named(tmp_path):
    assert _refused(tmp_path / "gone.npz") == f"data file {tmp_path / 'gone.npz'} does not exist"


def test_an_unreadable_npz_is_named_with_the_reason(tmp_path, monkeypatch):
    data = tmp_path / "d.npz"
    data.write_bytes(b"PK")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sources, "open", denied, raising=False)  # root reads any file: stand in for chmod 000
    assert _refused(data) == f"cannot read {data}: Permission denied"


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"", "it is empty"),
        (b"\x93NUMPY\x01\x00v\x00{'descr': '|u1'", "it holds a single array written by numpy.save"),
        (b"x,y\n1,2\n", "it is not a zip archive"),
        (b"\x93num", "it is not a zip archive"),
    ],
)
def test_a_file_that_is_not_a_zip_says_what_it_is(tmp_path, content, what):
    data = tmp_path / "d.npz"
    data.write_bytes(content)
    assert _refused(data) == f"{data} is not a valid .npz file ({what}); {NPZ_HOW}"


def test_a_real_npy_file_is_told_apart(tmp_path):
    data = tmp_path / "d.npz"
    with open(data, "wb") as f:
        np.save(f, np.zeros((2, 4, 4, 3), np.uint8))
    assert "(it holds a single array written by numpy.save)" in _refused(data)


@pytest.mark.parametrize(("arrays", "missing"), [({"x"}, ["y"]), ({"y"}, ["x"]), (set(), ["x", "y"])])
def test_missing_arrays_are_named(tmp_path, arrays, missing):
    data = tmp_path / "d.npz"
    full = {"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 1]), "other": np.zeros(1)}
    np.savez(data, **{k: v for k, v in full.items() if k in arrays or k == "other"})
    assert _refused(data) == (f"{data} lacks array(s) {missing}; a .npz needs x (N,H,W,3 or N,H,W uint8) and y (N,)")


def test_an_object_array_is_refused_without_unpickling(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4) % 2)
    assert _refused(data) == (
        f"{data} holds an array of Python objects (dtype=object); save plain arrays "
        "instead: x as uint8, y as integers or strings, class_names as strings"
    )


def test_a_malformed_member_is_named_with_numpys_reason(tmp_path):
    import zipfile

    data = tmp_path / "d.npz"
    with zipfile.ZipFile(data, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00\x10\x00{garbage}       \n")
        z.writestr("y.npy", b"")
    err = _refused(data)
    assert err.startswith(f"{data} is not a valid .npz file (malformed node or string")
    assert err.endswith(f"); {NPZ_HOW}")
    assert "pickle" not in err


def test_a_truncated_zip_names_the_exception(tmp_path):
    np.savez(tmp_path / "full.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(4) % 2)
    data = tmp_path / "d.npz"
    data.write_bytes((tmp_path / "full.npz").read_bytes()[:100])
    assert _refused(data) == f"{data} is not a valid .npz file (BadZipFile: File is not a zip file); {NPZ_HOW}"


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), np.arange(4) % 2, ": x must be uint8 (0..255); received dtype float32"),
        (np.zeros((4, 8), np.uint8), np.arange(4) % 2, ": x must have shape (N,H,W,3) or (N,H,W); received (4, 8)"),
        (np.zeros((4, 3), np.uint8), np.arange(4) % 2, ": x must have shape (N,H,W,3) or (N,H,W); received (4, 3)"),
        (
            np.zeros((4, 8, 8, 4), np.uint8),
            np.arange(4) % 2,
            ": x must have shape (N,H,W,3) or (N,H,W); received (4, 8, 8, 4)",
        ),
        (np.zeros((4, 8, 8, 3), np.uint8), np.arange(3) % 2, ": y must have shape (4,); received (3,)"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 1), np.int64), ": y must have shape (4,); received (4, 1)"),
        (np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64), " holds no images (x has 0 rows)"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64), " has a single class, '0' (every y is 0): a"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.array(["cat"] * 4), " has a single class, 'cat' (every y is 'cat'): a"),
    ],
)
def test_bad_arrays_are_named_with_what_was_received(tmp_path, x, y, message):
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    err = _refused(data)
    assert err.startswith(f"{data}{message}")
    if "single class" in message:
        assert err.endswith("classifier needs at least two classes")


def test_one_row_is_enough_per_npz_but_not_one_class(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((1, 4, 4, 3), np.uint8), y=np.array([5]), class_names=np.array(["five"]))
    assert _refused(data) == (
        f"{data} has a single class, 'five' (every y is 5): a classifier needs at least two classes"
    )


def test_class_names_must_match_the_distinct_labels(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 4, 4, 3), np.uint8), y=np.arange(4) % 2, class_names=np.array(["a", "b", "c"]))
    assert _refused(data) == f"{data}: class_names has 3 entries but y has 2 distinct values"


def test_npz_without_class_names_names_classes_by_sorted_label(tmp_path):
    x = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2)
    y = np.array(["dog", "cat", "dog", "cat", "cat", "dog"])
    data = tmp_path / "My data!.npz"
    np.savez(data, x=x, y=y)
    src = _resolve(data, split=(0.5, 0.5, 0.0))
    assert src.class_names == ["cat", "dog"]
    assert src.name == "My data!"
    assert src.kind == "npz"
    assert src.root is None
    digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]
    assert src.key == f"My_data-{digest}"  # the cache folder: a slug of the stem and the path's hash
    assert set(src.splits) == {"train", "validation"}  # a split with no rows is left out
    for s in src.splits.values():
        rows = [int(p[len("My data![") : -1]) for p in s.paths]
        assert s.labels.dtype == np.int64
        assert s.labels.tolist() == [["cat", "dog"].index(y[i]) for i in rows]
        np.testing.assert_array_equal(s.arrays, np.repeat(x[rows][..., None], 3, axis=-1))
        assert s.arrays.dtype == np.uint8
    assert src.items("train") is src.splits["train"].arrays


# ----------------------------------------------------------------------------- array sources


def _arrays_source(y, name="arr", key="arr-1234", **kw):
    x = np.arange(len(y) * 2 * 2 * 3, dtype=np.uint8).reshape(len(y), 2, 2, 3)
    x[1] = x[0]  # two rows with the same pixels: the same key
    return x, sources._from_arrays(name, key, x, np.asarray(y), ["a", "b"], ExtractConfig(**kw))


def test_array_sources_keep_rows_labels_and_per_row_keys():
    y = np.array([0, 1] * 10, np.int32)
    x, src = _arrays_source(y)
    assert (src.name, src.key, src.root, src.class_names, src.kind) == ("arr", "arr-1234", None, ["a", "b"], "npz")
    assert src.notes == ["arr: stratified split [0.7, 0.15, 0.15] seed 0"]
    seen = []
    for s in src.splits.values():
        rows = [int(p[len("arr[") : -1]) for p in s.paths]
        seen += rows
        assert s.labels.dtype == np.int64
        assert s.labels.tolist() == y[rows].tolist()
        np.testing.assert_array_equal(s.arrays, x[rows])
        # a row's key is the hash of its pixels: incremental runs of every cache made so far match on it
        assert s.keys == [hashlib.blake2b(x[i].tobytes(), digest_size=16).hexdigest() for i in rows]
    assert sorted(seen) == list(range(20))
    keys = {int(p[4:-1]): k for s in src.splits.values() for p, k in zip(s.paths, s.keys, strict=True)}
    assert keys[0] == keys[1] and len(set(keys.values())) == 19


def test_array_split_is_seeded_and_part_of_the_fingerprint():
    y = np.array([0, 1] * 20)

    def assignment(src):
        return {p: s for s, split in src.splits.items() for p in split.paths}

    _, a = _arrays_source(y)
    _, again = _arrays_source(y)
    _, other_seed = _arrays_source(y, seed=1)
    _, other_split = _arrays_source(y, split=(0.5, 0.25, 0.25))
    assert assignment(a) == assignment(again)
    assert a.fingerprint == again.fingerprint
    assert assignment(other_seed) != assignment(a)
    assert len({a.fingerprint, other_seed.fingerprint, other_split.fingerprint}) == 3
    assert other_seed.notes == ["arr: stratified split [0.7, 0.15, 0.15] seed 1"]
    _, renamed = _arrays_source(y, name="other")
    assert renamed.fingerprint != a.fingerprint
    _, relabelled = _arrays_source(1 - y)
    assert relabelled.fingerprint != a.fingerprint
    # caches made by earlier versions must still hit: the recipe (name, pixels, int64 labels, split) is pinned
    x, int32 = _arrays_source(y.astype(np.int32))
    digest = hashlib.sha256(b"arr")
    for part in (x.tobytes(), y.astype(np.int64).tobytes(), b"split [0.7, 0.15, 0.15] seed 0"):
        digest.update(part)
    assert a.fingerprint == int32.fingerprint == digest.hexdigest()


def test_given_splits_are_kept_and_key_equal_to_name_means_builtin():
    x = np.zeros((5, 2, 2, 3), np.uint8)
    y = np.array([0, 1, 0, 1, 1])
    given = {"train": np.arange(3), "validation": np.arange(0), "test": np.arange(3, 5)}
    src = sources._from_arrays("b", "b", x, y, ["a", "b"], ExtractConfig(), given)
    assert src.kind == "builtin"
    assert src.notes == []
    assert {s: v.paths for s, v in src.splits.items()} == {"train": ["b[0]", "b[1]", "b[2]"], "test": ["b[3]", "b[4]"]}


def test_digits_are_sklearns_images_scaled_to_255_and_rgb():
    from sklearn.datasets import load_digits

    d = load_digits()
    src = _resolve("digits")
    assert (src.name, src.key, src.kind, src.root) == ("digits", "digits", "builtin", None)
    assert src.class_names == [str(i) for i in range(10)]
    assert src.notes == ["digits: stratified split [0.7, 0.15, 0.15] seed 0"]
    assert sum(len(s) for s in src.splits.values()) == len(d.target) == 1797
    for s in src.splits.values():
        rows = [int(p[len("digits[") : -1]) for p in s.paths]
        assert s.labels.tolist() == d.target[rows].tolist()
        assert s.arrays.dtype == np.uint8 and s.arrays.shape[1:] == (8, 8, 3)
        expected = np.round(d.images[rows] * (255.0 / 16.0)).astype(np.uint8)  # ink 0..16 -> 0..255
        for c in range(3):
            np.testing.assert_array_equal(s.arrays[..., c], expected)
    every = np.concatenate([s.arrays for s in src.splits.values()])
    assert every.min() == 0 and every.max() == 255


def _fake_keras(monkeypatch, load_data):
    keras = types.ModuleType("keras")
    datasets = types.ModuleType("keras.datasets")
    datasets.cifar10 = types.SimpleNamespace(load_data=load_data)  # type: ignore[attr-defined]
    keras.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keras", keras)
    monkeypatch.setitem(sys.modules, "keras.datasets", datasets)


def test_cifar10_keeps_its_train_and_test_rows(monkeypatch):
    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (3, 4, 4, 3), np.uint8), rng.integers(0, 256, (2, 4, 4, 3), np.uint8)
    ytr, yte = np.array([[9], [0], [3]], np.uint8), np.array([[1], [2]], np.uint8)
    _fake_keras(monkeypatch, lambda: ((xtr, ytr), (xte, yte)))  # no download in a test
    src = _resolve("cifar10")
    assert (src.name, src.key, src.kind, src.notes) == ("cifar10", "cifar10", "builtin", [])
    assert src.class_names == sources.CIFAR10_CLASSES and len(src.class_names) == 10
    assert list(src.splits) == ["train", "test"]  # cifar10's own split; no validation
    assert src.splits["train"].paths == ["cifar10[0]", "cifar10[1]", "cifar10[2]"]
    assert src.splits["test"].paths == ["cifar10[3]", "cifar10[4]"]
    assert src.splits["train"].labels.tolist() == [9, 0, 3]
    assert src.splits["test"].labels.tolist() == [1, 2]
    assert src.splits["train"].labels.dtype == np.int64
    np.testing.assert_array_equal(src.splits["train"].arrays, xtr)
    np.testing.assert_array_equal(src.splits["test"].arrays, xte)


def test_cifar10_unavailable_says_where_to_put_the_file(monkeypatch):
    def offline():
        raise OSError("no network")

    _fake_keras(monkeypatch, offline)
    with pytest.raises(ConfigError) as info:
        _resolve("cifar10")
    assert str(info.value) == (
        "DATA=cifar10 could not be loaded (OSError: no network). Keras downloads it once into "
        "~/.keras/datasets/cifar-10-batches-py.tar.gz; put that file there on an offline machine, "
        "or use DATA=digits / a folder of images"
    )


# ----------------------------------------------------------------------------- folders


def test_an_unreadable_folder_below_a_class_is_named(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError) as info:
        sources._list_files(gone)
    assert str(info.value) == f"cannot read folder {gone}: No such file or directory; fix its permissions"


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    for cls in ("a", "b"):
        for i in range(3):
            make_image(tmp_path / "d" / cls / f"{i}.png", (10, 20, 30), 8, i)
    return tmp_path / "d"


def test_content_keys_are_the_sha256_of_the_bytes(flat):
    src = _resolve(flat, content_hash=True)
    for s in src.splits.values():
        for p, k in zip(s.paths, s.keys, strict=True):
            assert k == "sha256:" + hashlib.sha256((flat / p).read_bytes()).hexdigest()
    f = flat / "a" / "0.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: same bytes
    assert _resolve(flat, content_hash=True).fingerprint == src.fingerprint
    assert _resolve(flat).fingerprint != src.fingerprint  # the stat key sees the touch
    f.write_bytes(f.read_bytes() + b"\0")
    assert _resolve(flat, content_hash=True).fingerprint != src.fingerprint


def test_content_key_of_a_file_larger_than_one_read(tmp_path):
    f = tmp_path / "big.bin"
    data = os.urandom((1 << 20) + 17)
    f.write_bytes(data)
    assert sources._content_key(f) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert sources._content_key(tmp_path / "absent") == "missing"


def test_unreadable_files_fall_back_to_the_stat_key(tmp_path):
    link = tmp_path / "link.png"
    os.symlink(tmp_path / "nowhere.png", link)
    st = link.lstat()
    assert sources._content_key(link) == f"link|{st.st_size}|{st.st_mtime_ns}"
    assert sources._stat_key(link) == f"link|{st.st_size}|{st.st_mtime_ns}"
    f = tmp_path / "f.png"
    f.write_bytes(b"12345")
    st = f.stat()
    assert sources._stat_key(f) == f"5|{st.st_mtime_ns}"


# ----------------------------------------------------------------------------- the hashed split


def test_path_hash_is_sha256_of_seed_and_path_as_64_bits():
    # the split of an unsplit folder must not change between versions or machines: pin the recipe
    for seed in (0, 3):
        raw = hashlib.sha256(f"{seed}|train/cats/1.png".encode()).digest()
        assert sources.path_hash("train/cats/1.png", seed) == int.from_bytes(raw[:8], "big")
    assert sources.path_hash("x.png") == sources.path_hash("x.png", 0)
    assert all(0 <= sources.path_hash(f"{i}.png") < 2**64 for i in range(200))


def test_hashed_assignment_cuts_the_unit_interval_at_the_fractions():
    paths = [f"c/{i}.png" for i in range(3000)]
    for seed, fractions in ((0, (0.7, 0.15, 0.15)), (5, (0.5, 0.3, 0.2))):
        a = sources.hashed_assignment(paths, fractions, seed)
        assert a.dtype == np.int64
        u = [sources.path_hash(p, seed) / 2.0**64 for p in paths]
        expected = [0 if v < fractions[0] else 1 if v < fractions[0] + fractions[1] else 2 for v in u]
        assert a.tolist() == expected
        shares = np.bincount(a, minlength=3) / len(paths)
        np.testing.assert_allclose(shares, fractions, atol=0.03)
    assert not np.array_equal(
        sources.hashed_assignment(paths, (0.7, 0.15, 0.15), 0), sources.hashed_assignment(paths, (0.7, 0.15, 0.15), 1)
    )


def test_stratified_assignment_returns_split_indices():
    a = sources.stratified_assignment(np.array([0, 0, 0, 0, 1, 1, 1, 1]), (0.5, 0.25, 0.25), 0)
    assert a.dtype == np.int64
    assert sorted(a[:4].tolist()) == sorted(a[4:].tolist()) == [0, 0, 1, 2]


def test_slug_keeps_safe_characters_only():
    assert sources._slug("my photos (2024)") == "my_photos_2024"
    assert sources._slug("a.b-c_d") == "a.b-c_d"
    assert sources._slug("..x..") == "x"
    assert sources._slug("???") == "data"
    assert sources._slug("Xray_X") == "Xray_X"
    assert sources._fs_bytes("caf\udce9") == b"caf\xe9"


# ----------------------------------------------------------------------------- folder layouts and their errors

EXTENSIONS = ".jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, .tiff"


def _folder_error(root: Path) -> str:
    with pytest.raises(ConfigError) as info:
        _resolve(root)
    return str(info.value)


def test_resolve_names_data_that_is_neither_folder_npz_nor_builtin(tmp_path, monkeypatch):
    assert _folder_error(tmp_path / "nope") == (
        f"data {str(tmp_path / 'nope')!r} is neither a folder, a .npz file, nor a built-in dataset "
        "['digits', 'cifar10']"
    )
    (tmp_path / "f.csv").write_text("x")
    assert _folder_error(tmp_path / "f.csv") == (
        f"data {str(tmp_path / 'f.csv')!r} is a file but not a .npz; give a folder of images, a .npz, "
        "or one of ['digits', 'cifar10']"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    np.savez(tmp_path / "h.npz", x=np.zeros((4, 2, 2, 3), np.uint8), y=np.arange(4) % 2)
    assert _resolve("~/h.npz").name == "h"  # ~ is the user's home


def test_an_unreadable_split_folder_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        sources._class_dirs(tmp_path / "gone", "train", [])
    assert str(info.value) == f"cannot read folder {tmp_path / 'gone'}: No such file or directory"


def test_a_folder_without_class_folders(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "notes.txt").write_text("x")
    (root / ".hidden").mkdir()
    assert _folder_error(root) == f"{root} has no class folders; expected {root}/<class>/<image files>"


def test_class_folders_whose_names_print_the_same_are_refused(tmp_path):
    root = tmp_path / "d"
    a, b = root / "caf\\xe9", root / os.fsdecode(b"caf\xe9")
    for d in (a, b):
        make_image(d / "0.png", (1, 2, 3), 4, 0)
    assert _folder_error(root) == (f"class folders {str(a)!r} and {str(a)!r} have the same printable name; rename one")


def test_class_folders_without_images_are_named_with_what_they_hold(tmp_path):
    root = tmp_path / "d"
    make_image(root / "cats" / "0.png", (1, 2, 3), 4, 0)
    (root / "dogs").mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (root / "owls" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "owls" / name).write_text("x")
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / "pigs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pigs" / name).write_text("x")
    assert _folder_error(root) == (
        f"class folder(s) without images: {root / 'dogs'} is empty; "
        f"{root / 'owls'} holds no image files, only 4 other file(s) (a.txt, b.txt, c.txt, ...); "
        f"{root / 'pigs'} holds no image files, only 3 other file(s) (a.txt, b.txt, c.txt). "
        f"Images are files ending in {EXTENSIONS}; add some or remove the folder"
    )


def test_a_split_or_folder_without_any_image_is_named(tmp_path):
    root = tmp_path / "d"
    make_image(root / "train" / "cats" / "0.png", (1, 2, 3), 4, 0)
    make_image(root / "train" / "dogs" / "0.png", (1, 2, 3), 4, 0)
    (root / "test" / "cats").mkdir(parents=True)
    (root / "test" / "dogs").mkdir(parents=True)
    assert _folder_error(root) == (
        f"split 'test' ({root / 'test'}) has no images: {root / 'test' / 'cats'} is empty; "
        f"{root / 'test' / 'dogs'} is empty. Images are files ending in {EXTENSIONS}; add some or remove the folder"
    )
    flat = tmp_path / "flat"
    (flat / "cats").mkdir(parents=True)
    (flat / "dogs").mkdir(parents=True)
    assert _folder_error(flat).startswith(f"{flat} has no images: {flat / 'cats'} is empty; ")


def test_a_class_missing_from_one_split_is_named(tmp_path):
    root = tmp_path / "d"
    for split, classes in (("train", ("cats", "dogs")), ("validation", ("cats",))):
        for c in classes:
            make_image(root / split / c / "0.png", (1, 2, 3), 4, 0)
    assert _folder_error(root) == (
        f"class(es) ['dogs'] exist in other splits but not in {root / 'validation'}; "
        "every split needs the same class folders"
    )


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_a_single_class_is_refused_with_the_layout_expected(tmp_path, layout):
    root = tmp_path / "d"
    make_image(root / ("train/cats" if layout == "splits" else "cats") / "0.png", (1, 2, 3), 4, 0)
    expected = f"{root}/<split>/<class>/<image files>" if layout == "splits" else f"{root}/<class>/<image files>"
    assert _folder_error(root) == (
        f"{root} has a single class, 'cats': a classifier needs at least two class folders "
        f"(expected {expected}). Add another class folder, or point DATA at the folder that holds the class folders"
    )


def test_a_folder_source_lists_items_in_class_then_file_order(tmp_path, caplog):
    root = tmp_path / "My Images"
    for split in ("train", "test"):
        for c in ("dogs", "cats"):
            for i in (1, 0):
                make_image(root / split / c / f"{i}.png", (1, 2, 3), 4, i)
    (root / "train" / "cats" / "notes.txt").write_text("x")
    (root / "train" / "README").write_text("x")
    (root / "test" / "dogs" / "x.TXT").write_text("x")
    (root / "test" / "dogs" / ".DS_Store").write_text("x")
    (root / "test" / ".cache").mkdir()
    make_image(root / "train" / "cats" / ".thumbs" / "0.png", (1, 2, 3), 4, 0)  # hidden: never an item
    make_image(root / "train" / "cats" / ".2.png", (1, 2, 3), 4, 0)
    with caplog.at_level("DEBUG", logger="pipeline.features.sources"):
        src = _resolve(root)
    assert (src.name, src.kind, src.root, src.class_names) == ("My Images", "folder", root.resolve(), ["cats", "dogs"])
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    assert src.key == f"My_Images-{digest}"
    assert list(src.splits) == ["train", "test"]
    assert src.splits["train"].paths == ["train/cats/0.png", "train/cats/1.png", "train/dogs/0.png", "train/dogs/1.png"]
    assert src.splits["train"].labels.tolist() == [0, 0, 1, 1] and src.splits["train"].labels.dtype == np.int64
    assert src.splits["test"].keys == [sources._stat_key(root / p) for p in src.splits["test"].paths]
    assert src.items("test") == [str(root / p) for p in src.splits["test"].paths]
    assert sorted(src.ignored) == ["test/dogs/x.TXT", "train/README", "train/cats/notes.txt"]
    assert src.notes == [
        f"ignored 3 file(s) under {root} that are not images by extension (.txt: 2, no extension: 1); -v lists them"
    ]
    assert sorted(r.getMessage() for r in caplog.records if "ignored:" in r.getMessage()) == [
        f"not an image, ignored: {p}" for p in sorted(src.ignored)
    ]


def test_an_unsplit_folder_says_how_it_was_split(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(10):
            make_image(root / c / f"{i}.png", (1, 2, 3), 4, i)
    src = _resolve(root, split=(0.5, 0.5, 0.0), seed=2)
    assert src.notes == [
        f"no train/validation/test folders in {root}: split [0.5, 0.5, 0.0] by a hash of each file's path "
        "with seed 2 (a file keeps its split when others are added or removed)"
    ]
    assigned = sources.hashed_assignment([f"{c}/{i}.png" for c in "ab" for i in range(10)], (0.5, 0.5, 0.0), 2)
    expected = {
        s: [f"{c}/{i}.png" for c in "ab" for i in range(10) if assigned["ab".index(c) * 10 + i] == si]
        for si, s in enumerate(("train", "validation"))
    }
    assert {s: v.paths for s, v in src.splits.items()} == expected
    for split in src.splits.values():
        assert split.labels.tolist() == ["ab".index(p[0]) for p in split.paths]


def test_folder_fingerprint_covers_layout_paths_and_keys(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "test"):
        for c in ("a", "b"):
            make_image(root / split / c / "0.png", (1, 2, 3), 4, 0)
    base = _resolve(root).fingerprint
    # caches made by earlier versions must still hit: the recipe is pinned
    digest = hashlib.sha256(b"folder|folders\n")
    for p in ("train/a/0.png", "train/b/0.png", "test/a/0.png", "test/b/0.png"):
        digest.update(f"{p.split('/')[0]}|{p}|{sources._stat_key(root / p)}\n".encode())
    assert base == digest.hexdigest()
    (root / "train" / "a" / "0.png").rename(root / "train" / "a" / "1.png")
    assert _resolve(root).fingerprint != base
    (root / "train" / "a" / "1.png").rename(root / "train" / "a" / "0.png")
    assert _resolve(root).fingerprint == base
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    assert _resolve(root).fingerprint == base  # other files are not part of it
