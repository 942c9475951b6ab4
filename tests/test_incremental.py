"""Incremental extraction (only new and changed files go through the backbone, the result
equals a full re-extraction row for row) and shards (one file per slice, merged as HDF5
virtual datasets without copying feature bytes)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError
from pipeline.core.vocab import view_split
from pipeline.features import backbone
from pipeline.features.extract import extract

from conftest import make_folder, make_image


def cfg_for(data: Path, cache_dir: Path, **kw) -> ExtractConfig:
    kw.setdefault("size", 32)
    kw.setdefault("weights", "random")
    kw.setdefault("chunk_size", 4)
    return ExtractConfig(data=str(data), cache_dir=cache_dir, quiet=True, **kw)


@pytest.fixture
def counted(monkeypatch):
    """Images sent through the backbone, per call of extract."""
    sent: list[int] = []
    original = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda m, x, b: sent.append(len(x)) or original(m, x, b))
    return sent


def assert_same_cache(a: Path, b: Path) -> None:
    ma, mb = store.read_meta(a), store.read_meta(b)
    assert ma.splits == mb.splits and ma.class_names == mb.class_names and ma.split_sizes == mb.split_sizes
    for split in ma.splits:
        xa, ya, pa = store.load_split(a, split)
        xb, yb, pb = store.load_split(b, split)
        assert pa == pb, split
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-6)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for split in ma.splits:
            assert list(fa[split]["skipped/paths"][()]) == list(fb[split]["skipped/paths"][()])


def test_add_change_remove_computes_only_those_and_equals_a_full_run(tmp_path, counted):
    root = make_folder(tmp_path / "imgs", {"train": 4, "test": 2}, size=32)
    cfg = cfg_for(root, tmp_path / "c")
    first = extract(cfg)
    assert sum(counted) == 12
    make_image(root / "train" / "cats" / "new1.png", (10, 200, 10), 32, 101)
    make_image(root / "test" / "dogs" / "new2.png", (10, 10, 200), 32, 102)
    changed = root / "train" / "dogs" / "dogs.5.png"
    make_image(changed, (250, 250, 0), 33, 103)  # other pixels and size
    os.utime(changed, ns=(1, 1))
    (root / "test" / "cats" / "cats.9.png").unlink()
    (root / "train" / "broken.png").write_bytes(b"")  # a loose file next to the class folders: ignored
    (root / "train" / "cats" / "bad.png").write_bytes(b"not an image")  # new and undecodable: skipped
    counted.clear()
    update = extract(cfg)
    assert not update.hit and update.path == first.path
    assert (update.new, update.changed, update.removed, update.reused) == (3, 1, 1, 10)
    assert sum(counted) == 3  # the two new decodable images and the changed one
    assert "3 new, 1 changed, 1 removed, 10 reused" in update.summary()
    fresh = extract(cfg_for(root, tmp_path / "fresh"))
    assert_same_cache(update.path, fresh.path)
    counted.clear()
    again = extract(cfg)
    assert again.hit and sum(counted) == 0  # the skipped file is remembered, not retried


def test_unsplit_folder_keeps_every_file_in_its_split_and_takes_a_new_class(tmp_path, counted):
    root = tmp_path / "flat"
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
        for i in range(12):
            make_image(root / name / f"{i}.png", colour, 32, i)
    cfg = cfg_for(root, tmp_path / "c")
    first = extract(cfg)
    before = {s: store.load_split(first.path, s)[2] for s in store.read_meta(first.path).splits}
    for i in range(12, 16):
        make_image(root / "a" / f"{i}.png", (255, 0, 0), 32, i)
    for i in range(6):
        make_image(root / "c" / f"{i}.png", (0, 0, 255), 32, 50 + i)  # a new class folder
    counted.clear()
    update = extract(cfg)
    assert sum(counted) == 10 and update.new == 10 and update.reused == 24
    assert "new and changed files:" in update.update  # says how the new files were split
    meta = store.read_meta(update.path)
    assert meta.class_names == ("a", "b", "c")
    for split, paths in before.items():
        now = store.load_split(update.path, split)[2]
        assert set(paths) <= set(now), f"an existing image left {split}"
    assert_same_cache(update.path, extract(cfg_for(root, tmp_path / "fresh")).path)


def test_views_follow_their_train_images(tmp_path, counted):
    root = make_folder(tmp_path / "imgs", {"train": 3, "test": 1}, size=32)
    cfg = cfg_for(root, tmp_path / "c", augment=2)
    first = extract(cfg)
    x1, _, p1 = store.load_split(first.path, view_split(1))
    make_image(root / "train" / "cats" / "aaa.png", (1, 2, 3), 32, 7)  # sorts first: shifts every row index
    counted.clear()
    update = extract(cfg)
    assert sum(counted) == 3  # the image and its two views
    x2, _, p2 = store.load_split(update.path, view_split(1))
    assert p2[0] == "train/cats/aaa.png" and p2[1:] == p1
    np.testing.assert_array_equal(x2[1:], x1)  # unchanged views, not recomputed at new row numbers
    assert_same_cache(update.path, extract(cfg_for(root, tmp_path / "fresh", augment=2)).path)


def test_other_identity_still_refuses_reuse(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 2}, size=32)
    path = extract(cfg_for(root, tmp_path / "c")).path
    meta = store.read_meta(path)
    with h5py.File(path, "r+") as f:
        f.attrs["preprocessing"] = "other"
    with pytest.raises(CacheError, match="preprocessing: cache has 'other'"):
        extract(cfg_for(root, tmp_path / "c"))
    assert meta.preprocessing != "other"


def test_shards_merge_into_one_cache_without_copying_features(tmp_path, counted):
    root = make_folder(tmp_path / "imgs", {"train": 4, "validation": 1, "test": 2}, size=32)
    (root / "test" / "cats" / "bad.png").write_bytes(b"junk")
    cfg = cfg_for(root, tmp_path / "c")
    with pytest.raises(CacheError, match=r"shard\(s\) \[0, 1, 2\] of 3 are not finished"):
        extract(cfg, shards=3, merge=True)
    shard_files = [extract(cfg, shards=3, shard=k).path for k in range(3)]
    assert sum(counted) == 14 and all(p.is_file() for p in shard_files)
    merged = extract(cfg, shards=3, merge=True)
    size = merged.path.stat().st_size
    with h5py.File(merged.path) as f:
        assert f["train/features"].is_virtual and f["test/features"].is_virtual
    assert size < 0.5 * sum(p.stat().st_size for p in shard_files)  # features live in the shards
    assert_same_cache(merged.path, extract(cfg_for(root, tmp_path / "single")).path)
    counted.clear()
    assert extract(cfg).hit and sum(counted) == 0  # a merged cache is a cache like any other

    make_image(root / "train" / "cats" / "later.png", (9, 9, 9), 32, 9)  # incremental on top of shards
    update = extract(cfg)
    assert update.new == 1 and sum(counted) == 1
    assert not any(p.exists() for p in shard_files)  # copied into the plain file, then removed
    assert_same_cache(update.path, extract(cfg_for(root, tmp_path / "single2")).path)


def test_a_missing_shard_file_is_refused_not_read_as_zeros(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 3}, size=32)
    cfg = cfg_for(root, tmp_path / "c")
    shard_files = [extract(cfg, shards=2, shard=k).path for k in range(2)]
    merged = extract(cfg, shards=2, merge=True).path
    shard_files[1].unlink()
    with pytest.raises(CacheError, match=r"shard file .* is missing"):
        store.read_meta(merged)


def test_shard_options_are_checked(tmp_path):
    from pipeline.core.errors import ConfigError

    root = make_folder(tmp_path / "imgs", {"train": 1}, size=32)
    with pytest.raises(ConfigError, match=r"--shard must be in 0\.\.1"):
        extract(cfg_for(root, tmp_path / "c"), shards=2, shard=2)
    with pytest.raises(ConfigError, match="--shards must be a positive integer"):
        extract(cfg_for(root, tmp_path / "c"), shards=0)


def test_cli_shard_options_exit_codes(tmp_path, capsys, monkeypatch):
    import sys

    from pipeline.app.cli import main

    root = make_folder(tmp_path / "imgs", {"train": 1}, size=32)
    base = [
        "extract",
        "--data",
        str(root),
        "--size",
        "32",
        "--weights",
        "random",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
    ]
    assert main([*base, "--shards", "2"]) == 2
    assert "--shards N needs --shard I" in capsys.readouterr().err
    assert main([*base, "--shard", "0"]) == 2
    assert main([*base, "--shards", "2", "--merge"]) == 3  # nothing to merge yet: a cache problem, named
    assert "shard(s) [0, 1] of 2 are not finished" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main([*base, "--engine", "ray"]) == 2
    assert "pip install 'featcache[ray]'" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_shard_resumes_and_the_merge_equals_a_single_process(tmp_path, capsys):
    """A shard process SIGKILLed mid-run (a true process: only a kill shows what a crash
    leaves), then the shards and the merge through featcache's main in this process."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    root = make_folder(tmp_path / "imgs", {"train": 16}, size=64)
    cache = tmp_path / "c"
    opts = [
        "--data",
        str(root),
        "--size",
        "64",
        "--weights",
        "random",
        "--chunk-size",
        "2",
        "--batch-size",
        "2",
        "--quiet",
        "--cache-dir",
        str(cache),
        "--shards",
        "2",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "pipeline", "extract", *opts]
    proc = subprocess.Popen([*cmd, "--shard", "0"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.rglob("train-*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(cache.rglob("train-*.npz"))) >= 2 and not list(cache.rglob("*.shard-*.h5"))
    capsys.readouterr()
    for args in (["--shard", "0"], ["--shard", "1"], ["--merge"]):
        code = main(["extract", *opts, *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "Traceback" not in err
        if args == ["--shard", "0"]:
            assert "resumed after" in out
    [merged] = [p for p in cache.rglob("*.h5") if ".shard-" not in p.name]
    assert not list(cache.rglob("*.partial"))
    single = extract(cfg_for(root, tmp_path / "single", size=64, chunk_size=2, batch_size=2))
    assert_same_cache(merged, single.path)
