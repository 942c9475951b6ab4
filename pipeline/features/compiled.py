"""The frozen base as one compiled call with a fixed batch shape: stage one's forward pass.

``model.predict_on_batch`` goes through Keras's predict machinery on every call (input
conversion, a distribution-strategy step, structure mapping of the outputs); on a CPU with
AMX, where a batch of 32 takes ~0.2 s in bfloat16, that overhead costs about a quarter of
the throughput (issue 31). Here the model's own ``__call__`` is traced once into a
``tf.function`` (TensorFlow) or ``jax.jit`` (JAX) with one input signature: uint8 images of
``(batch_size, size, size, 3)``, preprocessing inside the model as before. A short last
batch is padded with zero images to that shape (no second trace or compilation) and the
padding rows are dropped from the output. Rows are independent in inference (VGG has no
batch statistics), so padding cannot change the real rows' features.

Other backends (torch) and engines that are compiled already (OpenVINO int8) keep
``predict_on_batch``. XLA (``jit_compile=True`` on TensorFlow) is off: on the AMX Xeon it
ran bfloat16 at 3 img/s against 23-26 for the plain ``tf.function`` in the same run (XLA's
CPU convolutions do not use oneDNN's AMX kernels), and its features differed by 0.5%.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class CompiledForward:
    """``fn(images) -> features`` for uint8 batches of at most ``batch_size`` images.

    ``__call__`` pads to ``batch_size`` and returns float32 numpy rows for the real images
    only. ``backend`` says which compiled call runs ("tensorflow", "jax", or "predict_on_batch"
    where no compiled call applies).
    """

    def __init__(self, model: Any, batch_size: int, *, jit_compile: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; received {batch_size!r}")
        self.model, self.batch_size = model, batch_size
        self.output_shape = tuple(model.output_shape)
        self.name = getattr(model, "name", type(model).__name__)
        self.backend, self._call = _compile(model, batch_size, jit_compile)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} images is more than the compiled batch size {self.batch_size}")
        if n < self.batch_size and self.backend != "predict_on_batch":  # the last batch: zero images after it
            images = pad(images, self.batch_size)
        return np.asarray(self._call(images), np.float32)[:n]


def pad(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """A short batch with zero images after it, to ``batch_size`` rows (one compiled shape)."""
    n = len(batch)
    if n >= batch_size:
        return batch
    return np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])


def _compile(model: Any, batch_size: int, jit_compile: bool) -> tuple[str, Callable[[np.ndarray], Any]]:
    if not hasattr(model, "inputs"):  # not a Keras model: an engine compiled already (OpenVINO int8)
        return "predict_on_batch", model.predict_on_batch
    import keras

    backend = keras.backend.backend()
    shape = (batch_size, *tuple(model.inputs[0].shape[1:]))
    dtype = str(model.inputs[0].dtype)
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec(shape, dtype)], jit_compile=jit_compile, autograph=False)
        def run(x: Any) -> Any:
            return model(x, training=False)

        return "tensorflow", lambda x: run(x).numpy()
    if backend == "jax":
        return "jax", jax_call(model)
    return "predict_on_batch", model.predict_on_batch


def jax_call(model: Any) -> Callable[[Any], Any]:
    """The model as one jitted function of a batch (its weights read once: the base is frozen).
    It returns as soon as the work is queued (JAX dispatches asynchronously); the float32
    features are ready when they are read. Also ``device_forward.Queued``'s call."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def step(trainable: Any, frozen: Any, x: Any) -> Any:
        y, _ = model.stateless_call(trainable, frozen, x, training=False)
        return y.astype("float32")  # on the device: no cast on the host

    return lambda x: step(trainable, frozen, x)
