"""Other backbones: each family's output shape, its own preprocessing (never VGG16's),
metadata, errors that name the way out, and the compare command."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from PIL import Image

from pipeline.cache import store
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.features import registry
from pipeline.features.extract import extract

from conftest import make_folder

# (backbone, small input size, expected (h, w, C) at that size)
FAMILIES = [
    ("vgg19", 32, (1, 1, 512)),
    ("resnet50", 32, (1, 1, 2048)),
    ("mobilenetv2", 32, (1, 1, 1280)),
    ("inceptionv3", 75, (1, 1, 2048)),
    ("efficientnetb0", 32, (1, 1, 1280)),
]


@pytest.mark.parametrize(("name", "size", "shape"), FAMILIES)
def test_family_shapes_and_own_preprocessing(tmp_path, name, size, shape):
    import keras

    root = make_folder(tmp_path / "imgs", {"train": 2}, size=size)
    family = registry.BACKBONES[name]
    keras.utils.set_random_seed(7)
    model = getattr(keras.applications, family.constructor)(
        include_top=False, weights=None, input_shape=(size, size, 3)
    )
    weights = tmp_path / "w.weights.h5"
    model.save_weights(weights)
    result = extract(
        ExtractConfig(
            data=str(root), backbone=name, size=size, weights=str(weights), cache_dir=tmp_path / "cache", quiet=True
        )
    )
    x, _, paths = store.load_split(result.path, "train")
    meta = store.read_meta(result.path)
    assert x.shape == (4, *shape)
    assert meta.backbone == name and meta.layer == family.layer and result.path.name.startswith(name)
    assert f"keras.applications.{family.module}" in meta.preprocessing or name == "efficientnetb0"
    assert meta.preprocessing != registry.BACKBONES["vgg16"].preprocessing or name in ("vgg19",)
    pixels = np.stack([np.asarray(Image.open(root / p).convert("RGB"), np.float32) for p in paths])
    module = getattr(keras.applications, family.module)
    direct = model.predict(module.preprocess_input(pixels.copy()), verbose=0)
    scale = np.abs(direct).max()
    assert scale > 0
    np.testing.assert_allclose(x, direct, rtol=1e-3, atol=1e-3 * scale)
    if name == "mobilenetv2":  # tf mode: caffe preprocessing would give other features
        caffe = model.predict(keras.applications.vgg16.preprocess_input(pixels.copy()), verbose=0)
        assert np.abs(x - caffe).max() > 0.1 * scale


def test_default_size_and_layer_come_from_the_backbone():
    from pipeline.features.layout import resolve_options

    cfg = resolve_options(ExtractConfig())
    assert (cfg.size, cfg.layer) == (150, "block5_pool")
    cfg = resolve_options(ExtractConfig(backbone="inceptionv3"))
    assert (cfg.size, cfg.layer) == (299, "mixed10")
    # replacing the backbone of an unresolved config takes the new backbone's defaults
    other = resolve_options(dataclasses.replace(ExtractConfig(), backbone="resnet50"))
    assert (other.size, other.layer) == (224, "conv5_block3_out")
    with pytest.raises(ConfigError, match="inceptionv3's minimum"):
        resolve_options(ExtractConfig(backbone="inceptionv3", size=64))


def test_unknown_backbone_and_layer_name_the_alternatives(tmp_path):
    from pipeline.features.layout import resolve_options

    with pytest.raises(ConfigError, match=r"available.*resnet50"):
        resolve_options(ExtractConfig(backbone="resnet18"))
    root = make_folder(tmp_path / "imgs", {"train": 1}, size=32)
    with pytest.raises(ConfigError, match="conv5_block3_out"):
        extract(
            ExtractConfig(
                data=str(root),
                backbone="resnet50",
                size=32,
                layer="conv5_block3_outt",
                weights="random",
                cache_dir=tmp_path / "cache",
                quiet=True,
            )
        )
    assert not list((tmp_path / "cache").rglob("*.h5"))


def test_compare_two_backbones(tmp_path):
    from pipeline.app.compare import compare

    root = make_folder(tmp_path / "imgs", {"train": 6, "validation": 3, "test": 3}, size=32)
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    base = ExtractConfig(data=str(root), weights="random", size=32, cache_dir=tmp_path / "cache", quiet=True)
    result = compare(
        ["vgg16", "mobilenetv2"], base, SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1)
    )
    rows = list(csv.DictReader(open(result.csv)))
    assert [r["backbone"] for r in rows] == ["vgg16", "mobilenetv2"]
    assert [r["feature_shape"] for r in rows] == ["1x1x512", "1x1x1280"]
    for r in rows:  # each row is its own sweep's winner, tested once
        winner = [w for w in csv.DictReader(open(f"{r['run_dir']}/results.csv")) if w["winner"] == "True"]
        assert len(winner) == 1 and r["test_accuracy"] == winner[0]["test_accuracy"] != ""
        assert float(r["extract_images_per_second"]) > 0
    assert result.chart.is_file() and "mobilenetv2" in result.table
    with pytest.raises(ConfigError, match="fits one backbone"):
        compare(
            ["vgg16", "vgg19"],
            ExtractConfig(data=str(root), weights=str(tmp_path / "w.h5")),
            SweepConfig(sweep_file=sweep),
        )
