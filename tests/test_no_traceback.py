"""Every command, a battery of bad options and inputs: each ends with exit 2 or 3 and a
message naming the bad value, never a Python traceback, and never a change to a cache that
already exists."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.app import cli
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.features.extract import extract

from conftest import cache_from, make_folder, separable

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, a real cache of them, a classify run, a synthetic cache, and bad files of every kind."""
    from pipeline.train.sweep import run_sweep

    t = tmp_path_factory.mktemp("battery")
    root = make_folder(t / "imgs", {"train": 4, "validation": 2, "test": 2}, size=32)
    cache = extract(ExtractConfig(data=str(root), size=32, weights="random", cache_dir=t / "cache", quiet=True)).path
    good_sweep = t / "good.toml"
    good_sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\n')
    run = run_sweep(SweepConfig(sweep_file=good_sweep, runs_dir=t / "runs", n_jobs=1), cache).run_dir
    (t / "not_toml.toml").write_text("[[head]\nname = ")
    (t / "bad_head.toml").write_text('[[head]]\nname = "xgboost"\n')
    (t / "bad_param.toml").write_text('[[head]]\nname = "logreg"\nC = -1\n')
    (t / "bad_key.toml").write_text('[[head]]\nname = "logreg"\ngamma = 3\n')
    (t / "seed_key.toml").write_text('seed = 3\n[[head]]\nname = "logreg"\n')
    (t / "no_heads.toml").write_text('title = "x"\n')
    (t / "text.h5").write_text("not hdf5")
    (t / "a_file").write_text("I am a file")
    with h5py.File(t / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    cache_from(t / "synthetic.h5", {"train": separable(5, 2), "validation": separable(3, 2, seed=1)}, ("a", "b"))
    return {"t": t, "root": root, "cache": cache, "run": run, "sweep": good_sweep}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def _argv(w: dict, case: list[str]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in w.items()}) for a in case]


IMG = ["--data", "{root}", "--size", "32", "--weights", "random", "--cache-dir", "{t}/cache"]
CASES = [
    # (argv, exit code, text the message must contain)
    (["extract", *IMG, "--size", "0"], 2, "size=0"),
    (["extract", *IMG, "--size", "8"], 2, "size=8"),
    (["extract", *IMG, "--layer", "block9_pool"], 2, "block9_pool"),
    (["extract", *IMG, "--backbone", "vgg17"], 2, "vgg17"),
    (["extract", *IMG, "--weights", "none"], 2, "'random'"),
    (["extract", *IMG, "--weights", "{t}/text.h5"], 2, "text.h5"),
    (["extract", *IMG, "--weights", "{t}/other.h5"], 2, "other.h5"),
    (["extract", *IMG, "--weights", "{t}/missing.h5"], 2, "missing.h5"),
    (["extract", *IMG, "--data", "{t}/nowhere"], 2, "nowhere"),
    (["extract", *IMG, "--data", "{t}/a_file"], 2, "a_file"),
    (["extract", *IMG, "--data", "{t}/text.npz"], 2, "text.npz"),
    (["extract", *IMG, "--cache-dir", "{t}/a_file/sub"], 2, "a_file"),
    (["extract", *IMG, "--batch-size", "0"], 2, "batch_size"),
    (["extract", *IMG, "--augment", "-1"], 2, "augment"),
    (["extract", *IMG, "--split", "0.5,0.6,0.1"], 2, "split"),
    (["classify", "--cache", "{t}/text.h5", "--sweep", "{sweep}"], 3, "text.h5"),
    (["classify", "--cache", "{t}/other.h5", "--sweep", "{sweep}"], 3, "not a featcache cache"),
    (["classify", "--cache", "{t}/missing.h5", "--sweep", "{sweep}"], 3, "missing.h5"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/not_toml.toml"], 2, "not_toml.toml"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/bad_head.toml"], 2, "xgboost"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/bad_param.toml"], 2, "bad_param.toml"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/bad_key.toml"], 2, "gamma"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/seed_key.toml"], 2, "seed_key.toml"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/no_heads.toml"], 2, "no_heads.toml"),
    (["classify", "--cache", "{cache}", "--sweep", "{t}/missing.toml"], 2, "missing.toml"),
    (["classify", "--cache", "{cache}", "--sweep", "{sweep}", "--runs-dir", "{t}/a_file"], 2, "a_file"),
    (["classify", "--cache", "{cache}", "--sweep", "{sweep}", "--train-on", "views"], 2, "AUGMENT"),
    (["classify", "--cache", "{cache}", "--sweep", "{sweep}", "--jobs", "0"], 2, "n_jobs"),
    (["classify", "--cache", "{cache}", "--sweep", "{sweep}", "--cv", "1"], 2, "cv=1"),
    (["classify", "--cache", "{cache}", "--sweep", "{sweep}", "--cv", "999"], 2, "cv = 999"),
    (
        ["classify", *IMG[:2], "--size", "64", "--weights", "random", "--cache-dir", "{t}/cache", "--sweep", "{sweep}"],
        3,
        "no cache",
    ),
    (["predict", "{root}/test", "--run", "{t}/runs/nope"], 2, "nope"),
    (["predict", "{t}/no_images", "--run", "{run}"], 2, "no_images"),
    (["predict", "{root}/test", "--run", "{run}", "--layer", "block4_pool"], 2, "layer"),
    (["predict", "{root}/test", "--run", "{t}"], 2, "run.json"),
    (["info", "{t}/text.h5"], 3, "text.h5"),
    (["info", "{t}/other.h5"], 3, "not a featcache cache"),
    (["info", "{t}/missing.h5"], 3, "missing.h5"),
    (["finetune", *IMG, "--epochs", "0"], 2, "epochs"),
    (["finetune", *IMG, "--backbone", "resnet50"], 2, "resnet50"),
    (["finetune", *IMG], 3, "block4_pool"),
    (["compare", *IMG, "--backbones", "vgg16,nonet", "--sweep", "{sweep}", "--runs-dir", "{t}/runs"], 2, "nonet"),
    (["compare", *IMG, "--backbones", "", "--sweep", "{sweep}", "--runs-dir", "{t}/runs"], 2, "backbone"),
]


@pytest.mark.parametrize(("case", "code", "text"), CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_input_gives_a_message_and_an_exit_code_never_a_traceback(
    world, capsys, case, code, text, tmp_path, monkeypatch
):
    (world["t"] / "text.npz").write_text("not an npz")
    monkeypatch.setenv("FEATCACHE_RUNS_DIR", str(tmp_path / "runs"))  # where a run without --runs-dir goes
    before = _digest(world["t"] / "cache")
    runs_before = sorted((world["t"] / "runs").iterdir())
    got = cli.main(_argv(world, case))
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert got == code, err
    assert text.format(**{k: str(v) for k, v in world.items()}) in err, err
    assert _digest(world["t"] / "cache") == before
    # a refused run leaves no (empty) run folder behind
    assert sorted((world["t"] / "runs").iterdir()) == runs_before
    assert not list((tmp_path / "runs").glob("*"))


def test_argparse_errors_are_exit_2_without_traceback(capsys):
    for argv in (["extract", "--size", "big"], ["nonsense"], ["classify", "--jobs", "x"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv to drop root's file capabilities")
@pytest.mark.parametrize("command", ["extract", "classify"])
def test_unwritable_folders_are_refused_before_any_compute(world, tmp_path, command):
    """As root, chmod alone does not stop writes: setpriv drops the capabilities that bypass it."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if command == "extract":
        argv = [
            "extract",
            "--data",
            str(world["root"]),
            "--size",
            "32",
            "--weights",
            "random",
            "--cache-dir",
            str(locked / "cache"),
        ]
        what = "cache folder"
    else:
        argv = [
            "classify",
            "--cache",
            str(world["cache"]),
            "--sweep",
            str(world["sweep"]),
            "--runs-dir",
            str(locked / "runs"),
        ]
        what = "runs folder"
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    out = subprocess.run(
        [*drop, sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 2, out.stderr
    assert f"{what} {locked}" in out.stderr and "not writable" in out.stderr and "Traceback" not in out.stderr
    assert not any(locked.iterdir())
