"""pipeline.core.config without TensorFlow: every refused value is named with what was received,
and the boundaries of each check hold (issue 16: `make mutate` runs this file; TESTING.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core import config
from pipeline.core.config import ExportConfig, ExtractConfig, FinetuneConfig, InspectConfig, SweepConfig
from pipeline.core.errors import ConfigError


def _message(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return str(info.value)


@pytest.mark.parametrize(("cores", "processes"), [(None, 0), (1, 0), (7, 0), (8, 6), (16, 14)])
def test_decode_processes_only_with_cores_to_spare(monkeypatch, cores, processes):
    monkeypatch.setattr(config.os, "cpu_count", lambda: cores)
    assert config._default_decode_processes() == processes


# ----------------------------------------------------------------------------- ExtractConfig


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "150"])
def test_size_must_be_a_positive_integer(size):
    assert _message(ExtractConfig, size=size) == (f"size must be a positive integer (pixels); received size={size!r}")


def test_the_smallest_accepted_values():
    cfg = ExtractConfig(size=1, decode_processes=0, augment=0, batch_size=1, chunk_size=1, decode_threads=1)
    assert (cfg.size, cfg.batch_size, cfg.chunk_size, cfg.decode_threads) == (1, 1, 1, 1)
    assert ExtractConfig(size=None).size is None


@pytest.mark.parametrize("precision", ["int4", "FLOAT32", None])
def test_precision_names(precision):
    assert _message(ExtractConfig, precision=precision) == (
        f"precision must be one of ('auto', 'float32', 'bfloat16', 'float16', 'int8'); received precision={precision!r}"
    )


@pytest.mark.parametrize("value", [-1, 1.0, "2"])
def test_decode_processes_must_be_a_non_negative_integer(value):
    assert _message(ExtractConfig, decode_processes=value) == (
        f"decode_processes must be an integer >= 0; received {value!r}"
    )


@pytest.mark.parametrize("value", [-1, 1.0, "2"])
def test_augment_must_be_a_non_negative_integer(value):
    assert _message(ExtractConfig, augment=value) == (
        f"augment must be an integer >= 0 (views per train image); received augment={value!r}"
    )


@pytest.mark.parametrize("name", ["batch_size", "chunk_size", "decode_threads"])
@pytest.mark.parametrize("value", [0, 2.0])
def test_counts_must_be_positive_integers(name, value):
    assert _message(ExtractConfig, **{name: value}) == f"{name} must be a positive integer; received {name}={value!r}"


def test_dtype_and_compression_are_named():
    assert _message(ExtractConfig, dtype="float64") == (
        "dtype must be one of ('float32', 'float16'); received dtype='float64'"
    )
    assert _message(ExtractConfig, compression="zstd") == (
        "compression must be one of ('none', 'lzf', 'gzip'); received compression='zstd'"
    )
    assert ExtractConfig(dtype="float16", compression="gzip").compression == "gzip"


@pytest.mark.parametrize(
    "split",
    [(0.5, 0.5), (0.5, 0.25, 0.25, 0.0), (1.1, -0.1, 0.0), (0.0, 0.5, 0.5), (0.7, 0.15, 0.14), (0.7, 0.15, 0.150002)],
)
def test_split_must_be_three_fractions_summing_to_one(split):
    assert _message(ExtractConfig, split=split) == (
        "split must be three non-negative fractions (train, validation, test) summing to 1 "
        f"with train > 0; received split={split!r}"
    )


def test_split_is_kept_as_floats_and_paths_as_paths():
    cfg = ExtractConfig(split=[1, 0, 0], cache_dir="some/where")
    assert cfg.split == (1.0, 0.0, 0.0) and all(type(f) is float for f in cfg.split)
    assert cfg.cache_dir == Path("some/where")
    assert ExtractConfig(split=(0.7, 0.15, 0.15 + 5e-7)).split == (0.7, 0.15, 0.15 + 5e-7)  # rounding is fine


def test_extract_defaults_are_the_documented_ones():
    cfg = ExtractConfig()
    assert (cfg.data, cfg.size, cfg.weights, cfg.layer, cfg.backbone) == ("digits", None, "imagenet", None, "vgg16")
    assert (cfg.batch_size, cfg.dtype, cfg.compression, cfg.precision) == (32, "float32", "none", "auto")
    assert (cfg.strict, cfg.force, cfg.quiet, cfg.content_hash) == (False, False, False, False)
    assert (cfg.split, cfg.seed, cfg.chunk_size, cfg.augment, cfg.decode_threads) == ((0.7, 0.15, 0.15), 0, 256, 0, 2)


# ----------------------------------------------------------------------------- SweepConfig


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"stream": "maybe"}, "stream must be one of ('auto', 'on', 'off'); received stream='maybe'"),
        ({"memory_budget": "lots"}, "memory budget 'lots' is not a size; give e.g. 4GB, 512MB or auto"),
        ({"carve_fraction": 0}, "carve_fraction must be in (0, 1); received 0"),
        ({"carve_fraction": 1}, "carve_fraction must be in (0, 1); received 1"),
        ({"train_on": "all"}, "train_on must be one of ('clean', 'views', 'both', 'tta'); received train_on='all'"),
        ({"views": 0}, "views must be a positive integer; received views=0"),
        ({"views": "2"}, "views must be a positive integer; received views='2'"),
        ({"n_jobs": 0}, "n_jobs must be a non-zero integer; received n_jobs=0"),
        ({"n_jobs": 1.0}, "n_jobs must be a non-zero integer; received n_jobs=1.0"),
    ],
)
def test_sweep_values_are_named(kw, message):
    assert _message(SweepConfig, **kw) == message


def test_sweep_boundaries_that_are_accepted():
    cfg = SweepConfig(carve_fraction=0.01, views=1, n_jobs=-1, stream="on", memory_budget="1GB", train_on="both")
    assert (cfg.carve_fraction, cfg.views, cfg.n_jobs, cfg.stream, cfg.train_on) == (0.01, 1, -1, "on", "both")
    assert SweepConfig(carve_fraction=0.99, views=None).views is None
    d = SweepConfig()
    assert (d.name, d.seed, d.n_jobs, d.carve_fraction, d.train_on, d.views) == ("sweep", 0, 2, 0.2, "clean", None)
    assert (d.stream, d.memory_budget, d.track, d.cache) == ("auto", "auto", True, None)
    assert d.sweep_file == Path(config.paths.default_sweep()) and d.sweep_file.name == "default_sweep.toml"
    assert d.sweep_file.is_file() and "[[head]]" in d.sweep_file.read_text()


# ----------------------------------------------------------------------------- FinetuneConfig


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"train_on": "none"}, "train_on must be one of ('clean', 'views', 'both'); received train_on='none'"),
        ({"epochs": 0}, "epochs must be a positive integer; received epochs=0"),
        ({"head_epochs": 1.0}, "head_epochs must be a positive integer; received head_epochs=1.0"),
        ({"batch_size": -2}, "batch_size must be a positive integer; received batch_size=-2"),
        ({"learning_rate": 0}, "learning_rate must be > 0; received learning_rate=0"),
        ({"head_learning_rate": -1e-4}, "head_learning_rate must be > 0; received head_learning_rate=-0.0001"),
    ],
)
def test_finetune_values_are_named(kw, message):
    assert _message(FinetuneConfig, **kw) == message


def test_finetune_smallest_accepted_values():
    cfg = FinetuneConfig(epochs=1, head_epochs=1, batch_size=1, learning_rate=1e-9, head_learning_rate=1e-9)
    assert (cfg.epochs, cfg.head_epochs, cfg.batch_size) == (1, 1, 1)


# ----------------------------------------------------------------------------- helpers


def test_decoder_is_named():
    assert _message(ExtractConfig, decoder="nvjpeg") == (
        "decoder must be one of ('auto', 'cpu', 'gpu'); received decoder='nvjpeg'"
    )


# ----------------------------------------------------------------------------- InspectConfig
# (issue 27: its checks were reached only from test_inspect.py, outside `make mutate`'s selection)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pooling": "mean"}, "pooling must be one of ('flatten', 'avg', 'max'); received pooling='mean'"),
        ({"map": "tsne"}, "map must be one of ('pca', 'umap'); received map='tsne'"),
        ({"duplicate_similarity": 0}, "duplicate_similarity must be a cosine in (0, 1]; received 0"),
        ({"duplicate_similarity": 1.01}, "duplicate_similarity must be a cosine in (0, 1]; received 1.01"),
        ({"neighbours": 0}, "neighbours must be an integer >= 1; received neighbours=0"),
        ({"neighbours": True}, "neighbours must be an integer >= 1; received neighbours=True"),
        ({"folds": 1}, "folds must be an integer >= 2; received folds=1"),
        ({"folds": 2.0}, "folds must be an integer >= 2; received folds=2.0"),
        ({"show": -1}, "show must be an integer >= 0; received show=-1"),
        ({"memory_mb": 0}, "memory_mb must be an integer >= 1; received memory_mb=0"),
        ({"memory_mb": 1.5}, "memory_mb must be an integer >= 1; received memory_mb=1.5"),
        ({"C": 0}, "C must be > 0; received C=0"),
        ({"C": -0.5}, "C must be > 0; received C=-0.5"),
        ({"outlier_mad": 0.0}, "outlier_mad must be > 0; received outlier_mad=0.0"),
        ({"outlier_mad": -1}, "outlier_mad must be > 0; received outlier_mad=-1"),
    ],
)
def test_inspect_values_are_named(kw, message):
    assert _message(InspectConfig, **kw) == message


def test_inspect_smallest_accepted_values_and_runs_dir_as_path():
    edge = InspectConfig(
        duplicate_similarity=1.0, neighbours=1, folds=2, show=0, memory_mb=1, C=1e-9, outlier_mad=1e-9, runs_dir="r"
    )
    assert (edge.duplicate_similarity, edge.neighbours, edge.folds, edge.show, edge.memory_mb) == (1.0, 1, 2, 0, 1)
    assert edge.runs_dir == Path("r")
    assert InspectConfig(pooling="flatten", map="umap", duplicate_similarity=1e-9).map == "umap"


# ----------------------------------------------------------------------------- ExportConfig


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"formats": ("tflite",)},
            "format must be one of ('keras', 'tf_saved_model', 'onnx', 'litert', 'openvino'); received format='tflite'",
        ),
        (
            {"precision": "float64"},
            "precision must be one of ('cache', 'float32', 'bfloat16'); received precision='float64'",
        ),
        ({"check_images": 0}, "check_images must be a positive integer; received check_images=0"),
        ({"batch_size": True}, "batch_size must be a positive integer; received batch_size=True"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer; received batch_size=2.0"),
        ({"tolerance": 0.0}, "tolerance must be > 0; received tolerance=0.0"),
        ({"tolerance": -1e-3}, "tolerance must be > 0; received tolerance=-0.001"),
    ],
)
def test_export_values_are_named(kw, message):
    assert _message(ExportConfig, run="r", **kw) == message


def test_export_formats_keras_first_without_repeats_and_paths_as_paths():
    cfg = ExportConfig(run="r", formats=("onnx", "keras", "onnx", "litert"), out="o", check_images=1, batch_size=1)
    assert cfg.formats == ("keras", "onnx", "litert")
    assert (cfg.run, cfg.out, cfg.check_images, cfg.batch_size) == (Path("r"), Path("o"), 1, 1)
    assert ExportConfig(run="r").out is None and ExportConfig(run="r", tolerance=1e-9).tolerance == 1e-9


def test_load_toml_names_the_file(tmp_path):
    assert _message(config.load_toml, tmp_path / "none.toml") == (
        f"config file {tmp_path / 'none.toml'} does not exist"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[[head]\n")
    err = _message(config.load_toml, str(bad))
    assert err.startswith(f"{bad} is not valid TOML: ")
    good = tmp_path / "good.toml"
    good.write_text('[[head]]\nname = "logreg"\nC = [0.1, 1.0]\n')
    assert config.load_toml(str(good)) == {"head": [{"name": "logreg", "C": [0.1, 1.0]}]}


def test_replace_rejects_unknown_options_by_name():
    cfg = SweepConfig()
    err = _message(config.replace, cfg, seed=1, bogus=2, also=3)
    known = sorted(f for f in cfg.__dataclass_fields__)
    assert err == f"unknown option(s) ['also', 'bogus'] for SweepConfig; known: {known}"
    assert config.replace(cfg, seed=4).seed == 4
    with pytest.raises(ConfigError, match="n_jobs"):
        config.replace(cfg, n_jobs=0)  # the new value is checked too


def test_as_dict_is_json_friendly():
    d = config.as_dict(ExtractConfig(cache_dir="c", split=(0.5, 0.5, 0.0)))
    assert d["cache_dir"] == "c" and d["split"] == [0.5, 0.5, 0.0] and d["batch_size"] == 32 and d["size"] is None
    assert list(d) == list(ExtractConfig.__dataclass_fields__)
