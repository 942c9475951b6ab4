"""The backbone's forward pass on a GPU batch, with the next batch queued behind it.

Why: on a GPU the forward pass of one batch takes about 9 ms (VGG16, 150 px, batch 256,
float16, H200), less than the Python around it: receiving the decoded batch, copying the
features to the host and filing them under their chunks. ``model.predict_on_batch`` waits
for its batch to finish before it returns, so that Python work and the device's work take
turns. Under JAX, a jitted ``stateless_call`` returns as soon as the work is queued: the
next batch goes to the device before the previous one's features are copied back, and the
device stays busy (BENCHMARKS.md section 11).

Inputs are uint8 batches: a CUDA tensor from ``gpu_decode`` (handed to JAX through DLPack,
no trip through host memory) or numpy. Other backends, and anything that is not a device
batch, keep ``backbone.forward``.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from pipeline.features import backbone, compiled


def to_backend(batch: Any) -> Any:
    """A device tensor as the Keras backend's input, without a host round trip where the
    backend allows: the tensor itself under torch, a DLPack view under jax; host numpy otherwise."""
    import keras

    name = keras.backend.backend()
    if name == "torch":
        return batch
    if name == "jax":
        import jax.numpy as jnp

        return jnp.from_dlpack(batch)
    return batch.cpu().numpy()  # TensorFlow: through the host


def _pad(batch: Any, batch_size: int) -> Any:
    """A short batch padded with zeros to ``batch_size`` rows, on its own device (a new batch
    shape would make JAX compile again, for seconds)."""
    n = int(batch.shape[0])
    if n >= batch_size:
        return batch
    if isinstance(batch, np.ndarray):
        return compiled.pad(batch, batch_size)
    import torch

    pad = torch.zeros((batch_size - n, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    return torch.cat([batch, pad])


def forward(model: Any, batch: Any, batch_size: int) -> np.ndarray:
    """``backbone.forward`` for a device batch: features as float32 numpy, the call returning
    when they are on the host. A short batch is padded on the device under JAX."""
    import keras

    if isinstance(batch, np.ndarray):
        return backbone.forward(model, batch, batch_size)
    n = int(batch.shape[0])
    if keras.backend.backend() == "jax":
        batch = _pad(batch, batch_size)
    return np.asarray(model.predict_on_batch(to_backend(batch)), np.float32)[:n]


class Queued:
    """The model as one jitted JAX call (``compiled.jax_call``): ``submit`` queues a batch on
    the device and returns at once, ``collect`` waits for its features."""

    def __init__(self, model: Any, batch_size: int):
        self.batch_size = batch_size
        self._call = compiled.jax_call(model)

    def submit(self, batch: Any) -> tuple[Any, int]:
        """Queue one uint8 batch (CUDA tensor or numpy); the handle ``collect`` takes."""
        import jax.numpy as jnp

        n = int(batch.shape[0])
        x = _pad(batch, self.batch_size)
        x = jnp.asarray(x) if isinstance(x, np.ndarray) else to_backend(x)
        return self._call(x), n

    @staticmethod
    def collect(handle: tuple[Any, int]) -> np.ndarray:
        """The features of a submitted batch as float32 numpy (waits for the device)."""
        out, n = handle
        return np.asarray(out, np.float32)[:n]


_QUEUED: weakref.WeakKeyDictionary[Any, Queued] = weakref.WeakKeyDictionary()


def queued_for(model: Any, batch_size: int) -> Queued:
    """The model's ``Queued`` (one per model and batch size): a new one traces and compiles again."""
    queued = _QUEUED.get(model)
    if queued is None or queued.batch_size != batch_size:
        queued = _QUEUED[model] = Queued(model, batch_size)
    return queued


def queues_ahead() -> bool:
    """Whether device batches can go through ``Queued``: under the JAX backend."""
    import keras

    return keras.backend.backend() == "jax"
