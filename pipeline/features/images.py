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
import math
import multiprocessing
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# What a folder scan treats as an image (case-insensitive): the formats Pillow decodes here.
# Any other file (notes.txt, Thumbs.db) is ignored and counted, never reported as a bad image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageLoadError(ValueError):
    """An image that cannot be decoded; the message is the reason recorded in the cache."""


def is_image_name(name: str) -> bool:
    """True when ``name`` has an image extension: which files a scan reads (content is checked later)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def printable(text: str) -> str:
    """``text`` with any byte of a file name that is not UTF-8 shown as a ``\\xNN`` escape.

    File names are bytes on Linux; Python hands undecodable bytes over as lone surrogates
    (surrogateescape), which cannot be printed or written as UTF-8. Use this for messages
    only: the path itself (with its surrogates) is what opens the file and what the cache stores.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file name produced: escape it as a code point
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


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
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _open(path: str, size: int) -> Image.Image:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageLoadError(f"broken symbolic link to {printable(os.readlink(path))}") from None
        raise ImageLoadError("file not found (removed after the folder was scanned?)") from None
    except OSError as e:  # a symlink loop, a permission problem on the way
        raise ImageLoadError(f"cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError("not a regular file")  # a FIFO or device would block or never end
    if st.st_size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    try:
        img = Image.open(path)
        img.draft("RGB", (size, size))  # JPEG only: DCT-domain downscale, never below size
        img.load()  # decode now, so a truncated file fails here with its reason
        return img
    except PermissionError:
        raise ImageLoadError("cannot read: permission denied") from None
    except FileNotFoundError:
        raise ImageLoadError("file not found (removed after the folder was scanned?)") from None
    except UnidentifiedImageError:  # its message repeats the path (escaped by repr): the row already names it
        raise ImageLoadError("cannot decode: not an image in any format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode: {printable(str(e))}") from e


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


@dataclass(frozen=True)
class AugmentPolicy:
    """Seed 003's augmentation, stated once: the cached views (``augment``) and the Keras
    layers of the end-to-end recipe (``keras_layers``) are both built from these values."""

    flip: str = "horizontal"  # RandomFlip mode, p=0.5
    rotation: float = 0.1  # RandomRotation factor: uniform in +-0.1 turn (+-36 degrees)
    zoom: float = 0.2  # RandomZoom factor: uniform in +-20%, same factor both axes
    fill: str = "reflect"

    def describe(self) -> str:
        return (
            f"seed 003's layers, per image and view: {self.flip} flip (p=0.5), rotation uniform in "
            f"+-{self.rotation} turn (+-{self.rotation * 360:g} degrees), zoom uniform in +-{self.zoom:.0%} "
            f"(same factor both axes), bilinear, {self.fill} fill; view k of an image uses "
            "numpy.random.default_rng([seed, k, h]), h = sources.path_hash(its relative path), so a view "
            "follows its image when others are added"
        )

    def keras_layers(self, seed: int) -> list[Any]:
        """The same policy as Keras preprocessing layers (random per batch, not per view)."""
        import keras

        return [
            keras.layers.RandomFlip(self.flip, seed=seed),
            keras.layers.RandomRotation(self.rotation, fill_mode=self.fill, seed=seed),
            keras.layers.RandomZoom(self.zoom, fill_mode=self.fill, seed=seed),
        ]


AUGMENT = AugmentPolicy()
AUGMENT_POLICY = AUGMENT.describe()


def augment(image: np.ndarray, seed: Sequence[int], policy: AugmentPolicy = AUGMENT) -> np.ndarray:
    """One augmented view of an (S,S,3) uint8 image, the same for the same ``seed``.

    Mirrors ``policy.keras_layers()`` (RandomFlip, RandomRotation, RandomZoom with reflect
    fill), but seeded per image and view so a resumed or repeated run gives identical views
    whatever the batch order.
    """
    from scipy import ndimage

    rng = np.random.default_rng(list(seed))
    flip = rng.random() < 0.5
    angle = rng.uniform(-policy.rotation, policy.rotation) * 2 * np.pi
    zoom = 1.0 + rng.uniform(
        -policy.zoom, policy.zoom
    )  # >1 samples a larger area: zooms out, as Keras's positive factor
    cos, sin = np.cos(angle), np.sin(angle)
    # output (row, col) -> input: rotate and scale about the centre, then mirror columns
    matrix = zoom * np.array([[cos, -sin], [sin, cos]])
    if flip:
        matrix = matrix @ np.diag([1.0, -1.0])
    centre = (np.array(image.shape[:2]) - 1) / 2.0
    offset = centre - matrix @ centre
    full = np.eye(3)
    full[:2, :2] = matrix
    out = ndimage.affine_transform(image.astype(np.float32), full, offset=(*offset, 0.0), order=1, mode=policy.fill)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


MIRROR = "mirror"  # a view's transform: the horizontal mirror (features.views' view 1)


def view(image: np.ndarray, spec: Any) -> np.ndarray:
    """The view ``spec`` of a decoded image: ``MIRROR``, or an ``augment`` seed."""
    if isinstance(spec, str):
        if spec != MIRROR:
            raise ValueError(f"unknown view transform {spec!r}; known: {MIRROR!r} or an augmentation seed")
        return np.ascontiguousarray(image[:, ::-1])
    return augment(image, spec)


def _decode_group(sources: Sequence[str | np.ndarray | tuple], size: int) -> list[np.ndarray | str]:
    """Decode several images in one task: an array each, or the reason it failed.

    A ``(source, spec)`` tuple asks for a view of that source (``view``: mirror or augmented).
    """
    out: list[np.ndarray | str] = []
    for src in sources:
        try:
            if isinstance(src, tuple):
                out.append(view(load(src[0], size), src[1]))
            else:
                out.append(load(src, size))
        except ImageLoadError as e:
            out.append(str(e))
    return out


class Decoder:
    """A pool that decodes images ahead of the model; one per run, reused across splits.

    Threads suit a few cores (Pillow releases the GIL while decoding). With many cores
    the Python around each decode serialises on the GIL (about 2,000 images/s at any
    thread count on a 16-core host), so ``processes > 0`` decodes file paths in that
    many spawned processes, 16 images per task.
    """

    def __init__(self, threads: int = 2, processes: int = 0):
        self.threads, self.processes = threads, processes
        self._threads: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        for pool in (self._threads, self._processes):
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _pool(self, paths: bool) -> tuple[ThreadPoolExecutor | ProcessPoolExecutor, int]:
        if paths and self.processes > 0:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            return self._processes, 16
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        return self._threads, 1

    def batches(
        self,
        items: Sequence[str | np.ndarray],
        rows: Sequence[int],
        size: int,
        batch_size: int,
        prefetch_batches: int = 2,
    ) -> Iterator[Batch]:
        """Decoded ``items[rows]`` in order, ``prefetch_batches`` batches ahead of the consumer.

        Undecodable items come back in ``Batch.failed`` with their reason.
        """
        rows = list(rows)
        first = items[rows[0]] if rows else None
        pool, group = self._pool(isinstance(first, str) or (isinstance(first, tuple) and isinstance(first[0], str)))
        groups = collections.deque(rows[k : k + group] for k in range(0, len(rows), group))
        pending: collections.deque[tuple[list[int], Future[list[np.ndarray | str]]]] = collections.deque()
        ready: collections.deque[tuple[int, np.ndarray | str]] = collections.deque()
        # enough tasks in flight to cover the batches ahead and to keep every process busy twice over
        ahead = max(math.ceil(batch_size * (prefetch_batches + 1) / group), 2 * self.processes if group > 1 else 1)
        while groups or pending or ready:
            while len(ready) < batch_size and (groups or pending):
                while groups and len(pending) < ahead:
                    idx = groups.popleft()
                    pending.append((idx, pool.submit(_decode_group, [items[i] for i in idx], size)))
                idx, fut = pending.popleft()
                ready.extend(zip(idx, fut.result(), strict=True))
            take = [ready.popleft() for _ in range(min(batch_size, len(ready)))]
            ok = [(i, r) for i, r in take if not isinstance(r, str)]
            stacked = np.stack([r for _, r in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
            yield Batch(
                stacked, np.array([i for i, _ in ok], np.int64), [(i, r) for i, r in take if isinstance(r, str)]
            )


def batches(
    items: Sequence[str | np.ndarray],
    rows: Sequence[int],
    size: int,
    batch_size: int,
    threads: int = 2,
    processes: int = 0,
) -> Iterator[Batch]:
    """One-off ``Decoder(threads, processes).batches(...)``."""
    with Decoder(threads, processes) as decoder:
        yield from decoder.batches(items, rows, size, batch_size)
