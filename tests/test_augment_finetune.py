"""Cached augmentation and fine-tuning from the cache: views are deterministic, differ
from the clean features and never reach validation or test; block5 built from cached
block4 equals the full network; fine-tuning lowers the training loss; predict uses it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.config import ExtractConfig, FinetuneConfig, SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.core.vocab import view_split
from pipeline.features import images
from pipeline.features.extract import extract

from conftest import make_folder


def cfg_for(root, cache_dir, **kw):
    return ExtractConfig(
        data=str(root),
        size=kw.pop("size", 32),
        weights=kw.pop("weights", "random"),
        cache_dir=cache_dir,
        quiet=True,
        chunk_size=4,
        **kw,
    )


def test_augment_is_deterministic_and_changes_the_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    a, b = images.augment(img, (0, 1, 7)), images.augment(img, (0, 1, 7))
    assert np.array_equal(a, b) and a.shape == img.shape and a.dtype == np.uint8
    assert not np.array_equal(a, img) and not np.array_equal(a, images.augment(img, (0, 2, 7)))


def test_views_are_cached_deterministic_resumable_and_train_only(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 4, "validation": 2, "test": 2}, size=32)
    first = extract(cfg_for(root, tmp_path / "a", augment=2))
    meta = store.read_meta(first.path)
    assert meta.splits == ("train", "validation", "test", "train@aug1", "train@aug2")
    assert meta.augment["views"] == 2 and "flip" in meta.augment["policy"]
    clean, y, m = store.load_split(first.path, "train")
    v1, y1, m1 = store.load_split(first.path, view_split(1))
    assert v1.shape == clean.shape and np.array_equal(y1, y) and m1 == m
    assert not np.allclose(v1, clean) and not np.allclose(v1, store.load_split(first.path, view_split(2))[0])
    # same views from a fresh run, and adding views later computes only the new ones
    other = extract(cfg_for(root, tmp_path / "b", augment=1))
    more = extract(cfg_for(root, tmp_path / "b", augment=2))
    assert more.images == 8  # one new view of 8 train images; clean splits copied, not recomputed
    for split in ("train", "validation", "test", view_split(1), view_split(2)):
        np.testing.assert_allclose(
            store.load_split(more.path, split)[0], store.load_split(first.path, split)[0], rtol=1e-5, atol=1e-5
        )
    assert extract(cfg_for(root, tmp_path / "b", augment=1)).hit and other.path == more.path


def test_heads_train_on_views_without_leaking_into_selection(tmp_path):
    from pipeline.train.sweep import run_sweep

    root = make_folder(tmp_path / "imgs", {"train": 4, "validation": 3, "test": 3}, size=32)
    cache = extract(cfg_for(root, tmp_path / "c", augment=3)).path
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\ntrain_on = ["clean", "views", "both"]\n')
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache)
    rows = {r["train_on"]: r for r in csv.DictReader(open(result.run_dir / "results.csv"))}
    assert {k: int(r["train_rows"]) for k, r in rows.items()} == {"clean": 8, "views": 24, "both": 32}
    sweep.write_text('[[head]]\nname = "logreg"\ntrain_on = "views"\n')
    plain = extract(cfg_for(root, tmp_path / "d")).path
    with pytest.raises(ConfigError, match="AUGMENT"):
        run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), plain)


def test_block5_from_cached_block4_equals_the_full_network(tmp_path):
    import keras

    from pipeline.app.finetune import build_block5

    root = make_folder(tmp_path / "imgs", {"train": 3}, size=64)
    keras.utils.set_random_seed(3)
    weights = tmp_path / "w.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3)).save_weights(weights)
    c4 = extract(cfg_for(root, tmp_path / "c", size=64, weights=str(weights), layer="block4_pool")).path
    c5 = extract(cfg_for(root, tmp_path / "c", size=64, weights=str(weights))).path
    x4, _, _ = store.load_split(c4, "train")
    x5, _, _ = store.load_split(c5, "train")
    meta4 = store.read_meta(c4)
    assert x4.shape == (6, 4, 4, 512) and x5.shape == (6, 2, 2, 512)
    out = build_block5(meta4).predict(x4, verbose=0)
    np.testing.assert_allclose(out, x5, rtol=1e-4, atol=1e-4 * np.abs(x5).max())


def test_finetune_from_cache_lowers_training_loss_and_predicts(tmp_path):
    from pipeline.app.finetune import finetune
    from pipeline.app.predict import predict

    root = make_folder(tmp_path / "imgs", {"train": 12, "validation": 4, "test": 4}, size=32)
    ecfg = cfg_for(root, tmp_path / "c")
    with pytest.raises(store.CacheError, match="LAYER=block4_pool"):  # no block4 cache yet: the error names the command
        finetune(FinetuneConfig(runs_dir=tmp_path / "runs"), ecfg)
    extract(cfg_for(root, tmp_path / "c", layer="block4_pool", augment=1))
    ft = FinetuneConfig(
        epochs=4,
        head_epochs=5,
        patience=10,
        learning_rate=1e-4,
        batch_size=8,
        train_on="both",
        runs_dir=tmp_path / "runs",
    )
    result = finetune(ft, ecfg)
    info = json.loads((result.run_dir / "run.json").read_text())
    losses = info["history"]["loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [r["stage"] for r in result.rows] == ["frozen block5 + head", "fine-tuned block5 + head"]
    assert (result.run_dir / "winner.keras").is_file() and (result.run_dir / "curves.png").is_file()
    out = predict(root / "test", run_dir=result.run_dir, out=tmp_path / "p.csv")
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 8 and {r["class"] for r in rows} <= {"cats", "dogs"}
    # the reported test accuracy is the saved model's, on the test images
    hits = sum(r["path"].split("/")[0] == r["class"] for r in rows)
    assert result.rows[1]["test_accuracy"] == pytest.approx(hits / 8)
    with pytest.raises(ConfigError, match="resnet50"):
        finetune(ft, cfg_for(root, tmp_path / "c", backbone="resnet50"))


def test_finetune_end_to_end_shares_the_code(tmp_path):
    from pipeline.app.finetune import finetune
    from pipeline.app.predict import predict

    root = make_folder(tmp_path / "imgs", {"train": 4, "validation": 2, "test": 2}, size=32)
    ft = FinetuneConfig(epochs=1, head_epochs=1, batch_size=4, end_to_end=True, runs_dir=tmp_path / "runs")
    result = finetune(ft, cfg_for(root, tmp_path / "c"))
    assert len(result.rows) == 2 and json.loads((result.run_dir / "run.json").read_text())["model_input"] == "images"
    rows = list(csv.DictReader(open(predict(root / "test", run_dir=result.run_dir, out=tmp_path / "p.csv"))))
    assert len(rows) == 4


def test_finetune_warm_starts_from_a_stage_two_mlp(tmp_path):
    from pipeline.app.finetune import finetune
    from pipeline.train.sweep import run_sweep

    root = make_folder(tmp_path / "imgs", {"train": 8, "validation": 4, "test": 4}, size=32)
    ecfg = cfg_for(root, tmp_path / "c")
    c5 = extract(ecfg).path
    extract(cfg_for(root, tmp_path / "c", layer="block4_pool"))
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "mlp"\nepochs = 3\nunits = 16\n')
    run = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), c5).run_dir
    ft = FinetuneConfig(epochs=2, patience=5, batch_size=8, head_run=run, runs_dir=tmp_path / "runs")
    result = finetune(ft, ecfg)
    assert f"warm-started from {run}" in result.table
    import keras

    dense = [
        layer
        for layer in keras.saving.load_model(result.run_dir / "winner.keras").layers
        if isinstance(layer, keras.layers.Dense)
    ]
    assert dense[0].units == 16  # the stage-two head's shape, carried over
    logreg = tmp_path / "l.toml"
    logreg.write_text('[[head]]\nname = "logreg"\n')
    lrun = run_sweep(SweepConfig(sweep_file=logreg, runs_dir=tmp_path / "runs", n_jobs=1), c5).run_dir
    with pytest.raises(ConfigError, match="Keras MLP"):
        finetune(FinetuneConfig(head_run=lrun, runs_dir=tmp_path / "runs"), ecfg)


def test_cached_views_and_the_end_to_end_recipe_share_one_policy():
    """Both paths are built from images.AUGMENT: the Keras layers carry its values, and the
    cached views stay within its bounds (a 90-degree rotation or a flip-only policy differs)."""
    import keras

    flip, rot, zoom = images.AUGMENT.keras_layers(seed=0)
    assert isinstance(flip, keras.layers.RandomFlip) and flip.mode == images.AUGMENT.flip
    assert rot.factor == (-images.AUGMENT.rotation, images.AUGMENT.rotation) and rot.fill_mode == images.AUGMENT.fill
    assert zoom.height_factor == images.AUGMENT.zoom and zoom.fill_mode == images.AUGMENT.fill
    assert "0.1 turn" in images.AUGMENT_POLICY and "20%" in images.AUGMENT_POLICY
    img = np.zeros((33, 33, 3), np.uint8)
    img[:, :16] = 255  # left half white
    still = images.AugmentPolicy(rotation=0.0, zoom=0.0)
    views = [images.augment(img, (0, 1, i), still) for i in range(8)]
    assert all(np.array_equal(v, img) or np.array_equal(v, img[:, ::-1]) for v in views)
    assert any(np.array_equal(v, img[:, ::-1]) for v in views) and any(np.array_equal(v, img) for v in views)
