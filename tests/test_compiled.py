"""Stage one's compiled forward pass (issue 31): the same features as Keras's own
``predict_on_batch``, padding rows never leaking into real rows; the overlapped pipeline
that feeds it; and the lean Keras import. Under JAX the compiled call (``jax.jit``, padded
last batch) is held to TensorFlow's features by ``test_backends``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.features import backbone, images, overlap
from pipeline.features import precision as P
from pipeline.features.compiled import CompiledForward
from pipeline.features.extract import extract
from pipeline.features.weights import resolve

from conftest import make_folder

REPO = Path(__file__).resolve().parent.parent
SIZE = 32
# Same precision, same weights, other call path: float32 differs only by summation order
# (oneDNN picks kernels per batch shape); bfloat16 by its rounding, far inside the 0.03 the
# precision tests allow between bfloat16 and float32 (tests/test_precision.py).
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-3}


def _model(precision: str = "float32", layer: str = "block5_pool"):
    return backbone.build(size=SIZE, layer=layer, weights=resolve("random", "vgg16", 3), precision=precision)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_compiled_forward_equals_predict_on_batch_row_for_row_with_a_padded_last_batch(precision):
    model = _model(precision)
    x = _pixels(7)
    fwd = CompiledForward(model, batch_size=4)
    assert fwd.backend == "tensorflow" and fwd.output_shape == model.output_shape
    got = np.concatenate([fwd(x[:4]), fwd(x[4:])])  # 4 + 3: the last batch is padded with one zero image
    ref = np.asarray(model.predict_on_batch(x), np.float32)
    assert got.shape == ref.shape == (7, 1, 1, 512) and got.dtype == np.float32
    for row in range(7):  # every row, not only the whole: a leaking padding row would move one row
        assert P.relative_error(got[row], ref[row]) < TOLERANCE[precision], row
    assert np.abs(ref).max() > 0  # random VGG16 at 32 px: features are not all zero


def test_padding_rows_do_not_change_the_real_rows_whatever_the_padding():
    fwd = CompiledForward(_model(layer="block3_pool"), batch_size=5)
    x = _pixels(5, seed=1)
    full = fwd(x)
    alone = np.concatenate([fwd(x[i : i + 1]) for i in range(5)])  # each image with 4 padding rows
    np.testing.assert_allclose(alone, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    assert fwd(x[:2]).shape == (2, *full.shape[1:])
    with pytest.raises(ValueError, match="6 images is more than the compiled batch size 5"):
        fwd(_pixels(6))


def test_an_engine_without_keras_inputs_keeps_its_own_call_unpadded():
    class Engine:  # OpenVINO's compiled model looks like this to stage one
        output_shape = (None, 2)

        def __init__(self) -> None:
            self.seen: list[int] = []

        def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
            self.seen.append(len(x))
            return np.ones((len(x), 2))

    engine = Engine()
    fwd = CompiledForward(engine, batch_size=4)
    assert fwd.backend == "predict_on_batch" and fwd(_pixels(3)).shape == (3, 2) and engine.seen == [3]


def test_extract_stores_the_direct_keras_forward_pass_of_every_image(tmp_path):
    """End to end through the pipeline: 13 files, one undecodable, batches of 4 (the last of
    each split padded), chunks of 3 (chunk and batch edges differ): each stored row is
    predict_on_batch of its own file."""
    root = make_folder(tmp_path / "imgs", {"train": 4, "test": 2}, size=48)
    (root / "train" / "cats" / "broken.png").write_bytes(b"not an image")  # a failed row inside a batch
    cfg = ExtractConfig(
        data=str(root), size=SIZE, weights="random", seed=3, batch_size=4, chunk_size=3, cache_dir=tmp_path / "c"
    )
    result = extract(cfg)
    assert result.images == 12 and 0 < result.warmup_images <= 4
    model = _model()
    for split in ("train", "test"):
        x, _, paths = store.load_split(result.path, split)
        pixels = np.stack([images.load(str(root / p), SIZE) for p in paths])
        ref = np.asarray(model.predict_on_batch(pixels), np.float32)
        assert x.shape == ref.shape and len(paths) == {"train": 8, "test": 4}[split]
        for row in range(len(x)):
            assert P.relative_error(x[row], ref[row]) < TOLERANCE["float32"], (split, paths[row])
    assert set(result.timings) == {"waiting for decode", "forward pass", "saving chunks"}
    assert result.warmup_seconds > 0 and result.timings["forward pass"] > 0


# --------------------------------------------------------------------------- the pipeline


def _decoded(tmp_path: Path, n: int) -> list[str]:
    root = make_folder(tmp_path / "p", {"train": n}, size=24)
    return sorted(str(p) for p in root.rglob("*.png"))


@pytest.mark.parametrize("threaded", [True, False], ids=["threads", "serial"])
def test_pipeline_keeps_order_across_splits_and_raises_forward_errors_in_the_caller(tmp_path, threaded):
    """Threaded (CPU decoder): the forward pass on a thread of its own. Serial (the GPU
    decoder): on the caller's thread, as before issue 31. Each row keeps its own features."""
    items = _decoded(tmp_path, 5)  # 10 files
    callers: set[int] = set()

    def first_pixel(x: np.ndarray) -> np.ndarray:
        callers.add(threading.get_ident())
        return x.reshape(len(x), -1)[:, :3].astype(np.float32)

    with images.Decoder(2) as decoder, overlap.Pipeline(decoder, 24, 3, threaded=threaded) as pipe:
        pipe.feed([overlap.Work("a", items, [9, 0, 4, 2]), overlap.Work("b", items, [1, 3])])
        pipe.start(first_pixel)
        a = [(b.rows.tolist(), f) for b, f in pipe.results("a")]
        b = [(b.rows.tolist(), f) for b, f in pipe.results("b")]
        for thread in pipe._threads:  # past the last split both threads end by themselves: no wait at close
            thread.join(timeout=5)
        assert not pipe._stop.is_set() and not any(t.is_alive() for t in pipe._threads)
    assert [r for r, _ in a] == [[9, 0, 4], [2]] and [r for r, _ in b] == [[1, 3]]
    for rows, feats in a + b:
        want = np.stack([images.load(items[r], 24)[0, 0] for r in rows]).astype(np.float32)
        np.testing.assert_array_equal(feats, want)
    assert pipe.warmup_images == 3 and pipe.timings["forward pass"] > 0
    assert (callers == {threading.get_ident()}) is not threaded and bool(pipe._threads) is threaded

    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("kernel failed")

    with images.Decoder(2) as decoder, overlap.Pipeline(decoder, 24, 3, threaded=threaded) as pipe:
        pipe.feed([overlap.Work("a", items, list(range(10)))])
        pipe.start(broken)
        with pytest.raises(RuntimeError, match="kernel failed"):
            list(pipe.results("a"))


def test_pipeline_stops_its_threads_when_the_caller_leaves_early(tmp_path):
    items = _decoded(tmp_path, 20)
    before = threading.active_count()
    with images.Decoder(2) as decoder, overlap.Pipeline(decoder, 24, 2, prefetch_bytes=1) as pipe:
        pipe.feed([overlap.Work("a", items, list(range(40)))])
        pipe.start(lambda x: (time.sleep(0.01), np.zeros((len(x), 1), np.float32))[1])
        next(pipe.results("a"))  # then leave with most batches still queued (a Ctrl-C does the same)
    assert not any(t.is_alive() for t in pipe._threads)
    assert threading.active_count() <= before


# --------------------------------------------------------------------------- lean import


def test_lean_keras_import_skips_optional_libraries_and_leaves_them_importable():
    code = """
import gc, sys
from pipeline.core import lean
keras = lean.import_keras()
skipped = [m for m in ("sklearn", "pandas", "matplotlib", "jax", "scipy") if m in sys.modules]
assert keras.layers.Dense(2)(keras.ops.ones((1, 3))).shape == (1, 2)
assert gc.isenabled() and gc.get_freeze_count() > 100_000, gc.get_freeze_count()  # Keras's objects frozen
import sklearn, pandas, scipy.sparse
later = sklearn.__name__, pandas.__name__, scipy.sparse.__name__
print("skipped-loaded:", skipped, "later:", *later, "keras" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.stdout.strip() == "skipped-loaded: [] later: sklearn pandas scipy.sparse True", out.stderr[-2000:]


# --------------------------------------------------------------------------- the end of the command

_CLI = """
import atexit, sys
atexit.register(lambda: print("TEARDOWN RAN", flush=True))
from pipeline.app.cli import main
sys.argv = ["featcache", *sys.argv[1:]]
sys.exit(main())
"""


def test_cli_extract_ends_without_teardown_and_leaves_a_complete_cache(tmp_path):
    """A local ``featcache extract`` that ran the model ends with ``os._exit`` (no interpreter
    teardown): exit code 0, its summary still arrives through a pipe (block-buffered, so only
    if flushed first), and the cache it leaves is complete and reads back. A cache hit never
    imported Keras and ends the usual way."""
    data = make_folder(tmp_path / "d", {"train": 3}, size=SIZE)
    argv = [sys.executable, "-c", _CLI, "extract", "--data", str(data), "--size", str(SIZE), "--weights", "random"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TEARDOWN RAN" not in out.stdout  # it ended before the interpreter's exit
    assert "6 new" in out.stdout and "images/s" in out.stdout, out.stdout  # the summary, flushed
    left = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*") if p.is_file())
    [path] = [tmp_path / "cache" / p for p in left if p.suffix == ".h5"]
    assert not [p for p in left if p.name.startswith(".") or "chunks" in str(p)], left  # no temp file or chunk
    x, labels, paths = store.load_split(path, "train")
    assert x.shape[0] == len(labels) == len(paths) == 6 and np.isfinite(x).all()
    assert store.read_meta(path).split_sizes == {"train": 6}

    hit = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert hit.returncode == 0 and "TEARDOWN RAN" in hit.stdout, hit.stderr[-2000:]
