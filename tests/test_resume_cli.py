"""Crash safety (SIGKILL mid-run, then resume), the command line's exit codes, and image
decoding of every format the issue names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.app.cli import main
from pipeline.cache import store
from pipeline.features import images

from conftest import make_folder

REPO = Path(__file__).resolve().parent.parent


def featcache(*args: str, cache_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(cache_dir)]
        if args[0] in ("extract", "classify")
        else [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    p = featcache(*args, cache_dir=cache_dir)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_features(tmp_path, capsys):
    """Killed and resumed as processes (the CLI a user runs); the clean reference run goes
    through featcache's main in this process."""
    root = make_folder(tmp_path / "imgs", {"train": 20, "test": 4}, size=64)
    opts = (
        "--data",
        str(root),
        "--size",
        "64",
        "--weights",
        "random",
        "--chunk-size",
        "4",
        "--batch-size",
        "2",
        "--quiet",
    )
    killed_cache, clean_cache = tmp_path / "killed", tmp_path / "clean"

    proc = featcache("extract", *opts, cache_dir=killed_cache)
    deadline = time.time() + 120
    chunks: list[Path] = []
    while time.time() < deadline and len(chunks) < 3:
        chunks = list(killed_cache.rglob("train-*.npz"))
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(chunks) >= 3, "extraction never wrote a chunk"
    assert not list(killed_cache.rglob("*.h5")), "a killed run left a final cache file"
    assert proc.returncode == -signal.SIGKILL

    resumed = run("extract", *opts, cache_dir=killed_cache)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stdout
    capsys.readouterr()
    assert main(["extract", *opts, "--cache-dir", str(clean_cache)]) == 0
    assert "resumed" not in capsys.readouterr().out

    [a], [b] = killed_cache.rglob("*.h5"), clean_cache.rglob("*.h5")
    assert not list(killed_cache.rglob("*.partial"))
    for split in ("train", "test"):
        xa, ya, ma = store.load_split(a, split)
        xb, yb, mb = store.load_split(b, split)
        assert ma == mb and np.array_equal(ya, yb)
        np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-5)


def test_cli_exit_codes_and_messages(tmp_path):
    cache_dir = tmp_path / "cache"
    bad_layer = run("extract", "--data", "digits", "--weights", "random", "--layer", "block6_pool", cache_dir=cache_dir)
    assert bad_layer.returncode == 2 and "block6_pool" in bad_layer.stderr and "block5_pool" in bad_layer.stderr
    missing = run("extract", "--data", str(tmp_path / "nothing"), "--weights", "random", cache_dir=cache_dir)
    assert missing.returncode == 2 and str(tmp_path / "nothing") in missing.stderr
    no_cache = run("classify", "--data", "digits", "--weights", "random", "--size", "32", cache_dir=cache_dir)
    assert no_cache.returncode == 3 and "make extract" in no_cache.stderr
    usage = run("extract", "--size", "big", cache_dir=cache_dir)
    assert usage.returncode == 2 and "big" in usage.stderr


def test_cli_extract_then_hit(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 2})
    opts = ("--data", str(root), "--size", "32", "--weights", "random", "--quiet")
    first = run("extract", *opts, cache_dir=tmp_path / "c")
    assert first.returncode == 0 and "images/s" in first.stdout and "GFLOP/s" in first.stdout
    again = run("extract", *opts, cache_dir=tmp_path / "c")
    assert again.returncode == 0 and "cache hit" in again.stdout


@pytest.mark.parametrize(
    ("mode", "fmt", "ext"),
    [
        ("L", "PNG", ".png"),
        ("RGBA", "PNG", ".png"),
        ("CMYK", "JPEG", ".jpg"),
        ("I;16", "PNG", ".png"),
        ("P", "GIF", ".gif"),
        ("RGB", "BMP", ".bmp"),
        ("RGB", "JPEG", ".jpeg"),
    ],
)
def test_decoding_gives_8bit_rgb(tmp_path, mode, fmt, ext):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (250, 250, 250)  # bright left half, dark right half
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grey
    elif mode != "RGB":
        img = img.convert(mode)
    path = tmp_path / f"img{ext}"
    img.save(path, format=fmt)
    out = images.load(str(path), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, :8].mean() > 200 and out[:, -8:].mean() < 60, (mode, out[:, :8].mean(), out[:, -8:].mean())


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 255, 255), (0, 0, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert images.load(str(tmp_path / "anim.gif"), 32).mean() > 200


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """DCT scaling: a 1600px JPEG for a 150px input decodes at 1/8 scale (200px)."""
    Image.new("RGB", (1600, 1600), (10, 200, 30)).save(tmp_path / "big.jpg", quality=90)
    img = images._open(str(tmp_path / "big.jpg"), 150)
    assert img.size == (200, 200)
    assert images.load(str(tmp_path / "big.jpg"), 150).shape == (150, 150, 3)


def test_process_decoding_matches_threads(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 20}, size=24, ext=".jpg")
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    (root / "train" / "cats" / "bad.jpg").write_bytes(b"nope")
    files.insert(5, str(root / "train" / "cats" / "bad.jpg"))
    by_threads = list(images.batches(files, range(len(files)), 32, 8, threads=2))
    by_processes = list(images.batches(files, range(len(files)), 32, 8, processes=2))
    assert [b.rows.tolist() for b in by_threads] == [b.rows.tolist() for b in by_processes]
    assert [len(b.rows) + len(b.failed) for b in by_processes] == [8, 8, 8, 8, 8, 1]
    assert by_processes[0].failed == [(5, by_threads[0].failed[0][1])]
    for a, b in zip(by_threads, by_processes, strict=True):
        assert np.array_equal(a.images, b.images)
