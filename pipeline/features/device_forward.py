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

import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from pipeline.features import backbone


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
        return np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
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
    """The model as one jitted JAX function of its weights and a batch: ``submit`` queues a
    batch on the device and returns at once, ``collect`` waits for its features.

    The weights are read once, here: the frozen backbone does not change during a run.
    """

    def __init__(self, model: Any, batch_size: int):
        import jax

        self.batch_size = batch_size
        self._weights = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

        def call(trainable: Any, non_trainable: Any, x: Any) -> Any:  # float32 on the device: no host cast
            return model.stateless_call(trainable, non_trainable, x, training=False)[0].astype("float32")

        self._call = jax.jit(call)

    def submit(self, batch: Any) -> tuple[Any, int]:
        """Queue one uint8 batch (CUDA tensor or numpy); the handle ``collect`` takes."""
        import jax.numpy as jnp

        n = int(batch.shape[0])
        x = _pad(batch, self.batch_size)
        x = jnp.asarray(x) if isinstance(x, np.ndarray) else to_backend(x)
        return self._call(*self._weights, x), n

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


def queues_ahead(decoder_is_gpu: bool) -> bool:
    """Whether ``features`` keeps a batch queued on the device: GPU-decoded batches under JAX."""
    import keras

    return decoder_is_gpu and keras.backend.backend() == "jax"


def features(
    model: Any, batches: Iterable[Any], batch_size: int, timings: dict[str, float], ahead: bool = False
) -> Iterator[tuple[Any, np.ndarray | None]]:
    """(batch, its features) for each decoded batch, in order; None for a batch with no rows
    (every file in it failed). ``timings`` gains "waiting for decode" (the decoder's turn)
    and "forward pass" (the model's turn, including copying the features to the host).

    With ``ahead`` (``queues_ahead``), batch k+1 is queued on the device before batch k's
    features are collected: one batch in flight. The first batch still goes through alone,
    since it compiles, and the caller counts it as the warm-up.
    """
    queued = queued_for(model, batch_size) if ahead else None
    stream = iter(batches)
    in_flight: tuple[Any, tuple[Any, int] | None] | None = None
    first = True
    while True:
        t0 = time.perf_counter()
        batch = next(stream, None)
        t1 = time.perf_counter()
        timings["waiting for decode"] += t1 - t0
        has_rows = batch is not None and len(batch.rows) > 0
        if queued is None:  # one batch at a time
            if batch is None:
                return
            feats = forward(model, batch.images, batch_size) if has_rows else None
            timings["forward pass"] += time.perf_counter() - t1
            yield batch, feats
            continue
        handle = queued.submit(batch.images) if batch is not None and has_rows else None
        if in_flight is not None:
            done, done_handle = in_flight
            feats = queued.collect(done_handle) if done_handle is not None else None
            timings["forward pass"] += time.perf_counter() - t1
            yield done, feats
        else:
            timings["forward pass"] += time.perf_counter() - t1
        if batch is None:
            return
        in_flight = (batch, handle)
        if first and handle is not None:  # the first batch alone: it compiles
            first = False
            t2 = time.perf_counter()
            feats = queued.collect(handle)
            timings["forward pass"] += time.perf_counter() - t2
            in_flight = None
            yield batch, feats
