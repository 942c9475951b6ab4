"""The promises the code's shape makes: stage two and cache hits never load TensorFlow,
every head honours scikit-learn's estimator contract, a cache that is incomplete,
of another format, truncated or corrupt is refused with exit 3 and no traceback, and
partial work from another run is never mixed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import check_no_attributes_set_in_init, check_parameters_default_constructible

from pipeline.app.cli import main
from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.features.extract import extract
from pipeline.train.heads import HEADS, KerasModelHead

from conftest import cache_from, flip_byte, interrupt_extract, make_folder, make_image, separable

REPO = Path(__file__).resolve().parent.parent


def test_cache_hit_and_linear_sweep_never_import_tensorflow(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 4, "validation": 2, "test": 2}, size=32)
    opts = ["--data", str(root), "--size", "32", "--weights", "random", "--cache-dir", str(tmp_path / "cache")]
    extract(ExtractConfig(data=str(root), size=32, weights="random", cache_dir=tmp_path / "cache", quiet=True))
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    code = (
        f"import sys; from pipeline.app.cli import main\n"
        f"a = main(['extract', *{opts!r}, '--quiet'])\n"
        f"hit = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        f"b = main(['classify', *{opts!r}, '--sweep', {str(sweep)!r}, '--jobs', '1', "
        f"'--runs-dir', {str(tmp_path / 'runs')!r}])\n"
        f"print(a, b, hit, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 0 [] []", out.stdout + out.stderr
    assert "cache hit" in out.stdout


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_follow_the_estimator_contract(name):
    head = HEADS[name]()
    check_parameters_default_constructible(name, head)
    check_no_attributes_set_in_init(name, head)
    params = head.get_params()
    twin = clone(head).set_params(**params)
    assert twin.get_params() == params and twin is not head
    changed = clone(head).set_params(pooling="max")
    assert changed.get_params()["pooling"] == "max" and head.get_params()["pooling"] == params["pooling"]
    x, _y = separable(4)
    for method in (head.predict, head.predict_proba):
        with pytest.raises(NotFittedError):
            method(x)


def test_keras_model_head_contract():
    head = KerasModelHead()
    check_no_attributes_set_in_init("KerasModelHead", head)
    assert clone(head).get_params() == head.get_params() == {"model": None, "classes": None}
    with pytest.raises(NotFittedError):
        head.predict(np.zeros((1, 4)))


def test_pooling_decides_the_features_a_head_sees():
    x, y = separable(10, shape=(2, 2, 8))
    sizes = {p: HEADS["logreg"](pooling=p).fit(x, y).n_features_in_ for p in ("flatten", "avg", "max")}
    assert sizes == {"flatten": 32, "avg": 8, "max": 8}
    avg = HEADS["logreg"](pooling="avg").fit(x, y).predict_proba(x)
    mx = HEADS["logreg"](pooling="max").fit(x, y).predict_proba(x)
    assert not np.allclose(avg, mx)


# ----------------------------------------------------------------------------- damaged caches


def _good_cache(tmp_path: Path) -> Path:
    return cache_from(
        tmp_path / "c.h5", {"train": separable(6, 2), "validation": separable(3, 2, seed=1)}, class_names=("a", "b")
    )


def _set_attr(name, value):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value

    return damage


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_featcache(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)


def _labels_out_of_range(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["train/labels"]
        f["train/labels"] = np.full(12, 7, np.int64)


def _flip_feature_bytes(path: Path) -> None:
    with h5py.File(path, "r") as f:
        offset = f["train/features"].id.get_chunk_info(0).byte_offset
    flip_byte(path, offset + 16)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_set_attr("complete", False), "incomplete"),
        (_set_attr("format_version", 1), "format_version=1"),
        (_truncate, "not a readable featcache cache"),
        (_not_featcache, "not a featcache cache"),
        (_labels_out_of_range, "outside the 2 classes"),
        (_flip_feature_bytes, "checksum"),
    ],
)
def test_damaged_cache_is_refused_with_exit_3(tmp_path, capsys, damage, message):
    cache = _good_cache(tmp_path)
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\n')
    damage(cache)
    before = cache.read_bytes()
    codes = [
        main(["info", str(cache)]),
        main(
            [
                "classify",
                "--cache",
                str(cache),
                "--sweep",
                str(sweep),
                "--jobs",
                "1",
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        ),
    ]
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err and str(cache) in err
    assert codes[1] == 3 and (codes[0] == 3 or message in ("outside the 2 classes", "checksum"))
    assert "FORCE=1" in err or "not a featcache" in err
    assert cache.read_bytes() == before  # refused, never "repaired" in place
    assert not list((tmp_path / "runs").glob("*/run.json"))


# ----------------------------------------------------------------------------- partial work


def test_partial_work_resumes_only_for_the_same_inputs_and_options(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"train": 6}, size=32)
    cfg = ExtractConfig(
        data=str(root), size=32, weights="random", cache_dir=tmp_path / "c", quiet=True, chunk_size=4, batch_size=4
    )
    interrupt_extract(cfg, monkeypatch)
    [partial] = (tmp_path / "c").rglob(".*.partial")
    assert len(list(partial.glob("train-*.npz"))) == 1  # 12 images in chunks of 4: interrupted after one
    assert extract(cfg).resumed_chunks == 1  # same inputs and options: the finished chunk is reused

    for change in ("chunk_size", "image"):
        (tmp_path / "c").rename(tmp_path / f"old-{change}")
        interrupt_extract(cfg, monkeypatch)
        if change == "chunk_size":
            again = ExtractConfig(**{**cfg.__dict__, "chunk_size": 5})
        else:  # an image overwritten in place: same name, other pixels and size
            make_image(root / "train" / "cats" / "cats.1.png", (0, 255, 0), 33, 77)
            again = cfg
        result = extract(again)
        assert result.resumed_chunks == 0, change
        fresh = extract(ExtractConfig(**{**again.__dict__, "cache_dir": tmp_path / f"fresh-{change}"}))
        a, b = store.load_split(result.path, "train"), store.load_split(fresh.path, "train")
        np.testing.assert_array_equal(a[0], b[0])
        assert a[2] == b[2]


def test_chunk_store_discards_a_folder_made_for_another_identity(tmp_path):
    final = tmp_path / "x.h5"
    first = store.ChunkStore(final, {"weights_sha256": "aa", "chunk_size": 4, "seed": 0})
    first.save("train", 0, np.zeros((1, 1)), np.array([0]), np.array([], np.int64), [])
    assert store.ChunkStore(final, {"weights_sha256": "aa", "chunk_size": 4, "seed": 0}).done("train", 0)
    for other in (
        {"weights_sha256": "bb", "chunk_size": 4, "seed": 0},
        {"weights_sha256": "aa", "chunk_size": 4, "seed": 1},
    ):
        first.save("train", 0, np.zeros((1, 1)), np.array([0]), np.array([], np.int64), [])
        assert not store.ChunkStore(final, other).done("train", 0)
    meta = json.loads((first.dir / "meta.json").read_text())
    assert meta["seed"] == 1


def test_stderr_of_a_cli_run_holds_no_tensorflow_startup_noise(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 2}, size=32)
    env = {**os.environ}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
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
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    noise = [line for line in out.stderr.splitlines() if line.startswith(("I0000", "W0000", "E0000", "WARNING: All"))]
    assert not noise, noise
