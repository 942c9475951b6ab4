"""The frozen backbone builder: ``build(name, size=, layer=, weights=, precision=)``, called
with plain keywords as ``keras.applications`` builders are.

The registry (names, defaults, VGG arithmetic) lives in ``registry``, weights identity in
``weights``, weight conversions in ``convert``. Keras is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.layers import preprocess_layer_class
from pipeline.features.compiled import CompiledForward, pad
from pipeline.features.precision import policy_scope
from pipeline.features.registry import spec, unknown_layer
from pipeline.features.weights import IMAGENET, Weights, keras_models_dir, values_sha256


def build(name: str = "vgg16", *, size: int, layer: str, weights: Weights, precision: str = "float32") -> Any:
    """The frozen base truncated at ``layer``: (B,size,size,3) uint8 RGB -> (B,h,w,C) float32.

    The family's own ``preprocess_input`` runs inside the model, so a GPU receives uint8
    (4x less to copy than float32) and the host does no per-pixel arithmetic. ``precision``
    sets the compute dtype (Keras mixed policies); outputs are always float32. The model
    carries ``base_weights_sha256``, the hash of the whole base's weight values.
    """
    import keras

    family = spec(name)
    if precision not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"build runs float32, bfloat16 or float16 (resolve 'auto' first); received precision={precision!r}"
        )
    if weights.source is None:
        keras.utils.set_random_seed(weights.seed)  # random weights must be the same on resume
    with policy_scope(precision):  # layers keep the policy they were built with
        base = _construct(family.constructor, size, weights)
        base.trainable = False
        full_sha = values_sha256(base)  # of every layer, whatever the cut: pins random initialisations
        names = [x.name for x in base.layers]
        if layer not in names:
            raise unknown_layer(name, layer, names)
        trunk = keras.Model(base.inputs, base.get_layer(layer).output, name=f"{name}_{layer}")
        pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
        features = keras.ops.cast(trunk(preprocess_layer(family.module)(pixels)), "float32")
        model = keras.Model(pixels, features, name=trunk.name)
        model.base_weights_sha256 = full_sha
        return model


def _construct(constructor: str, size: int, weights: Weights) -> Any:
    import keras

    try:
        return getattr(keras.applications, constructor)(
            include_top=False, weights=weights.source, input_shape=(size, size, 3)
        )
    except Exception as e:  # download or file errors: name the way out
        if weights.source == IMAGENET:
            raise ConfigError(
                f"{constructor}: ImageNet weights could not be loaded ({type(e).__name__}: {str(e)[:200]}). "
                f"Keras downloads them once into {keras_models_dir()}; on an offline machine put the file there, "
                "or pass WEIGHTS=<weights file> or WEIGHTS=random"
            ) from e
        if weights.source is None:
            raise
        raise ConfigError(
            f"weights file {weights.source} does not fit {constructor} (include_top=False): "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e


def preprocess_layer(module: str) -> Any:
    return preprocess_layer_class()(module, dtype="float32", name=f"{module}_preprocess")


def forward(model: Any, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of one batch of uint8 images as float32 numpy.

    A ``CompiledForward`` (stage one) pads to its fixed batch shape itself. A Keras model
    goes through ``predict_on_batch``: under JAX a new batch shape means a new XLA
    compilation (seconds), so a short last batch is padded to ``batch_size``; TensorFlow
    retraces a new shape in a fraction of a second, less than padding would cost on a CPU.
    """
    if isinstance(model, CompiledForward):
        return model(batch)
    import keras

    n = len(batch)
    if n < batch_size and keras.backend.backend() == "jax":
        batch = pad(batch, batch_size)
    return np.asarray(model.predict_on_batch(batch), np.float32)[:n]
