"""Shared fixtures: tiny generated image folders, so every test runs offline in seconds."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# precision=auto would probe this machine and may pick bfloat16; tests compare features with a
# float32 Keras forward pass, so the suite pins auto to float32 (tests/test_precision.py unpins it).
os.environ["FEATCACHE_PRECISION"] = "float32"

import numpy as np
import pytest
from PIL import Image

CLASS_COLOURS = {"cats": (200, 40, 40), "dogs": (40, 40, 200)}


def make_image(path: Path, colour: tuple[int, int, int], size: int, seed: int, fmt: str | None = None) -> None:
    """A noisy image dominated by ``colour``: classes are separable, images distinct."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_folder(
    root: Path,
    per_class: dict[str, int],
    size: int = 40,
    ext: str = ".png",
    classes: dict[str, tuple[int, int, int]] = CLASS_COLOURS,
) -> Path:
    """``root/<split>/<class>/<class>.<i><ext>`` with ``per_class[split]`` images per class."""
    seed = 0
    for split, n in per_class.items():
        for name, colour in classes.items():
            for _i in range(n):
                seed += 1
                make_image(root / split / name / f"{name}.{seed}{ext}", colour, size, seed)
    return root


def separable(n_per_class: int, k: int = 2, seed: int = 0, shape=(2, 2, 8), spread: float = 1.0):
    """(N,h,w,C) features whose class shifts the mean of one channel: any sound head separates them."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per_class)
    x = rng.normal(0, spread, (len(y), *shape)).astype(np.float32)
    for c in range(k):
        x[y == c, :, :, c] += 3.0
    order = rng.permutation(len(y))
    return x[order], y[order]


def vgg16_weights_file(path: Path, seed: int) -> Path:
    """A VGG16 conv weights file (32 px) with seeded random values: a weights file keeps the seed
    out of the cache's name, and the same path can be rewritten with other values."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    return path


def flipped_test_splits(n: int = 60, seed: int = 0):
    """(train, validation, test) where test is validation with its labels flipped, so every
    ranking reverses on it: flatten (clean signal) wins validation, max pooling (the signal
    drowned in a noisy position) would win test. Selection that peeks at test picks max."""
    rng = np.random.default_rng(seed)

    def split():
        y = np.repeat([0, 1], n)
        x = np.zeros((2 * n, 1, 2, 1), np.float32)
        x[:, 0, 0, 0] = rng.normal(0, 1, 2 * n) + np.where(y == 1, 3.0, -3.0)
        x[:, 0, 1, 0] = rng.normal(0, 8, 2 * n)
        return x, y

    train, (xv, yv) = split(), split()
    return train, (xv, yv), (xv, 1 - yv)


def synthetic_meta(features: np.ndarray, class_names=("a", "b", "c"), **fields):
    """The description of a cache of synthetic features (no backbone behind them)."""
    from pipeline.cache import store

    return store.CacheMeta(
        **{
            "backbone": "vgg16",
            "weights": "random-seed0",
            "layer": "block5_pool",
            "size": 32,
            "dtype": str(features.dtype),
            "precision": "float32",
            "preprocessing": "synthetic",
            "fingerprint": "synthetic",
            "class_names": tuple(class_names),
            "feature_shape": tuple(features.shape[1:]),
            **fields,
        }
    )


def cache_from(path: Path, splits: dict, class_names=("a", "b", "c")) -> Path:
    """A complete cache file from in-memory (features, labels) per split."""
    from pipeline.cache import store

    first = next(iter(splits.values()))[0]
    return store.write_cache(
        path,
        {s: {"features": x, "labels": y, "paths": [f"{s}/{i}" for i in range(len(y))]} for s, (x, y) in splits.items()},
        synthetic_meta(first, class_names),
    )


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """Seeds' layout, 40x40 PNGs: train 6 per class, validation 3, test 3."""
    return make_folder(tmp_path / "images", {"train": 6, "validation": 3, "test": 3})


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A VENV whose bin/featcache runs this checkout (with PYTHONPATH set to it), newer than
    pyproject.toml so make builds nothing: make targets tested without creating .venv."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "featcache"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pipeline "$@"\n')
    script.chmod(0o755)
    return venv


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    """No test writes to the project's MLflow store; tests of tracking set their own URI and TRACK=1."""
    monkeypatch.setenv("TRACK", "0")


def interrupt_extract(cfg, monkeypatch, after: int = 1) -> None:
    """Stage one interrupted after exactly ``after`` saved chunks (a raise in the main thread
    stands in for Ctrl-C or SIGKILL); the finished chunks stay in the .partial folder."""
    from pipeline.features import compute
    from pipeline.features.extract import extract

    original = compute.ChunkWriter.save
    calls = {"n": 0}

    def save(self, *args, **kw):
        original(self, *args, **kw)
        calls["n"] += 1
        if calls["n"] >= after:
            raise KeyboardInterrupt

    monkeypatch.setattr(compute.ChunkWriter, "save", save)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg)
    monkeypatch.setattr(compute.ChunkWriter, "save", original)


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of ``path`` in place: damage that only a checksum or hash can see."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def assert_same_cache(a: Path, b: Path) -> None:
    """Two caches hold the same splits, rows (paths, labels) and features (float tolerance:
    another process or engine may sum in another order)."""
    from pipeline.cache import store

    ma, mb = store.read_meta(a), store.read_meta(b)
    assert ma.splits == mb.splits and ma.split_sizes == mb.split_sizes
    for split in ma.splits:
        xa, ya, pa = store.load_split(a, split)
        xb, yb, pb = store.load_split(b, split)
        assert pa == pb and np.array_equal(ya, yb)
        np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- background subprocess tests

# test name -> (its module's function that starts its process, the one that stops it)
BACKGROUND_TESTS = {
    "test_the_readme_python_example_runs_from_an_empty_folder": ("start_readme_example", "stop_readme_example")
}


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: start only what will run
def pytest_collection_modifyitems(config, items):
    """Tests whose whole work is one fresh Python sharing nothing with the suite (the README's
    example, about a minute) start that process now, in the background, and run last: their
    assertions are unchanged, and its minute overlaps the rest of the suite on the other core."""
    if config.option.collectonly or hasattr(config, "workerinput"):  # xdist workers: start lazily
        return
    late = [item for item in items if getattr(item, "originalname", None) in BACKGROUND_TESTS]
    if not late:
        return
    items[:] = [item for item in items if item not in late] + late
    for item in late:
        getattr(item.module, BACKGROUND_TESTS[item.originalname][0])()


def pytest_sessionfinish(session):
    """A background process that no test waited for (a session stopped early) is killed."""
    for item in session.items:
        if getattr(item, "originalname", None) in BACKGROUND_TESTS:
            getattr(item.module, BACKGROUND_TESTS[item.originalname][1])()
