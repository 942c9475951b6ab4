"""Stage one's batch pipeline: decoding, the forward pass and chunk bookkeeping at the same time.

Three stages joined by bounded queues, so none waits for another while there is work:

- the feeder thread walks the splits in order and takes the decoder's batches (Pillow in
  its own pool, which releases the GIL); it can start before the model exists, so images
  decode while Keras imports and the model builds, up to ``prefetch_bytes`` of them ahead;
- the forward thread runs the forward function (the compiled call, which releases the GIL
  while it computes) on each batch as soon as it is decoded;
- the caller takes ``(batch, features)`` in order, split by split, and does the chunk
  bookkeeping while the next batch is in the model.

Errors in either thread are raised again in the caller; leaving the context (also on
Ctrl-C) stops both threads after their current batch.

``threaded=False`` keeps the order of the loop before issue 31 (decode, forward and
bookkeeping in the caller's thread, the decoder prefetching on its own): the GPU decoder
(``gpu_decode``) runs that way, its device batches handed to the model on the thread that
asked for them, and decoding ahead bounded by the decoder itself. There, a ``queued``
forward (``device_forward.Queued``, JAX) keeps one batch in flight on the device: batch k+1
is queued before batch k's features are collected, so the caller's bookkeeping overlaps the
device's work.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.features.images import Batch

PREFETCH_BYTES = 128 * 2**20  # decoded images waiting for the model: ~2,000 at 150 px, ~200 batches of 32 at 64 px
_POLL = 0.1  # seconds between checks of the stop flag while a queue is full or empty

Forward = Callable[[Any], np.ndarray]


class BatchSource(Protocol):
    """What the pipeline needs of a decoder: ``images.Decoder`` and ``gpu_decode.GpuDecoder``."""

    def batches(self, items: Sequence[Any], rows: Sequence[int], size: int, batch_size: int) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Work:
    """Items of one split to decode and run, in order."""

    split: str
    items: Sequence[Any]
    rows: Sequence[int]


class Queued(Protocol):
    """A forward pass that returns before the device is done (``device_forward.Queued``)."""

    def submit(self, images: Any) -> Any: ...

    def collect(self, handle: Any) -> np.ndarray: ...


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Stopped(Exception):
    pass


class Pipeline:
    """``feed(work)`` starts decoding; ``start(forward)`` starts the model; ``results(split)``
    yields that split's ``(batch, features or None)`` in order (None: no decodable image).

    ``timings`` (seconds): "waiting for decode" (the model idle, waiting for images) and
    "forward pass" (the model busy, after the first batch); the first batch's forward pass
    is ``warmup_seconds`` (tracing and kernel set-up, paid once).
    """

    def __init__(
        self,
        decoder: BatchSource,
        size: int,
        batch_size: int,
        prefetch_bytes: int = PREFETCH_BYTES,
        *,
        threaded: bool = True,
    ):
        self.decoder, self.size, self.batch_size, self.threaded = decoder, size, batch_size, threaded
        per_batch = batch_size * size * size * 3
        self._decoded: queue.Queue[Any] = queue.Queue(maxsize=max(2, prefetch_bytes // per_batch))
        self._done: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._forward: Forward | None = None
        self._queued: Queued | None = None
        self._next = 0  # serial mode: the index in ``fed`` of the next split to run
        self.fed: list[Work] | None = None
        self.timings = {"waiting for decode": 0.0, "forward pass": 0.0}
        self.warmup_seconds, self.warmup_images = 0.0, 0

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop both threads (each after its current batch) and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def feed(self, work: Sequence[Work]) -> None:
        """Start decoding ``work`` (once per pipeline)."""
        if self.fed is not None:
            raise RuntimeError("this pipeline is already fed")
        self.fed = list(work)
        if self.threaded:
            self._spawn("featcache-feed", self._feed, self.fed)

    def start(self, forward: Forward, queued: Queued | None = None) -> None:
        """Start running ``forward`` (images -> float32 features) on the decoded batches; with
        ``queued`` (serial mode only), after the first batch, one batch in flight through it."""
        if self.fed is None:
            raise RuntimeError("feed the pipeline before starting its forward pass")
        if queued is not None and self.threaded:
            raise RuntimeError("a queued forward pass runs in serial mode (threaded=False)")
        self._forward, self._queued = forward, queued
        if self.threaded:
            self._spawn("featcache-forward", self._run_forward, forward)

    def results(self, split: str) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """The next split's batches with their features, in order; ``split`` must be that split."""
        if not self.threaded:
            yield from self._serial(split)
            return
        while True:
            item = self._get(self._done)
            if isinstance(item, _Failed):
                raise item.error
            name, batch, features = item
            if name != split:
                raise RuntimeError(f"internal: the pipeline is at split {name!r}, asked for {split!r}")
            if batch is None:
                return
            yield batch, features

    # ------------------------------------------------------------------ both modes

    def _timed_forward(self, forward: Forward, batch: Batch, waited: float) -> np.ndarray | None:
        """``forward`` on a batch with images (None without): the first call is the warm-up."""
        if not len(batch.rows):
            return None
        self.timings["waiting for decode"] += waited
        t0 = time.perf_counter()
        features = forward(batch.images)
        seconds = time.perf_counter() - t0
        if not self.warmup_images:
            self.warmup_seconds, self.warmup_images = seconds, len(batch.rows)
        else:
            self.timings["forward pass"] += seconds
        return features

    def _serial(self, split: str) -> Iterator[tuple[Batch, np.ndarray | None]]:
        if self.fed is None or self._forward is None:
            raise RuntimeError("feed and start the pipeline before asking for results")
        if self._next >= len(self.fed) or self.fed[self._next].split != split:
            raise RuntimeError(f"internal: the pipeline's next split is not {split!r}")
        w = self.fed[self._next]
        self._next += 1
        stream = self.decoder.batches(w.items, w.rows, self.size, self.batch_size)
        if self._queued is not None:
            yield from self._serial_queued(stream, self._queued)
            return
        while True:
            t0 = time.perf_counter()
            batch = next(stream, None)
            waited = time.perf_counter() - t0
            if batch is None:
                return
            yield batch, self._timed_forward(self._forward, batch, waited)

    def _serial_queued(self, stream: Iterator[Batch], queued: Queued) -> Iterator[tuple[Batch, np.ndarray | None]]:
        """Serial mode with one batch in flight: queue batch k+1, then collect batch k. The
        run's first batch goes through alone (it compiles: the warm-up)."""
        in_flight: tuple[Batch, Any] | None = None
        while True:
            t0 = time.perf_counter()
            batch = next(stream, None)
            t1 = time.perf_counter()
            if batch is not None and not self.warmup_images and len(batch.rows):
                yield batch, self._timed_forward(lambda x: queued.collect(queued.submit(x)), batch, t1 - t0)
                continue
            self.timings["waiting for decode"] += t1 - t0
            handle = queued.submit(batch.images) if batch is not None and len(batch.rows) else None
            if in_flight is not None:
                done, done_handle = in_flight
                feats = queued.collect(done_handle) if done_handle is not None else None
                self.timings["forward pass"] += time.perf_counter() - t1
                yield done, feats
            else:
                self.timings["forward pass"] += time.perf_counter() - t1
            if batch is None:
                return
            in_flight = (batch, handle)

    # ------------------------------------------------------------------ threads

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _feed(self, work: list[Work]) -> None:
        try:
            for w in work:
                for batch in self.decoder.batches(w.items, w.rows, self.size, self.batch_size):
                    self._put(self._decoded, (w.split, batch))
                self._put(self._decoded, (w.split, None))  # end of the split
        except _Stopped:
            return
        except BaseException as e:  # raised again in the caller
            self._put_failure(self._decoded, e)

    def _run_forward(self, forward: Forward) -> None:
        """Until the last split's end: the thread then ends by itself, so ``close`` at the end
        of a run joins at once instead of waiting out the stop flag's poll (``_POLL``)."""
        splits_left = len(self.fed or ())
        try:
            while splits_left:
                t0 = time.perf_counter()
                item = self._get(self._decoded)
                waited = time.perf_counter() - t0
                if isinstance(item, _Failed):
                    self._put(self._done, item)
                    return
                split, batch = item
                features = None if batch is None else self._timed_forward(forward, batch, waited)
                self._put(self._done, (split, batch, features))
                splits_left -= batch is None
        except _Stopped:
            return
        except BaseException as e:
            self._put_failure(self._done, e)

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _put_failure(self, q: queue.Queue[Any], error: BaseException) -> None:
        try:
            self._put(q, _Failed(error))
        except _Stopped:
            pass

    def _get(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped from None
