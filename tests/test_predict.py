"""predict refuses what does not match the head's cache, naming the field: a weights file
whose bytes changed, another backbone, other weights; through the CLI and through make."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.app.cli import main
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.features.extract import extract

from conftest import make_folder, vgg16_weights_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipeline.train.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("predict")
    root = make_folder(tmp / "imgs", {"train": 6, "validation": 3, "test": 3}, size=32)
    weights = vgg16_weights_file(tmp / "w.weights.h5", 1)
    cache = extract(
        ExtractConfig(data=str(root), size=32, weights=str(weights), cache_dir=tmp / "cache", quiet=True)
    ).path
    sweep = tmp / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    run = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp / "runs", n_jobs=1), cache).run_dir
    return tmp, root, weights, run


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--backbone", "vgg19", "backbone: cache has 'vgg16', asked for 'vgg19'"),
        ("--size", "64", "size: cache has 32, asked for 64"),
        ("--layer", "block4_pool", "layer: cache has 'block5_pool', asked for 'block4_pool'"),
        ("--weights", "random", "weights: cache has 'w-"),
    ],
)
def test_predict_refuses_options_that_differ_from_the_heads_cache(trained, capsys, option, value, field):
    tmp, root, _, run = trained
    code = main(["predict", str(root / "test"), "--run", str(run), option, value, "--out", str(tmp / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and field in err and "Traceback" not in err
    assert not (tmp / "p.csv").exists()


def test_predict_accepts_matching_options_and_is_right(trained, capsys):
    tmp, root, weights, run = trained
    out = tmp / "ok.csv"
    assert (
        main(
            [
                "predict",
                str(root / "test"),
                "--run",
                str(run),
                "--weights",
                str(weights),
                "--size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 6
    assert sum(r.split("/")[0] == r.split(",")[1] for r in rows) >= 5  # colour-separable classes


def test_predict_through_make_refuses_another_backbone(trained, fake_venv):
    _tmp, root, _, run = trained
    make = ["make", "--no-print-directory", "predict", f"VENV={fake_venv}"]
    out = subprocess.run(
        [*make, f"IMAGES={root / 'test'}", f"RUN={run}", "BACKBONE=vgg19"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert out.returncode != 0
    assert "backbone: cache has 'vgg16', asked for 'vgg19'" in out.stderr and "Traceback" not in out.stderr


def test_predict_refuses_a_weights_file_whose_bytes_changed(trained, capsys):
    tmp, root, weights, run = trained
    original = weights.read_bytes()
    try:
        vgg16_weights_file(weights, 2)  # same name, other values
        code = main(["predict", str(root / "test"), "--run", str(run), "--out", str(tmp / "changed.csv")])
        err = capsys.readouterr().err
        assert code == 2 and "weights_file_sha256" in err and str(weights) in err and "Traceback" not in err
        assert not (tmp / "changed.csv").exists()
    finally:
        weights.write_bytes(original)


def test_a_mistyped_run_folder_is_exit_2(trained, capsys):
    tmp, root, _, _ = trained
    assert main(["predict", str(root / "test"), "--run", str(tmp / "runs" / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err and "Traceback" not in err
