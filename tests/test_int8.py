"""--precision int8: OpenVINO + NNCF on the dataset's own train images, kept beside the cache.

The int8 cache is its own file; its quantised model is calibrated once (seeded, recorded),
hashed into the cache's metadata, reused by reruns, resumed runs and shards, refused when
it changed or went missing, and run again by predict. A missing engine is a clear error.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.cache import models, store
from pipeline.core.config import ExtractConfig, FinetuneConfig, SweepConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.features import images, quantize
from pipeline.features.extract import extract
from pipeline.features.layout import locate, plan
from pipeline.features.precision import relative_error

from conftest import assert_same_cache, flip_byte, interrupt_extract, make_folder, make_image


@pytest.fixture
def ov():
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")


def _cfg(root: Path, cache_dir: Path, **kw) -> ExtractConfig:
    base = {"data": str(root), "size": 32, "weights": "random", "precision": "int8", "cache_dir": cache_dir}
    return ExtractConfig(**{**base, **kw}, quiet=True)


@pytest.fixture
def root(tmp_path):
    return make_folder(tmp_path / "imgs", {"train": 6, "validation": 3, "test": 3}, size=32)


@pytest.fixture
def calibrations(monkeypatch):
    """Counts NNCF quantisations (each one is a new calibration)."""
    calls = []
    original = quantize._quantize

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(quantize, "_quantize", counting)
    return calls


def _model_folder(cache: Path) -> Path:
    return cache.parent / store.read_meta(cache).info["int8"]["folder"]


def _engine_features(cache: Path, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(cached features, the kept model run directly on the same files)."""
    x, _, paths = store.load_split(cache, split)
    pixels = np.stack([images.load(str(root / p), 32) for p in paths])
    return x, quantize.load(_model_folder(cache)).predict_on_batch(pixels)


def test_int8_cache_is_its_own_file_and_records_its_calibrated_model(ov, root, tmp_path, capsys):
    f32 = extract(_cfg(root, tmp_path / "c", precision="float32")).path
    int8 = extract(_cfg(root, tmp_path / "c")).path
    assert "Statistics collection" not in capsys.readouterr().out  # quiet: no NNCF progress bars either
    assert int8 != f32 and int8.name.endswith("-int8.h5")
    assert locate(_cfg(root, tmp_path / "c")) == int8 and locate(_cfg(root, tmp_path / "c", precision="float32")) == f32
    meta = store.read_meta(int8)
    assert meta.precision == "int8" and meta.key().identity_diff(store.read_meta(f32).key()) == [
        "precision: cache has 'int8', asked for 'float32'"
    ]
    summary, folder = meta.info["int8"], _model_folder(int8)
    assert models.model_sha256(folder) == summary["model_sha256"] and folder.name.endswith(summary["model_sha256"][:12])
    record = json.loads((folder / models.RECORD).read_text())
    train_paths = store.load_split(f32, "train")[2]
    cal = record["calibration"]
    assert (cal["split"], cal["seed"], cal["count"], cal["requested"]) == ("train", 0, 12, quantize.CALIBRATION_IMAGES)
    assert sorted(cal["files"]) == sorted(train_paths)  # fewer train images than asked: all of them
    assert record["weights_sha256"] == meta.weights_sha256 and record["cpu"] == summary["cpu"]
    for split in ("train", "test"):
        cached, direct = _engine_features(int8, root, split)
        np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-6)  # what is stored is what the model gives
        ref = store.load_split(f32, split)[0]
        assert 1e-4 < relative_error(cached, ref) < 0.1  # int8: close to float32, not equal


def test_calibration_sample_is_seeded_and_capped(root):
    source = plan(_cfg(root, root.parent / "c")).source
    a, b = quantize.plan_sample(source, seed=1, count=5), quantize.plan_sample(source, seed=1, count=5)
    c = quantize.plan_sample(source, seed=2, count=5)
    assert a == b and len(a.files) == 5 and a.files != c.files and a.split == "train"
    assert a.files == sorted(a.files, key=source.splits["train"].paths.index)  # file order, not draw order
    assert len(quantize.plan_sample(source, seed=1).files) == 12


def test_rerun_and_resume_reuse_the_kept_model(ov, root, tmp_path, monkeypatch, calibrations):
    import keras

    keras.utils.set_random_seed(3)
    weights = tmp_path / "w.weights.h5"  # a file: SEED then changes the calibration sample, not the weights
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    cfg = _cfg(root, tmp_path / "c", chunk_size=4, weights=str(weights))
    interrupt_extract(cfg, monkeypatch, after=1)  # killed after the first chunk, model already kept
    assert len(calibrations) == 1 and len(quantize.folders(plan(cfg).path)) == 1
    result = extract(cfg)
    cache = result.path
    assert result.resumed_chunks >= 1 and len(calibrations) == 1  # resumed with the same model
    sha = store.read_meta(cache).info["int8"]["model_sha256"]
    before = {s: store.load_split(cache, s) for s in ("train", "test")}
    make_image(root / "train" / "cats" / "cats.new.png", (200, 40, 40), 32, 999)
    make_image(root / "test" / "dogs" / "dogs.new.png", (40, 40, 200), 32, 998)
    result = extract(dataclasses.replace(cfg, seed=1))  # another sample would mean another model
    assert (result.new, result.reused, len(calibrations)) == (2, 24, 1)  # only the new files; no recalibration
    assert store.read_meta(cache).info["int8"]["model_sha256"] == sha and len(quantize.folders(cache)) == 1
    for split in ("train", "test"):
        x, _, paths = store.load_split(cache, split)
        old_x, _, old_paths = before[split]
        keep = [paths.index(p) for p in old_paths]
        np.testing.assert_array_equal(x[keep], old_x)  # reused rows untouched
        cached, direct = _engine_features(cache, root, split)
        np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-6)  # new rows from the same model


def test_changed_or_missing_model_is_refused_and_the_cache_kept(ov, root, tmp_path, calibrations):
    cfg = _cfg(root, tmp_path / "c")
    cache = extract(cfg).path
    folder = _model_folder(cache)
    make_image(root / "train" / "cats" / "cats.new.png", (200, 40, 40), 32, 999)
    weights = folder / "model.bin"
    flip_byte(weights, weights.stat().st_size // 2)
    with pytest.raises(CacheError, match=rf"{folder.name}.*changed since.*--force"):
        extract(cfg)
    assert store.read_meta(cache).split_sizes["train"] == 12  # nothing lost
    extract(dataclasses.replace(cfg, force=True))  # the damaged model is passed over, a new one made
    assert len(calibrations) == 2 and store.read_meta(cache).split_sizes["train"] == 13
    assert quantize.folders(cache) == [_model_folder(cache)]  # the damaged one is gone once the cache is complete
    quantize.load(_model_folder(cache), store.read_meta(cache).info["int8"]["model_sha256"])
    make_image(root / "train" / "dogs" / "dogs.new.png", (40, 40, 200), 32, 997)
    shutil.rmtree(_model_folder(cache))
    with pytest.raises(CacheError, match=r"openvino-\w+, which is missing.*--force"):
        extract(cfg)
    assert store.read_meta(cache).split_sizes["train"] == 13


def test_shards_calibrate_once_and_merge_like_one_run(ov, root, tmp_path, calibrations):
    cfg = _cfg(root, tmp_path / "sharded")
    for k in range(2):
        extract(cfg, shards=2, shard=k)
    merged = extract(cfg, shards=2, merge=True).path
    assert len(calibrations) == 1 and len(quantize.folders(merged)) == 1
    single = extract(_cfg(root, tmp_path / "single")).path  # calibrated again on the same files
    assert_same_cache(merged, single)


def test_predict_runs_the_model_the_head_was_trained_on(ov, root, tmp_path):
    from pipeline.app.predict import predict
    from pipeline.train.persist import load_head
    from pipeline.train.sweep import run_sweep

    cache = extract(_cfg(root, tmp_path / "c")).path
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    run = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache).run_dir
    x, _, paths = store.load_split(cache, "test")
    expected = dict(zip(paths, load_head(run).predict_proba(x), strict=True))
    shutil.rmtree(cache.parent)  # the run keeps its own copy of the model
    out = tmp_path / "p.csv"
    assert main(["predict", str(root / "test"), "--run", str(run), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(paths)
    for r in rows:
        p = expected["test/" + r["path"]]
        np.testing.assert_allclose([float(r["p_cats"]), float(r["p_dogs"])], p, atol=2e-6)
    (run / "int8-model" / "model.bin").write_bytes(b"not the model")
    with pytest.raises(CacheError, match="changed since"):
        predict(root / "test", run_dir=run, out=tmp_path / "q.csv")


def test_missing_openvino_is_a_clear_error_before_any_work(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ConfigError, match=r"int8.*OpenVINO.*not installed.*featcache\[openvino\]"):
        quantize.require_openvino()
    options = ["--data", str(root), "--size", "32", "--weights", "random", "--cache-dir", str(tmp_path / "c")]
    code = main(["extract", *options, "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'featcache[openvino]'" in err and "Traceback" not in err
    assert main(["extract", *options, "--engine", "openvino"]) == 2  # the same engine, named the way
    assert "pip install 'featcache[openvino]'" in capsys.readouterr().err
    assert main(["extract", *options, "--runtime", "openvino"]) == 2  # the runtime by its own name
    assert "pip install 'featcache[openvino]'" in capsys.readouterr().err
    assert not list((tmp_path / "c").rglob("*.h5"))


def test_engine_openvino_runs_only_int8(root, tmp_path, capsys):
    options = ["--data", str(root), "--size", "32", "--weights", "random", "--cache-dir", str(tmp_path / "c")]
    assert main(["extract", *options, "--engine", "openvino", "--precision", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "--engine openvino runs int8" in err and "received --precision bfloat16" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_the_runtime_has_its_own_name_and_engine_openvino_is_deprecated(root, tmp_path, capsys, caplog):
    from pipeline.app.cli import _extract_config, build_parser

    for command in (["extract"], ["classify"], ["demo"]):  # every command that names a cache
        args = build_parser().parse_args([*command, "--runtime", "openvino"])
        assert _extract_config(args).precision == "int8"
    assert _extract_config(build_parser().parse_args(["extract", "--runtime", "keras"])).precision == "auto"
    options = ["--data", str(root), "--size", "32", "--weights", "random", "--cache-dir", str(tmp_path / "c")]
    assert main(["extract", *options, "--runtime", "openvino", "--precision", "float16"]) == 2
    err = capsys.readouterr().err
    assert "--runtime openvino runs int8 (--precision int8); received --precision float16. Leave out --runtime" in err
    assert main(["extract", *options, "--runtime", "keras", "--precision", "int8"]) == 2
    assert "--precision int8 runs on OpenVINO (--runtime openvino); received --runtime keras" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="featcache"):
        assert main(["extract", *options, "--engine", "openvino", "--precision", "bfloat16"]) == 2
    assert "--engine openvino is deprecated and will be removed: use --runtime openvino" in caplog.text
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_finetune_refuses_int8(root, tmp_path):
    from pipeline.app.finetune import finetune

    with pytest.raises(ConfigError, match=r"int8.*OpenVINO.*float32, bfloat16 or auto"):
        finetune(FinetuneConfig(), _cfg(root, tmp_path / "c"))


def test_in_memory_engine_takes_uint8_pixels_and_stays_close_to_float32(ov):
    """The engine takes what the Keras model takes (uint8 pixels, preprocessing inside) and
    gives float32 features near the float32 model's (int8: a few percent), at any batch size."""
    import keras

    keras.utils.set_random_seed(0)
    pixels = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.ops.cast(pixels, "float32") / 127.5 - 1.0
    for channels in (16, 32):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    model = keras.Model(pixels, x)
    rng_images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    engine = quantize.openvino_engine(model, rng_images[:16], batch_size=8)
    out = engine.predict_on_batch(rng_images[16:21])  # another batch size than calibration's
    ref = np.asarray(model.predict_on_batch(rng_images[16:21]))
    assert out.dtype == np.float32 and out.shape == ref.shape == (5, 8, 8, 32)
    assert engine.output_shape == (None, 8, 8, 32)
    assert 1e-4 < relative_error(out, ref) < 0.1
