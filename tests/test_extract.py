"""Stage one: shapes, equality with a direct Keras forward pass, alignment, cache hits,
mismatches, bad files and strict mode."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import ConfigError
from pipeline.features import backbone, registry, weights
from pipeline.features.extract import extract
from pipeline.features.layout import locate

from conftest import make_folder, make_image


def cfg_for(data: Path | str, cache_dir: Path, **kw) -> ExtractConfig:
    kw.setdefault("size", 32)
    kw.setdefault("weights", "random")
    return ExtractConfig(data=str(data), cache_dir=cache_dir, quiet=True, **kw)


@pytest.mark.parametrize(("size", "side"), [(32, 1), (150, 4), (180, 5)])
def test_feature_shapes(tmp_path, cache_dir, size, side):
    root = make_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    result = extract(cfg_for(root, cache_dir, size=size))
    x, y, _ = store.load_split(result.path, "train")
    meta = store.read_meta(result.path)
    assert x.shape == (4, side, side, 512) and x.dtype == np.float32
    assert y.shape == (4,)
    assert meta.splits == ("train", "test")
    assert meta.size == size and meta.feature_shape == (side, side, 512)


def test_block4_pool_layer_shape(image_root, cache_dir):
    result = extract(cfg_for(image_root, cache_dir, size=48, layer="block4_pool"))
    x, _, _ = store.load_split(result.path, "validation")
    assert x.shape == (6, 3, 3, 512) and store.read_meta(result.path).layer == "block4_pool"
    assert registry.output_shape(150, "block4_pool") == (9, 9, 512)


def test_features_equal_direct_keras_forward_pass(tmp_path, cache_dir):
    """Features from the cache equal VGG16(preprocess_input(image)) computed here by hand,
    with a weights file, on images already at the input size (no resize involved)."""
    import keras

    size = 48
    root = make_folder(tmp_path / "imgs", {"train": 3, "test": 2}, size=size)
    keras.utils.set_random_seed(123)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    weights_file = tmp_path / "w.weights.h5"
    model.save_weights(weights_file)
    result = extract(cfg_for(root, cache_dir, size=size, weights=str(weights_file), batch_size=4))
    for split in ("train", "test"):
        x, _y, paths = store.load_split(result.path, split)
        pixels = np.stack([np.asarray(Image.open(root / p).convert("RGB"), np.float32) for p in paths])
        direct = model.predict(keras.applications.vgg16.preprocess_input(pixels), verbose=0)
        np.testing.assert_allclose(x, direct, rtol=1e-4, atol=1e-4)
    meta = store.read_meta(result.path)
    assert meta.weights_file_sha256 == weights.file_sha256(weights_file)
    assert meta.weights_sha256 == weights.values_sha256(model)


def test_labels_and_paths_aligned_with_files(image_root, cache_dir):
    result = extract(cfg_for(image_root, cache_dir))
    meta = store.read_meta(result.path)
    assert meta.class_names == ("cats", "dogs")
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        _, y, paths = store.load_split(result.path, split)
        assert len(paths) == len(y) == n
        for path, label in zip(paths, y, strict=True):
            assert path.startswith(f"{split}/")
            assert (image_root / path).is_file()
            assert path.split("/")[1] == meta.class_names[label]


def test_provenance_attributes(image_root, cache_dir):
    path = extract(cfg_for(image_root, cache_dir)).path
    meta = store.read_meta(path)
    assert (meta.backbone, meta.weights, meta.layer, meta.size, meta.dtype, meta.precision) == (
        "vgg16",
        "random-seed0",
        "block5_pool",
        32,
        "float32",
        "float32",
    )
    assert meta.class_names == ("cats", "dogs") and len(meta.fingerprint) == 64
    assert "caffe" in meta.preprocessing and "no scaling" in meta.preprocessing
    assert len(meta.weights_sha256) == 64 and meta.weights_source == "random"
    assert {"keras", "h5py", "featcache"} <= set(meta.info["versions"])
    assert meta.info["config"]["weights"] == "random"
    with h5py.File(path) as f:  # self-describing: readable without this package
        assert f.attrs["complete"] and f.attrs["backbone"] == "vgg16" and "created" in f.attrs


def test_cache_hit_builds_no_model(image_root, cache_dir, monkeypatch):
    first = extract(cfg_for(image_root, cache_dir))
    mtime = first.path.stat().st_mtime_ns
    monkeypatch.setattr(backbone, "build", lambda *a, **k: pytest.fail("cache hit built a model"))
    again = extract(cfg_for(image_root, cache_dir))
    assert again.hit and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert "cache hit" in again.summary()


def test_changed_inputs_update_incrementally_and_force_rebuilds(image_root, cache_dir, monkeypatch):
    first = extract(cfg_for(image_root, cache_dir))
    make_image(image_root / "train" / "cats" / "new.png", (200, 40, 40), 40, 999)
    with pytest.raises(store.CacheError, match=r"1 new \(train/cats/new\.png\); fingerprint differs.*only new and"):
        locate(cfg_for(image_root, cache_dir))  # stage two never reads a stale cache
    sent = []
    original = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda m, x, b: sent.append(len(x)) or original(m, x, b))
    updated = extract(cfg_for(image_root, cache_dir))
    assert updated.path == first.path and not updated.hit
    assert sum(sent) == 1 and (updated.new, updated.changed, updated.removed, updated.reused) == (1, 0, 0, 24)
    assert "1 new, 0 changed, 0 removed, 24 reused" in updated.summary()
    assert locate(cfg_for(image_root, cache_dir)) == first.path
    sent.clear()
    rebuilt = extract(cfg_for(image_root, cache_dir, force=True))
    assert rebuilt.path == first.path and not rebuilt.hit and sum(sent) == 25
    assert store.read_meta(rebuilt.path).split_sizes["train"] == 13


def test_options_and_folders_get_their_own_cache_files(tmp_path, cache_dir):
    a = make_folder(tmp_path / "a" / "imgs", {"train": 1})
    b = make_folder(tmp_path / "b" / "imgs", {"train": 1})  # same folder name, other place
    paths = {
        extract(cfg_for(a, cache_dir)).path,
        extract(cfg_for(b, cache_dir)).path,
        extract(cfg_for(a, cache_dir, size=40)).path,
        extract(cfg_for(a, cache_dir, dtype="float16")).path,
        extract(cfg_for(a, cache_dir, layer="block4_pool")).path,
    }
    assert len(paths) == 5 and all(p.is_file() for p in paths)


def test_float16_and_compression(image_root, cache_dir):
    f32 = extract(cfg_for(image_root, cache_dir)).path
    f16 = extract(cfg_for(image_root, cache_dir, dtype="float16", compression="lzf")).path
    x32, _, _ = store.load_split(f32, "train")
    x16, _, _ = store.load_split(f16, "train")
    assert x16.dtype == np.float16 and store.read_meta(f16).dtype == "float16"
    np.testing.assert_allclose(x16.astype(np.float32), x32, rtol=2e-3, atol=2e-3 * np.abs(x32).max())
    with h5py.File(f16) as f:
        assert f["train/features"].compression == "lzf"
        assert f["train/features"].chunks[1:] == (1, 1, 512)


def test_unsplit_folder_is_split_by_path_hash(tmp_path, cache_dir):
    from pipeline.features.sources import hashed_assignment

    root = tmp_path / "flat"
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
        for i in range(10):
            make_image(root / name / f"{i}.png", colour, 32, i)
    result = extract(cfg_for(root, cache_dir, split=(0.6, 0.2, 0.2)))
    meta = store.read_meta(result.path)
    assert meta.class_names == ("a", "b")
    names = [f"{c}/{i}.png" for c in "ab" for i in range(10)]
    want = dict(zip(names, hashed_assignment(names, (0.6, 0.2, 0.2), 0).tolist(), strict=True))
    for k, split in enumerate(("train", "validation", "test")):
        _, y, paths = store.load_split(result.path, split)
        assert sorted(paths) == sorted(n for n in names if want[n] == k)  # each file where its hash puts it
        assert [p.split("/")[0] for p in paths] == [meta.class_names[c] for c in y]  # label = its folder
    seen = [p for s in ("train", "validation", "test") for p in store.load_split(result.path, s)[2]]
    assert len(seen) == len(set(seen)) == 20  # no image in two splits


def test_digits_builtin_and_npz(tmp_path, cache_dir):
    result = extract(cfg_for("digits", cache_dir))
    meta = store.read_meta(result.path)
    assert meta.class_names == tuple(str(i) for i in range(10)) and sum(meta.split_sizes.values()) == 1797
    rng = np.random.default_rng(0)
    npz = tmp_path / "arr.npz"
    np.savez(
        npz,
        x=rng.integers(0, 255, (20, 16, 16), dtype=np.uint8),
        y=np.array(["b", "a"] * 10),
        class_names=np.array(["a", "b"]),
    )
    meta = store.read_meta(extract(cfg_for(npz, cache_dir)).path)
    assert meta.class_names == ("a", "b") and sum(meta.split_sizes.values()) == 20


def test_bad_files_are_skipped_and_recorded(image_root, cache_dir):
    cats = image_root / "train" / "cats"
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "notes.txt").write_text("not an image")
    good = cats.parent.parent.parent / "good.jpg"
    make_image(good, (1, 2, 3), 64, 5, fmt="JPEG")
    (cats / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    result = extract(cfg_for(image_root, cache_dir))
    assert {Path(p).name for p, _ in result.skipped["train"]} == {"empty.jpg", "truncated.jpg"}  # notes.txt: ignored
    assert "skipped" in result.summary() and "empty file" in result.summary()
    _, y, paths = store.load_split(result.path, "train")
    assert len(y) == 12 and not any("empty" in p for p in paths)
    with h5py.File(result.path) as f:
        reasons = dict(
            zip(
                [store.decode_path(p) for p in f["train/skipped/paths"][()]],
                f["train/skipped/reasons"].asstr()[()],
                strict=True,
            )
        )
    assert reasons["train/cats/empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["train/cats/truncated.jpg"] or "cannot decode" in reasons["train/cats/truncated.jpg"]


def test_strict_refuses_bad_files_before_writing(image_root, cache_dir):
    (image_root / "test" / "dogs" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ConfigError, match=r"broken\.png"):
        extract(cfg_for(image_root, cache_dir, strict=True))
    assert not list(cache_dir.rglob("*.h5"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "test" / "dogs").rename(r / "test" / "wolves"), "wolves"),
        (lambda r: [p.unlink() for p in (r / "validation" / "cats").iterdir()], "empty"),
    ],
)
def test_class_folder_errors_name_the_class(image_root, cache_dir, mutate, message):
    mutate(image_root)
    with pytest.raises(ConfigError, match=message):
        extract(cfg_for(image_root, cache_dir))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"size": 16}, "size=16"),
        ({"layer": "block5_conv9"}, "block5_conv9"),
        ({"data": "mnist"}, "mnist"),
        ({"data": "/no/such/folder"}, "/no/such/folder"),
        ({"weights": "/no/such.h5"}, "/no/such.h5"),
        ({"dtype": "int8"}, "int8"),
    ],
)
def test_bad_options_fail_before_work_naming_the_value(image_root, cache_dir, overrides, message):
    kw = {"data": str(image_root), "size": 32, "weights": "random", "cache_dir": cache_dir, **overrides}
    with pytest.raises(ConfigError, match=message):
        extract(ExtractConfig(**kw))
    assert not cache_dir.exists() or not list(cache_dir.rglob("*.h5"))


def test_imagenet_unavailable_names_the_file(image_root, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    monkeypatch.setattr(
        weights,
        "_download_imagenet",
        lambda path: (_ for _ in ()).throw(ConfigError(weights.imagenet_missing(path, "offline"))),
    )
    with pytest.raises(ConfigError, match=weights.IMAGENET_FILE):
        extract(cfg_for(image_root, cache_dir, weights="imagenet"))


def test_lock_refuses_a_second_writer(image_root, cache_dir):
    import subprocess
    import sys

    first = extract(cfg_for(image_root, cache_dir))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from pipeline.cache.store import writer_lock\n"
                f"with writer_lock(Path({str(first.path)!r})):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(store.CacheError, match=f"pid {holder.pid}"):
            extract(cfg_for(image_root, cache_dir, force=True))
    finally:
        holder.kill()
        holder.wait()
    assert not extract(cfg_for(image_root, cache_dir, force=True)).hit  # the lock died with its holder


def test_iter_split_streams_the_same_rows(image_root, cache_dir):
    path = extract(cfg_for(image_root, cache_dir)).path
    x, y, _ = store.load_split(path, "train")
    blocks = list(store.iter_split(path, "train", rows=5))
    assert [len(b[1]) for b in blocks] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), y)


def test_stage_two_names_the_files_that_changed(image_root, cache_dir):
    extract(cfg_for(image_root, cache_dir))
    (image_root / "test" / "dogs").iterdir().__next__().unlink()
    changed = sorted((image_root / "train" / "cats").iterdir())[0]
    make_image(changed, (1, 2, 3), 41, 5)  # same name, other size and pixels
    with pytest.raises(store.CacheError) as e:
        locate(cfg_for(image_root, cache_dir))
    message = str(e.value)
    assert f"1 changed (train/cats/{changed.name})" in message and "1 removed (test/dogs/" in message
    assert "new" not in message.split("fingerprint")[0]
