"""Stage one under another Keras backend: the same cache format, the backend recorded, and
features equal to TensorFlow's within float tolerance for the same weights file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.cache import store

from conftest import make_folder

REPO = Path(__file__).resolve().parent.parent


def _extract(backend: str, root: Path, weights: Path, cache_dir: Path) -> Path:
    """``featcache extract`` under ``backend``: TensorFlow in this process (the suite's own
    backend, as the CLI runs it), another backend in a fresh Python (Keras picks its backend once,
    at import)."""
    argv = [
        "extract",
        "--data",
        str(root),
        "--size",
        "48",
        "--weights",
        str(weights),
        "--precision",
        "float32",
        "--cache-dir",
        str(cache_dir),
        "--quiet",
        "--batch-size",
        "4",
    ]
    if backend == "tensorflow":
        import keras

        assert keras.backend.backend() == "tensorflow"
        assert main(argv) == 0
    else:
        env = {**os.environ, "KERAS_BACKEND": backend}
        out = subprocess.run(
            [sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
        )
        assert out.returncode == 0, out.stderr
    [path] = cache_dir.rglob("*.h5")
    return path


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX is not installed (pip install 'featcache[jax]')"
)
def test_jax_backend_gives_tensorflows_features_in_the_same_format(tmp_path):
    import keras

    root = make_folder(tmp_path / "imgs", {"train": 3, "test": 2}, size=48)
    keras.utils.set_random_seed(5)
    weights = tmp_path / "w.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(48, 48, 3)).save_weights(weights)
    tf_cache = _extract("tensorflow", root, weights, tmp_path / "tf")
    jax_cache = _extract("jax", root, weights, tmp_path / "jax")
    assert tf_cache.name == jax_cache.name  # same key: the backend is provenance, not identity
    tf_meta, jax_meta = store.read_meta(tf_cache), store.read_meta(jax_cache)
    assert tf_meta.info["versions"]["keras_backend"] == "tensorflow"
    assert jax_meta.info["versions"]["keras_backend"] == "jax"
    assert tf_meta.weights_sha256 == jax_meta.weights_sha256  # the same weight values were loaded
    for split in ("train", "test"):
        a, ya, pa = store.load_split(tf_cache, split)
        b, yb, pb = store.load_split(jax_cache, split)
        assert pa == pb and np.array_equal(ya, yb)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


_QUEUED = """
import json, sys
import numpy as np
from pipeline.features import backbone, device_forward, images, overlap, weights

model = backbone.build(size=32, layer="block5_pool", weights=weights.resolve("random"), precision="float32")
rng = np.random.default_rng(0)
batches = [images.Batch(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) + 10 * k, [])
           for k, n in enumerate((4, 4, 0, 4, 3))]

class Decoder:  # hands out the batches above, as gpu_decode.GpuDecoder hands out device batches
    def batches(self, items, rows, size, batch_size):
        yield from batches

with overlap.Pipeline(Decoder(), 32, 4, threaded=False) as pipe:
    pipe.feed([overlap.Work("train", [], [])])
    pipe.start(lambda x: backbone.forward(model, x, 4), queued=device_forward.queued_for(model, 4))
    got = list(pipe.results("train"))
out = {"order": [b.rows.tolist() for b, _ in got], "none": [f is None for _, f in got], "diff": [],
       "timed": pipe.timings["forward pass"] > 0 and pipe.warmup_images == 4}
for b, f in got:
    if f is not None:
        want = backbone.forward(model, b.images, 4)
        out["diff"].append(float(np.abs(f - want).max() / np.abs(want).max()))
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_queued_forward_under_jax_equals_the_plain_forward_in_order():
    """The device path's one-batch-ahead forward (a jitted stateless call) gives each batch its
    own features, in order, as ``backbone.forward`` does; a batch with no rows gets None."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _QUEUED], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["order"] == [list(range(10 * k, 10 * k + n)) for k, n in enumerate((4, 4, 0, 4, 3))]
    assert got["none"] == [False, False, True, False, False]
    assert len(got["diff"]) == 4 and max(got["diff"]) < 1e-5, got["diff"]
    assert got["timed"]
