"""Keras layers that saved models hold, and the one safe way to load such a model.

The frozen base runs each backbone family's own ``preprocess_input`` inside the model (so a
GPU receives uint8), and an end-to-end fine-tuned model saved in a run folder holds the same
layer. Stage one builds it and stage two loads it, so it lives here, below both. Keras is
imported on first use only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.core import lean
from pipeline.core.errors import CacheError

MIN_SAFE_KERAS = (3, 14)  # earlier releases can run code from a crafted .keras file even in safe mode

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


def load_model_safely(path: str | Path) -> Any:
    """A saved Keras model, loaded in safe mode (no Lambda bytecode) by a Keras release whose
    safe mode has no known bypass, with this layer registered first. CacheError otherwise.
    Keras comes through ``lean`` (a no-op when already imported): loading a Keras winner is
    often a process's first Keras import."""
    keras = lean.import_keras()

    if _version_tuple(keras.__version__) < MIN_SAFE_KERAS:
        raise CacheError(
            f"refusing to open {path} with Keras {keras.__version__}: releases before "
            f"{'.'.join(map(str, MIN_SAFE_KERAS))} can run code from a crafted .keras file even in "
            f"safe mode; upgrade (pip install -U 'keras>={'.'.join(map(str, MIN_SAFE_KERAS))}')"
        )
    preprocess_layer_class()  # end-to-end models hold it; registered before loading
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # safe mode refusing a Lambda, a damaged zip, an unknown layer
        raise CacheError(
            f"cannot load the Keras model {path} in safe mode ({type(e).__name__}: {e}); "
            "the run folder is damaged or holds code featcache does not load"
        ) from e


def _version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


__all__ = ["MIN_SAFE_KERAS", "load_model_safely", "preprocess_layer_class"]
