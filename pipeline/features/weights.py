"""Which weights a backbone runs with, pinned before any work, and checked after build.

Two hashes, each with one meaning:

- ``file_sha256``: SHA-256 of a weights file's bytes ("" when there is no file: random
  weights, or ImageNet weights Keras fetches itself). Cheap, needs no Keras: a changed
  file is refused before a model is built.
- ``values_sha256(model)``: SHA-256 of the whole conv base's weight values in layer order,
  whatever layer is cached. Stored in every cache as ``weights_sha256``; it pins random
  initialisations too, and ``verify_weights`` compares a rebuilt model with it.

Weights are named ``imagenet``, ``random`` (seeded initialisation) or a file path.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CacheError, ConfigError

RANDOM = "random"
IMAGENET = "imagenet"
IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + IMAGENET_FILE


@dataclass(frozen=True)
class Weights:
    """``id`` names the weights in cache file names; ``source`` is what the Keras
    constructor receives (None: random); ``file_sha256`` pins a file's bytes."""

    id: str  # "imagenet", "random-seed<N>", or "<file stem>-<sha8>"
    source: str | None
    file_sha256: str
    seed: int = 0

    @property
    def kind(self) -> str:
        return (
            RANDOM
            if self.source is None
            else (IMAGENET if self.source == IMAGENET or Path(self.source).name == IMAGENET_FILE else "file")
        )


def keras_models_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def weights_id(weights: str, seed: int = 0) -> str:
    """Short name of ``weights`` as used in cache file names (hashes a weights file)."""
    _check_spelling(weights)
    if weights == RANDOM:
        return f"{RANDOM}-seed{seed}"
    if weights == IMAGENET:
        return IMAGENET
    path = weights_file(weights)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.name.split(".")[0])[:40]
    return f"{stem}-{file_sha256(path)[:8]}"


def resolve(weights: str, backbone: str = "vgg16", seed: int = 0) -> Weights:
    """Pin ``weights`` to a file and its hash before any work.

    ``imagenet`` for VGG16 uses Keras's cached file, downloading it once when possible;
    when it can't, the error names the file and where to put it. Other families' ImageNet
    files are fetched by Keras at build time.
    """
    _check_spelling(weights)
    if weights == RANDOM:
        return Weights(weights_id(weights, seed), None, "", seed)
    if weights == IMAGENET and backbone != "vgg16":
        return Weights(IMAGENET, IMAGENET, "", seed)
    if weights == IMAGENET:
        path = keras_models_dir() / IMAGENET_FILE
        if not path.is_file():
            _download_imagenet(path)
        return Weights(IMAGENET, str(path), file_sha256(path), seed)
    path = weights_file(weights)
    return Weights(weights_id(weights, seed), str(path.resolve()), file_sha256(path), seed)


def _check_spelling(weights: str) -> None:
    if weights.lower() in ("none", "null", "random_init") or (weights.lower() == RANDOM and weights != RANDOM):
        raise ConfigError(f"weights={weights!r}: random initialisation is spelled 'random' (seeded by --seed)")


def weights_file(weights: str) -> Path:
    """A weights file that exists and is HDF5, or a ConfigError naming what is wrong."""
    import h5py

    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights={weights!r}: no such file. Give 'imagenet', 'random' or a path to a weights file "
            "of the backbone (.h5 / .weights.h5); `make pretrained-weights` or `make hed-weights` "
            "make a VGG16 one offline"
        )
    if not h5py.is_hdf5(path):
        raise ConfigError(f"weights={weights!r} is not an HDF5 weights file (.h5 / .weights.h5 as Keras saves them)")
    return path


def imagenet_available() -> bool:
    """True when the VGG16 ImageNet file is cached or can be downloaded now."""
    try:
        resolve(IMAGENET)
        return True
    except ConfigError:
        return False


def imagenet_missing(path: Path, why: str) -> str:
    return (
        f"ImageNet weights {IMAGENET_FILE} are not available ({why}). Download it from {IMAGENET_URL} "
        f"and put it at {path} (or set KERAS_HOME), or pass WEIGHTS=<path to a VGG16 weights file>, "
        "or WEIGHTS=random for random weights (tests only)"
    )


def _download_imagenet(path: Path) -> None:
    try:
        from keras.utils import get_file

        get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models", file_hash="6d6bbae143d832006294945121d1f1fc")
    except Exception as e:  # offline machines fail in many ways; all mean "not available"
        raise ConfigError(imagenet_missing(path, f"download failed: {type(e).__name__}: {str(e)[:200]}")) from e


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def values_sha256(model: Any) -> str:
    """Hash of a model's weight values, in layer order."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        # the bytes of ``tobytes()`` (so the same hash as before), without copying them first
        digest.update(np.ascontiguousarray(w).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def check_file_unchanged(source: str, expected_file_sha256: str, what: str) -> None:
    """Refuse a weights file that is gone or whose bytes changed since ``what`` was made."""
    if not expected_file_sha256 or source in (IMAGENET, RANDOM):
        return
    if not Path(source).is_file():
        raise ConfigError(f"weights file {source} used by {what} is gone; put it back to use {what}")
    have = file_sha256(source)
    if have != expected_file_sha256:
        raise ConfigError(
            f"weights_file_sha256: {what} was made with {source} at {expected_file_sha256[:12]}..., "
            f"the file is now {have[:12]}...: the weights changed since"
        )


def verify_weights(actual_values_sha256: str, expected: str, what: str) -> None:
    """Refuse a rebuilt model whose weight values differ from those ``what`` was made with."""
    if expected and actual_values_sha256 != expected:
        raise CacheError(
            f"weights_sha256: {what} was made with weights {expected[:12]}..., the rebuilt model has "
            f"{actual_values_sha256[:12]}...; rebuild the cache or restore the weights"
        )
