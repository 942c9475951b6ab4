"""Decode and resize images into (S,S,3) uint8 RGB, and feed them ahead of the model.

Decoding uses Pillow in a small thread pool rather than tf.data because (1) every
unreadable file must be reported with its reason, where tf.data's ``ignore_errors`` drops
it silently, (2) Pillow covers CMYK JPEGs, 16-bit PNGs, palette GIFs and RGBA the same
way, (3) JPEG DCT scaling (``Image.draft``) decodes large photos at 1/2, 1/4 or 1/8
scale for a fraction of the work, and (4) the loader runs unchanged under every Keras
backend (the GPU machines here have JAX and PyTorch, no TensorFlow). Pillow releases the
GIL while it decodes, so threads overlap with the forward pass.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class ImageLoadError(ValueError):
    """An image that cannot be decoded; the message is the reason recorded in the cache."""


def load(source: str | np.ndarray, size: int) -> np.ndarray:
    """One image as (size, size, 3) uint8 RGB, from a file path or an (H,W[,3]) uint8 array.

    Squashes to a square like the seeds' ``flow_from_directory(target_size=...)`` (no crop),
    with Pillow's bilinear filter (antialiased when shrinking).
    """
    if isinstance(source, np.ndarray):
        img = Image.fromarray(source if source.ndim == 3 else np.stack([source] * 3, -1))
    else:
        img = _open(source, size)
    img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _open(path: str, size: int) -> Image.Image:
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError("empty file (0 bytes)")
        img = Image.open(path)
        img.draft("RGB", (size, size))  # JPEG only: DCT-domain downscale, never below size
        img.load()  # decode now, so a truncated file fails here with its reason
        return img
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(f"file not found: {e.filename}") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: grey, palette (+transparency), RGBA, CMYK, 16/32-bit integer."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def check_readable(path: str) -> str | None:
    """The reason a file cannot be used, or None (``--strict`` runs this before any work)."""
    try:
        _open(path, 32)
        return None
    except ImageLoadError as e:
        return str(e)


@dataclass
class Batch:
    """Decoded images of a batch, the item indices they came from, and those that failed."""

    images: np.ndarray  # (B,S,S,3) uint8
    rows: np.ndarray  # (B,) item indices
    failed: list[tuple[int, str]]  # (item index, reason)


def batches(read: Callable[[int], str | np.ndarray], rows: Sequence[int], size: int, batch_size: int,
            threads: int = 2, prefetch_batches: int = 2) -> Iterator[Batch]:
    """Decode ``rows`` in a thread pool, ``prefetch_batches`` batches ahead of the consumer.

    Order is kept; undecodable items are returned in ``failed`` instead of stopping the run.
    """
    def work(i: int) -> np.ndarray:
        return load(read(i), size)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: collections.deque[tuple[int, Future[np.ndarray]]] = collections.deque()
        it = iter(rows)
        ahead = batch_size * (prefetch_batches + 1)

        def fill() -> None:
            while len(pending) < ahead:
                try:
                    i = next(it)
                except StopIteration:
                    return
                pending.append((i, pool.submit(work, i)))

        fill()
        while pending:
            images, done, failed = [], [], []
            while pending and len(done) + len(failed) < batch_size:
                i, fut = pending.popleft()
                try:
                    images.append(fut.result())
                    done.append(i)
                except ImageLoadError as e:
                    failed.append((i, str(e)))
                fill()
            stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
            yield Batch(stacked, np.asarray(done, np.int64), failed)

