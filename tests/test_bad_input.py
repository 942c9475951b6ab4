"""A user's mistake in DATA gives a clear error or a reported skip: never a traceback, never a
silently wrong cache, and never a change to what is already cached.

Each test drives the command line (``cli.main``) on tiny generated images with random
weights, and checks the exit code, that the message names the problem, that stderr has no
traceback, and (for errors) that the cache folder is byte for byte what it was.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.app import cli, predict
from pipeline.core.config import ExtractConfig
from pipeline.features import backbone, sources

from conftest import make_folder, make_image

REPO = Path(__file__).resolve().parent.parent
SIZE = 32


def extract_args(data: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--data",
        str(data),
        "--weights",
        "random",
        "--size",
        str(SIZE),
        "--quiet",
        "--cache-dir",
        str(cache_dir),
        *extra,
    ]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file below ``folder`` (hidden ones too) with its size, mtime and content hash."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fs(name: bytes) -> str:
    """A file name from its bytes, as Python's os functions hand it over (surrogateescape)."""
    return os.fsdecode(name)


def add_messy_files(root: Path) -> None:
    """Everything a real folder collects: a non-UTF-8 name (good and bad image), a broken
    symlink, and files that are not images."""
    cats, dogs = root / "train" / "cats", root / "train" / "dogs"
    make_image(cats / fs(b"caf\xe9.png"), (200, 40, 40), SIZE, 99)
    (dogs / fs(b"bad\xff.jpg")).write_bytes(b"not a jpeg")
    os.symlink(root / "nowhere.png", dogs / "gone.png")
    (cats / "notes.txt").write_text("label notes")
    (cats / "Thumbs.db").write_bytes(b"\x00" * 16)
    (dogs / ".DS_Store").write_bytes(b"\x00" * 16)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder already holding one good cache: error tests check it is left untouched."""
    base = tmp_path_factory.mktemp("cached")
    data = make_folder(base / "good", {"train": 2, "validation": 1}, size=SIZE)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(extract_args(data, base / "cache")) == 0
    assert list((base / "cache").rglob("*.h5"))
    return base / "cache"


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One extract (no --strict) over a folder with every kind of messy file."""
    base = tmp_path_factory.mktemp("messy")
    root = make_folder(base / "data", {"train": 2, "validation": 1}, size=SIZE)
    add_messy_files(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(extract_args(root, base / "cache"))
    caches = list((base / "cache").rglob("*.h5"))
    return {
        "root": root,
        "code": code,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "cache": caches[0] if caches else None,
    }


def refused(argv: list[str], cached: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run an extract that must fail with exit 2 before any work; returns stderr."""
    before = snapshot(cached)
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert snapshot(cached) == before
    return err


# --------------------------------------------------------------------------- file names that are not UTF-8


def test_non_utf8_names_are_stored_as_their_bytes_and_printed_escaped(messy):
    assert messy["code"] == 0 and "Traceback" not in messy["err"], messy["err"]
    with h5py.File(messy["cache"]) as f:
        stored = list(f["train/paths"][()])
        skipped = list(f["train/skipped/paths"][()])
    assert b"train/cats/caf\xe9.png" in stored  # the exact bytes of the name on disk
    assert b"train/dogs/bad\xff.jpg" in skipped
    for raw in stored:  # every stored name opens the file it came from
        assert (messy["root"] / raw.decode("utf-8", "surrogateescape")).is_file()
    assert "train/dogs/bad\\xff.jpg: cannot decode" in messy["out"]


def test_non_utf8_bad_file_with_strict_is_named_escaped(tmp_path, cached, capsys):
    root = make_folder(tmp_path / "data", {"train": 2}, size=SIZE)
    (root / "train" / "dogs" / fs(b"bad\xff.jpg")).write_bytes(b"not a jpeg")
    err = refused(extract_args(root, cached, "--strict"), cached, capsys)
    assert "train/dogs/bad\\xff.jpg: cannot decode" in err and "--strict: 1 file(s)" in err


def test_fingerprint_and_source_survive_a_non_utf8_data_file_name(tmp_path):
    root = make_folder(tmp_path / "data", {"train": 2}, size=SIZE)
    make_image(root / "train" / "cats" / fs(b"\xff\xfe.png"), (1, 2, 3), SIZE, 7)
    source = sources.resolve(ExtractConfig(data=str(root), size=SIZE, weights="random"))
    assert fs(b"train/cats/\xff\xfe.png") in source.splits["train"].paths
    assert len(source.fingerprint) == 64


# --------------------------------------------------------------------------- broken symlinks


def test_dangling_symlink_is_skipped_and_reported(messy):
    assert messy["code"] == 0
    assert "train/dogs/gone.png: broken symbolic link to" in messy["out"]
    with h5py.File(messy["cache"]) as f:
        assert b"train/dogs/gone.png" in list(f["train/skipped/paths"][()])
        assert b"train/dogs/gone.png" not in list(f["train/paths"][()])


def test_dangling_symlink_with_strict_is_an_error_naming_it(tmp_path, cached, capsys):
    root = make_folder(tmp_path / "data", {"train": 2}, size=SIZE)
    os.symlink(tmp_path / "missing.jpg", root / "train" / "cats" / "link.jpg")
    err = refused(extract_args(root, cached, "--strict"), cached, capsys)
    assert "train/cats/link.jpg: broken symbolic link to" in err and "missing.jpg" in err


# --------------------------------------------------------------------------- files that are not images


def test_skip_summary_names_each_path_once(messy):
    assert "train/train/" not in messy["out"]
    assert "    train/dogs/gone.png:" in messy["out"]


def test_non_images_are_ignored_counted_and_listed_only_in_debug(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="pipeline")
    root = make_folder(tmp_path / "data", {"train": 2, "validation": 1}, size=SIZE)
    cfg = ExtractConfig(data=str(root), size=SIZE, weights="random")
    before = sources.resolve(cfg).fingerprint
    (root / "train" / "cats" / "notes.txt").write_text("label notes")
    (root / "validation" / "dogs" / "Thumbs.db").write_bytes(b"\x00" * 16)
    (root / "train" / "dogs" / ".DS_Store").write_bytes(b"\x00" * 16)
    source = sources.resolve(cfg)
    assert source.fingerprint == before  # a README.txt does not invalidate a cache
    assert sorted(source.ignored) == ["train/cats/notes.txt", "validation/dogs/Thumbs.db"]

    caplog.clear()
    code, out, err = run(["-v", *extract_args(root, tmp_path / "cache", "--strict")], capsys)
    assert code == 0, err
    assert "skipped" not in out and "notes.txt" not in out  # not a bad image, and not failing --strict
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("ignored 2 file(s)" in m and ".txt: 1" in m and ".db: 1" in m for m in infos), infos
    assert not any("notes.txt" in m for m in infos)
    assert any(m.endswith("train/cats/notes.txt") for m in debugs), debugs
    with h5py.File(next((tmp_path / "cache").rglob("*.h5"))) as f:
        assert all(p.endswith(b".png") for s in ("train", "validation") for p in f[f"{s}/paths"][()])

    (root / "README.txt").write_text("about this data")  # a loose file next to the split folders
    code, out, _ = run(extract_args(root, tmp_path / "cache"), capsys)
    assert code == 0 and "cache hit" in out


def test_class_folder_with_only_non_images_is_an_error(tmp_path, cached, capsys):
    root = make_folder(tmp_path / "data", {"train": 2}, size=SIZE)
    dogs = root / "train" / "dogs"
    shutil.rmtree(dogs)
    dogs.mkdir()
    (dogs / "notes.txt").write_text("dogs go here")
    err = refused(extract_args(root, cached), cached, capsys)
    assert f"{dogs} holds no image files, only 1 other file(s) (notes.txt)" in err


def test_split_without_images_is_an_error_naming_it(tmp_path, cached, capsys):
    root = make_folder(tmp_path / "data", {"train": 2}, size=SIZE)
    for name in ("cats", "dogs"):
        (root / "validation" / name).mkdir(parents=True)
        (root / "validation" / name / "Thumbs.db").write_bytes(b"\x00" * 16)
    err = refused(extract_args(root, cached), cached, capsys)
    assert f"split 'validation' ({root / 'validation'}) has no images" in err


# --------------------------------------------------------------------------- a single class


@pytest.mark.parametrize("layout", ["splits", "flat", "npz"])
def test_single_class_is_refused_before_any_compute(tmp_path, cached, capsys, monkeypatch, layout):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for data that can only be refused")

    monkeypatch.setattr(backbone, "build", no_model)
    if layout == "npz":
        data = tmp_path / "one.npz"
        np.savez(data, x=np.zeros((6, 8, 8, 3), np.uint8), y=np.zeros(6, np.int64), class_names=np.array(["cats"]))
    else:
        data = make_folder(
            tmp_path / "data",
            {"train": 3} if layout == "splits" else {"": 3},
            size=SIZE,
            classes={"cats": (200, 40, 40)},
        )
    err = refused(extract_args(data, cached), cached, capsys)
    assert f"{data} has a single class, 'cats'" in err


# --------------------------------------------------------------------------- .npz files that are not


@pytest.mark.parametrize("kind", ["text", "empty", "npy", "truncated zip", "object array"])
def test_invalid_npz_is_named_and_never_suggests_allow_pickle(tmp_path, cached, capsys, kind):
    data = tmp_path / "data.npz"
    if kind == "text":
        data.write_text("x,y\n1,2\n")
    elif kind == "empty":
        data.write_bytes(b"")
    elif kind == "npy":
        with open(data, "wb") as f:
            np.save(f, np.zeros((4, 8, 8, 3), np.uint8))
    elif kind == "truncated zip":
        np.savez(tmp_path / "full.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.arange(4) % 2)
        data.write_bytes((tmp_path / "full.npz").read_bytes()[:100])
    else:
        np.savez(data, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4) % 2)
    err = refused(extract_args(data, cached), cached, capsys)
    assert str(data) in err and "allow_pickle" not in err
    if kind == "object array":
        assert "array of Python objects" in err
    else:
        assert "is not a valid .npz file" in err and "numpy.savez" in err


# --------------------------------------------------------------------------- predict's CSV


def test_predict_csv_keeps_non_utf8_names_as_on_disk(tmp_path):
    name = fs(b"caf\xe9.png")
    rows = [
        {
            "path": str(tmp_path / name),
            "class": "cats",
            "probability": "0.9",
            "error": "",
            "p_cats": "0.9",
            "p_dogs": "0.1",
        }
    ]
    out = predict._write(rows, tmp_path, ["cats", "dogs"], tmp_path / "p.csv")
    assert b"\ncaf\xe9.png,cats," in out.read_bytes()
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        assert (tmp_path / next(csv.DictReader(f))["path"]).name == name


# --------------------------------------------------------------------------- the Makefile


def test_make_extract_takes_a_data_path_with_spaces(tmp_path, fake_venv):
    data = make_folder(tmp_path / "my images", {"train": 2}, size=SIZE)
    (data / "train" / "dogs" / fs(b"bad\xff.jpg")).write_bytes(b"not a jpeg")  # printed on a real stdout
    env = {
        **os.environ,
        "FEATCACHE_CACHE_DIR": str(tmp_path / "cache dir"),
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "extract",
            f"DATA={data}",
            "WEIGHTS=random",
            f"SIZE={SIZE}",
            f"VENV={fake_venv}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert list((tmp_path / "cache dir").rglob("*.h5"))
    assert "train/dogs/bad\\xff.jpg: cannot decode" in out


@pytest.mark.parametrize(
    ("target", "values", "expected"),
    [
        (
            "predict",
            {"IMAGES": "new photos/a b.jpg", "RUN": "runs/my run"},
            ["new photos/a b.jpg", "--run", "runs/my run"],
        ),
        (
            "classify",
            {"DATA": "my data", "CACHE": "a cache.h5", "SWEEP": "my sweep.toml"},
            ["--data", "my data", "--cache", "a cache.h5", "--sweep", "my sweep.toml"],
        ),
        (
            "compare",
            {"DATA": "my data", "BACKBONES": "vgg16,vgg19"},
            ["--backbones", "vgg16,vgg19", "--data", "my data"],
        ),
        ("finetune", {"DATA": "my data", "HEAD_RUN": "runs/a run"}, ["--data", "my data", "--head-run", "runs/a run"]),
    ],
)
def test_make_passes_each_value_as_one_argument(fake_venv, target, values, expected):
    cmd = ["make", "--no-print-directory", "-n", target, f"VENV={fake_venv}", *(f"{k}={v}" for k, v in values.items())]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith(str(fake_venv / "bin" / "featcache")))
    argv = shlex.split(line)
    for k in range(len(expected) - 1):
        if expected[k].startswith("--"):
            assert argv[argv.index(expected[k]) + 1] == expected[k + 1], argv
    assert all(e in argv for e in expected), argv
    if target == "compare":
        assert "--backbone" not in argv
