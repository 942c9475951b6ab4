"""Decode JPEGs and resize them on a CUDA device, in batches, for ``extract --decoder gpu``.

Why: on a GPU host the forward pass outruns the host's JPEG decoding (BENCHMARKS.md
section 11), so the decode moves to the device: torchvision's batched ``decode_jpeg``
(nvJPEG, the hardware JPEG engines of A100/H100 for baseline JPEGs), then Pillow's
resize done as two matrix products per batch, and the uint8 batch handed to the Keras
backend without a trip through host memory (a CUDA tensor under ``KERAS_BACKEND=torch``,
DLPack under ``jax``).

Same semantics as the CPU path (``pipeline.features.images.load``), as far as another JPEG decoder
allows: Pillow's ``draft`` (DCT-domain 1/2, 1/4, 1/8 scaling) is emulated by a box filter
of the same factor, then Pillow's antialiased bilinear filter with its own coefficients,
rounding between the horizontal and vertical pass as Pillow does; no EXIF rotation (the
CPU path applies none either). Anything the device should not decode (not a JPEG, CMYK or
grey JPEGs, arithmetic coding, 12-bit, a missing end marker, unreadable files) and any
file nvJPEG rejects goes to the CPU path one by one, which decodes it or records why not.

torch is imported inside the functions: the module imports (and its pure parts are
tested) on machines without it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import stat
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.core.config import DECODERS
from pipeline.core.errors import ConfigError
from pipeline.features import images

# what ``--decoder gpu`` adds to the cache's preprocessing identity (and "-gpudecode" to its name)
GPU_IDENTITY = "decoded on a CUDA device (nvJPEG via torchvision, Pillow draft+bilinear resize emulated)"
CACHE_SUFFIX = "-gpudecode"


def unavailable_reason() -> str | None:
    """Why GPU decoding cannot run here, or None when it can (torch + torchvision + a CUDA device)."""
    try:
        import torch
        import torchvision.io
    except ImportError as e:
        return f"PyTorch and torchvision are not installed ({e.name} missing)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch"
    if not hasattr(torchvision.io, "decode_jpeg"):  # pragma: no cover - every torchvision >= 0.10 has it
        return f"torchvision {torchvision.__version__} has no decode_jpeg"
    return None


def resolve(choice: str, has_files: bool, precision: str = "float32", reason: str | bool | None = False) -> str:
    """``auto``/``cpu``/``gpu`` -> the decoder a run uses: ``cpu`` or ``gpu``.

    ``auto`` is gpu only where a CUDA device and torchvision are usable, the data are image
    files and the model runs on the GPU (not int8, which OpenVINO runs on the CPU); ``gpu``
    where it cannot run is a ConfigError (exit 2) naming why. ``reason`` stands in for
    ``unavailable_reason()`` (tests); False means ask.
    """
    if choice not in DECODERS:
        raise ConfigError(f"decoder must be one of {DECODERS}; received decoder={choice!r}")
    if choice == "cpu":
        return "cpu"
    if not has_files or precision == "int8":
        if choice == "gpu":
            raise ConfigError(
                "--decoder gpu decodes image files for a model on the GPU; "
                + ("this data source holds arrays (nothing to decode)" if not has_files else "int8 runs on the CPU")
                + ". Leave --decoder at auto or cpu"
            )
        return "cpu"
    why = unavailable_reason() if reason is False else reason
    if why is None:
        return "gpu"
    if choice == "gpu":
        raise ConfigError(f"--decoder gpu cannot run here: {why}. Use --decoder cpu (or auto)")
    return "cpu"


# ----------------------------------------------------------------------------- JPEG headers

_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic


def jpeg_problem(data: bytes | bytearray | memoryview) -> str | None:
    """Why these bytes go to the CPU path rather than nvJPEG, or None for an 8-bit 3-component JPEG.

    Reads the markers up to the frame header: 3 components (YCbCr; an Adobe marker saying
    the samples are RGB is sent to the CPU), 8 bits, Huffman coding; and the file must end
    with the end-of-image marker (Pillow refuses truncated files; nvJPEG may not).
    """
    buf = memoryview(data)
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return "not a JPEG"
    end = n
    while end > 2 and buf[end - 1] in (0x00, 0x0A, 0x0D, 0x20):  # padding some writers leave after EOI
        end -= 1
    if buf[end - 2] != 0xFF or buf[end - 1] != 0xD9:
        return "no end-of-image marker (truncated?)"
    i, adobe_transform = 2, -1
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return "malformed marker segment"
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if length < 2:
            return "malformed marker segment"
        if marker == 0xEE and length >= 14 and bytes(buf[i + 4 : i + 9]) == b"Adobe":
            adobe_transform = buf[i + 15] if i + 15 < n else -1
        elif marker in _SOF_SUPPORTED:
            if i + 10 > n:
                return "truncated frame header"
            bits, components = buf[i + 4], buf[i + 9]
            if bits != 8:
                return f"{bits}-bit samples"
            if components != 3:
                return {1: "grey (1 component)", 4: "CMYK/YCCK (4 components)"}.get(
                    components, f"{components} components"
                )
            if adobe_transform == 0:
                return "RGB samples (Adobe transform 0)"
            return None
        elif marker in _SOF_OTHER:
            return "lossless, hierarchical or arithmetic-coded JPEG"
        elif marker == 0xDA:
            return "no frame header before the scan"
        i += 2 + length
    return "no frame header"


# ----------------------------------------------------------------------------- Pillow's resize


def draft_scale(width: int, height: int, size: int) -> int:
    """The DCT scale Pillow's ``Image.draft("RGB", (size, size))`` picks for a JPEG: 8, 4, 2 or 1."""
    scale = min(width // size, height // size)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


@functools.lru_cache(maxsize=256)
def pil_weights(in_size: int, out_size: int, box: int = 1) -> np.ndarray:
    """(out_size, in_size) float64: Pillow's bilinear resampling as a matrix, exactly.

    Pillow's ``precompute_coeffs`` (support 1, widened by the downscale factor, i.e.
    antialiased) then ``normalize_coeffs_8bpc`` (22-bit fixed point): every weight is
    k/2**22, so float64 products and sums reproduce Pillow's integer arithmetic. ``box > 1``
    first averages ``box`` samples (ceil(in/box) of them), standing in for JPEG DCT scaling.
    """
    mid = -(-in_size // box)
    scale = mid / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    k = np.zeros((out_size, mid), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), mid)
        x = np.arange(xmin, xmax)
        w = np.clip(1.0 - np.abs((x - center + 0.5) / filterscale), 0.0, None)
        total = w.sum()
        if total != 0.0:
            w = w / total
        k[xx, xmin:xmax] = w
    k = np.where(k < 0, np.trunc(-0.5 + k * (1 << 22)), np.trunc(0.5 + k * (1 << 22))) / (1 << 22)
    if box == 1:
        return k
    pool = np.zeros((mid, in_size), np.float64)
    for j in range(mid):
        lo, hi = j * box, min(j * box + box, in_size)
        pool[j, lo:hi] = 1.0 / (hi - lo)
    return k @ pool


def _round8(x: np.ndarray) -> np.ndarray:
    """Pillow's clip8 after adding half: floor(x + 0.5) clipped to 0..255."""
    return np.clip(np.floor(x + 0.5), 0, 255)


def resize_reference(image: np.ndarray, size: int, box: int = 1) -> np.ndarray:
    """(H,W,3) uint8 -> (size,size,3) uint8 in numpy, the arithmetic the device runs:
    horizontal pass, round, vertical pass, round (Pillow's order). With ``box=1`` it equals
    ``Image.resize((size, size), BILINEAR)`` (tests/test_gpu_decode.py checks it)."""
    h, w = image.shape[:2]
    wx, wy = pil_weights(w, size, box), pil_weights(h, size, box)
    tmp = _round8(np.einsum("hwc,sw->hsc", image.astype(np.float64), wx))
    return _round8(np.einsum("hsc,th->tsc", tmp, wy)).astype(np.uint8)


# ----------------------------------------------------------------------------- the decoder


def _read(path: str) -> bytearray | None:
    """The file's bytes, or None when the CPU path should look at it (it names the reason)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None  # a FIFO would block, an empty file has nothing: the CPU path says which
        data = bytearray(st.st_size)
        with open(path, "rb") as f:
            got = f.readinto(data)
        return data if got == st.st_size else None
    except OSError:
        return None


def decode_or_none(decode: Any, encoded: list[Any]) -> list[Any | None]:
    """``decode(encoded)``; when the batch call fails, each file alone, None for those it rejects."""
    try:
        return list(decode(encoded))
    except RuntimeError:
        out: list[Any | None] = []
        for e in encoded:
            try:
                out.append(decode([e])[0])
            except RuntimeError:
                out.append(None)
        return out


def route_and_decode(
    paths: Sequence[str], rows: Sequence[int], size: int, datas: Sequence[bytearray | None], decode: Any
) -> tuple[dict[int, Any], dict[int, np.ndarray], list[tuple[int, str]], list[tuple[str, str]]]:
    """One batch's routing: what the device decodes, what the CPU path decodes one by one, what fails.

    ``datas[k]`` is file k's bytes (None: unreadable, the CPU path names why); ``decode``
    turns a list of them into (3,H,W) images, raising RuntimeError when it cannot. Returns
    (device images by position, CPU (size,size,3) uint8 arrays by position, [(row, reason)]
    of files neither could decode, [(path, why it left the device)]).
    """
    on_device: list[int] = []
    to_cpu: list[tuple[int, str]] = []
    for k, d in enumerate(datas):
        why = "unreadable" if d is None else jpeg_problem(d)
        (to_cpu.append((k, why)) if why else on_device.append(k))
    decoded: dict[int, Any] = {}
    if on_device:
        for k, t in zip(on_device, decode_or_none(decode, [datas[k] for k in on_device]), strict=True):
            shape: tuple[int, ...] = tuple(getattr(t, "shape", ()))
            if len(shape) != 3 or shape[0] != 3:
                to_cpu.append((k, "rejected by the GPU decoder"))
            else:
                decoded[k] = t
    host: dict[int, np.ndarray] = {}
    failed: list[tuple[int, str]] = []
    fallbacks: list[tuple[str, str]] = []
    for k, why in sorted(to_cpu):
        try:
            host[k] = images.load(paths[k], size)
            fallbacks.append((paths[k], why))
        except images.ImageLoadError as e:
            failed.append((rows[k], str(e)))
    return decoded, host, failed, fallbacks


# Decode processes per run. 0 decodes on a thread of the extracting process; N > 0 runs N processes,
# each with its own GIL and nvJPEG handle, handing batches over as CUDA IPC tensors. Measured on an
# H100 (BENCHMARKS.md section 11): 4 processes decode fast enough for 15.5k img/s steady at 150 px
# against 5.9k with the thread, but start about 11 s later (spawn, torch import, CUDA and nvJPEG
# set-up), so they pay off from about 110,000 images.
PROCESSES = 4
PROCESSES_FROM_IMAGES = 100_000
WORKERS: int | None = None  # a number forces it for every run (benchmarks, tests); None: processes_for


def processes_for(n_images: int) -> int:
    """Decode processes for a run of ``n_images`` images: ``PROCESSES`` for large runs, else 0."""
    if WORKERS is not None:
        return WORKERS
    return PROCESSES if n_images >= PROCESSES_FROM_IMAGES else 0


def _decode_worker(factory: Any, tasks: Any, results: Any) -> None:
    """A decode process: ``factory()`` builds its decoder; each job (index, paths, rows, size) is
    answered with ("batch", index, images, rows, failed); "stats" with its counts; None ends it.
    The process lives until the pool closes: the CUDA memory it sent stays valid until then."""
    try:
        import torch.multiprocessing  # noqa: F401  (CUDA tensors go through the queue as IPC handles)
    except ImportError:  # a stand-in decoder (tests) sends numpy
        pass
    try:
        decoder = factory()
        ready = getattr(decoder, "ready", None)
        if ready is not None:  # nvJPEG's and cuBLAS's first calls, while the model builds
            ready()
    except BaseException as e:
        results.put(("error", -1, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", os.getpid()))
    while True:
        job = tasks.get()
        if job is None:
            return
        if job == "stats":
            results.put(("stats", decoder.counts, decoder.fallbacks, decoder.timings))
            continue
        index, paths, rows, size = job
        try:
            batch = decoder.decode_paths(paths, rows, size)
            results.put(("batch", index, batch.images, batch.rows, batch.failed))
        except BaseException as e:
            results.put(("error", index, f"{type(e).__name__}: {e}"))


class _WorkerPool:
    """Spawned decode processes, started at once (their start overlaps the model build), fed
    batches round robin and read back in order, so rows keep their order."""

    def __init__(self, n: int, factory: Any, depth: int = 2):
        try:
            import torch.multiprocessing  # noqa: F401  (receives the CUDA tensors as IPC handles)
        except ImportError:
            pass
        ctx = multiprocessing.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.results = [ctx.Queue(maxsize=depth) for _ in range(n)]
        self.procs = [
            ctx.Process(target=_decode_worker, args=(factory, t, r), daemon=True, name=f"gpu-decode-{w}")
            for w, (t, r) in enumerate(zip(self.tasks, self.results, strict=True))
        ]
        for proc in self.procs:
            proc.start()
        self.broken = self.closed = False

    def _get(self, w: int) -> Any:
        while True:
            try:
                msg = self.results[w].get(timeout=1.0)
                if msg[0] != "ready":  # each process says so once, after its warm-up
                    return msg
            except queue.Empty:
                if not self.procs[w].is_alive():
                    self.broken = True
                    raise RuntimeError(f"GPU decode process {w} exited (code {self.procs[w].exitcode})") from None

    def run(self, jobs: list[tuple[list[str], list[int], int]]) -> Iterator[images.Batch]:
        if self.broken:
            raise RuntimeError("a GPU decode process failed earlier in this run")
        n = len(self.procs)
        for j, (paths, rows, size) in enumerate(jobs):
            self.tasks[j % n].put((j, paths, rows, size))
        done = False
        try:
            for j in range(len(jobs)):
                msg = self._get(j % n)
                if msg[0] == "error":
                    self.broken = True
                    raise RuntimeError(f"GPU decode process failed on batch {msg[1]}: {msg[2]}")
                _, index, imgs, rows_ok, failed = msg
                assert index == j, (index, j)
                yield images.Batch(imgs, rows_ok, failed)
            done = True
        finally:
            if not done:  # results of this call may still arrive: the processes cannot be reused
                self.broken = True

    def close(self) -> list[tuple[dict[str, int], list[tuple[str, str]], dict[str, float]]]:
        """Each process's counts, fallbacks and timings (when the pool is intact), then stop them."""
        stats: list[tuple[dict[str, int], list[tuple[str, str]], dict[str, float]]] = []
        if self.closed:
            return stats
        self.closed = True
        try:
            if not self.broken:
                for w, tasks in enumerate(self.tasks):
                    tasks.put("stats")
                    msg = self._get(w)
                    if msg[0] == "stats":
                        stats.append((msg[1], msg[2], msg[3]))
        finally:
            for tasks in self.tasks:
                tasks.put(None)
            for proc in self.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
        return stats


class GpuDecoder:
    """Decodes file paths on a CUDA device ahead of the model; one per run, reused across splits.

    ``batches`` has ``images.Decoder.batches``'s contract, except that ``Batch.images`` is a
    (B,S,S,3) uint8 torch tensor on the device. Items that are not file paths (arrays,
    augmented views) go through ``cpu`` whole. ``counts`` says how many images each path took.
    ``decode`` stands in for torchvision's batched ``decode_jpeg`` (tests).
    """

    def __init__(
        self,
        device: str = "cuda",
        readers: int = 8,
        cpu: images.Decoder | None = None,
        draft: bool = True,
        decode: Any = None,
        workers: int | None = None,
        factory: Any = None,
    ):
        import torch

        self.torch = torch
        self.workers = (WORKERS or 0) if workers is None else workers
        self._pool = (
            _WorkerPool(self.workers, factory or functools.partial(GpuDecoder, device, readers, None, draft, workers=0))
            if self.workers
            else None
        )
        if self._pool is not None:  # processes stop when the decoder goes away, even if never entered
            weakref.finalize(self, self._pool.close)
        self.device = torch.device(device)
        self.draft = draft
        self.cpu = cpu or images.Decoder(threads=2)
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="jpeg-read")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._weights: dict[tuple[int, int, int], Any] = {}
        self._decode = decode or self._torchvision_decode
        self.counts = {"gpu": 0, "cpu fallback": 0, "failed": 0}
        # seconds on the decode thread: where a GPU-decoded batch's time goes (bench/bench_gpu.py prints it)
        self.timings = {"waiting for reads": 0.0, "nvJPEG decode": 0.0, "routing + resize launch": 0.0, "sync": 0.0}
        self.fallbacks: list[tuple[str, str]] = []  # (path, why it left the device), for the record
        self._warming: threading.Thread | None = None
        if self._pool is None and decode is None and self.device.type == "cuda":
            self._warming = threading.Thread(target=self._warm_up_quietly, name="gpu-decode-warm-up", daemon=True)
            self._warming.start()

    def ready(self) -> None:
        """Return once the warm-up started with the decoder is over."""
        if self._warming is not None:
            self._warming.join()

    def _warm_up_quietly(self) -> None:
        try:
            self.warm_up()
        except Exception:  # pragma: no cover - the first batch meets the same problem and reports it
            pass

    def __enter__(self) -> GpuDecoder:
        return self

    def warm_up(self) -> None:
        """Decode and resize one small JPEG: the first nvJPEG and cuBLAS calls of a process take
        seconds, paid here, while the model builds, rather than in the first batch."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, format="JPEG")
        tensor = self.torch.frombuffer(bytearray(buf.getvalue()), dtype=self.torch.uint8)
        self.resize(self._decode([tensor]), 32)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            stats = self._pool.close()
            for counts, fallbacks, timings in stats:
                for name, n in counts.items():
                    self.counts[name] += n
                for name, seconds in timings.items():
                    self.timings[name] += seconds
                self.fallbacks += fallbacks
        self._readers.shutdown(cancel_futures=True)
        self.cpu.__exit__(*exc)

    # -- decoding
    def _torchvision_decode(self, encoded: list[Any]) -> list[Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))

    def _matrix(self, n: int, size: int, box: int) -> Any:
        """(n, size) float64 on the device: float64 makes every product and sum exact, so the
        device computes Pillow's fixed-point arithmetic bit for bit (float32 missed by 1 on ~1%)."""
        key = (n, size, box)
        if key not in self._weights:
            self._weights[key] = self.torch.from_numpy(np.ascontiguousarray(pil_weights(n, size, box).T)).to(
                self.device
            )
        return self._weights[key]

    def resize(self, decoded: Sequence[Any], size: int) -> Any:
        """(3,H,W) uint8 tensors -> (B,size,size,3) uint8: horizontal then vertical matrix
        product, rounding after each (Pillow's order). Images of one shape go together (a few
        kernels per shape); with many shapes they are padded into one batch instead."""
        torch = self.torch
        groups: dict[tuple[int, int], list[int]] = {}
        for k, t in enumerate(decoded):
            groups.setdefault((int(t.shape[1]), int(t.shape[2])), []).append(k)
        if len(groups) > 8:
            return self._resize_padded(decoded, size)
        outs, order = [], []
        for (h, w), ks in groups.items():
            box = draft_scale(w, h, size) if self.draft else 1
            x = torch.stack([decoded[k] for k in ks]).to(torch.float64)  # (g,3,h,w)
            tmp = torch.matmul(x, self._matrix(w, size, box)).add_(0.5).floor_().clamp_(0, 255)  # (g,3,h,size)
            out = torch.matmul(self._matrix(h, size, box).T, tmp).add_(0.5).floor_().clamp_(0, 255)  # (g,3,s,s)
            outs.append(out.to(torch.uint8))
            order += ks
        res = torch.cat(outs) if len(outs) > 1 else outs[0]
        if order != sorted(order):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            res = res.index_select(0, inverse.to(self.device))
        return res.permute(0, 2, 3, 1).contiguous()

    def _resize_padded(self, decoded: Sequence[Any], size: int) -> Any:
        """``resize`` for batches of many shapes: zero-padded into one batch, batched products."""
        torch = self.torch
        from torch.nn.utils.rnn import pad_sequence

        n = len(decoded)
        hmax = max(int(t.shape[1]) for t in decoded)
        wmax = max(int(t.shape[2]) for t in decoded)
        buf = torch.zeros((n, 3, hmax, wmax), dtype=torch.float64, device=self.device)
        wx, wy = [], []
        for k, t in enumerate(decoded):
            h, w = int(t.shape[1]), int(t.shape[2])
            buf[k, :, :h, :w] = t
            box = draft_scale(w, h, size) if self.draft else 1
            wx.append(self._matrix(w, size, box))  # (w, size)
            wy.append(self._matrix(h, size, box))  # (h, size)
        mx = pad_sequence(wx, batch_first=True)  # (n, wmax, size), zero rows for padding
        my = pad_sequence(wy, batch_first=True).transpose(1, 2)  # (n, size, hmax)
        tmp = torch.bmm(buf.view(n, 3 * hmax, wmax), mx).add_(0.5).floor_().clamp_(0, 255)
        out = torch.matmul(my.unsqueeze(1), tmp.view(n, 3, hmax, size)).add_(0.5).floor_().clamp_(0, 255)
        return out.permute(0, 2, 3, 1).to(torch.uint8).contiguous()

    def _batch(self, paths: list[str], rows: list[int], size: int, reads: Iterator[bytearray | None]) -> images.Batch:
        """One batch: read, route, decode on the device, fall back one by one, resize, in row order.
        ``reads`` yields the files' bytes (read ahead on the reader threads)."""
        torch = self.torch
        t0 = time.perf_counter()
        datas = list(reads)
        t1 = time.perf_counter()

        def decode(ds: list[bytearray]) -> list[Any]:
            t = time.perf_counter()
            try:
                return self._decode([torch.frombuffer(d, dtype=torch.uint8) for d in ds])
            finally:
                self.timings["nvJPEG decode"] += time.perf_counter() - t

        decoded, host, failed, fallbacks = route_and_decode(paths, rows, size, datas, decode)
        self.timings["waiting for reads"] += t1 - t0
        self.fallbacks += fallbacks
        self.counts["gpu"] += len(decoded)
        self.counts["cpu fallback"] += len(host)
        self.counts["failed"] += len(failed)
        ok = sorted([*decoded, *host])
        rows_ok = np.array([rows[k] for k in ok], np.int64)
        if not host and decoded:  # the usual case: every image decoded on the device, already in order
            return images.Batch(self.resize(list(decoded.values()), size), rows_ok, failed)
        position = {k: j for j, k in enumerate(ok)}
        out = torch.empty((len(ok), size, size, 3), dtype=torch.uint8, device=self.device)
        for part, made in (
            (decoded, lambda: self.resize(list(decoded.values()), size)),
            (host, lambda: torch.from_numpy(np.stack(list(host.values()))).to(self.device)),
        ):
            if part:
                where = torch.tensor([position[k] for k in part], device=self.device)
                out.index_copy_(0, where, made())
        return images.Batch(out, rows_ok, failed)

    def decode_paths(
        self, paths: list[str], rows: list[int], size: int, reads: Iterator[bytearray | None] | None = None
    ) -> images.Batch:
        """One batch of files, complete on the device when it returns (own CUDA stream, synchronised)."""
        torch = self.torch
        if reads is None:
            reads = self._readers.map(_read, paths)
        before = self.timings["waiting for reads"] + self.timings["nvJPEG decode"]
        t = time.perf_counter()
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                batch = self._batch(paths, rows, size, reads)
        else:
            batch = self._batch(paths, rows, size, reads)
        t1 = time.perf_counter()
        if self._stream is not None:
            self._stream.synchronize()
        after = self.timings["waiting for reads"] + self.timings["nvJPEG decode"]
        self.timings["routing + resize launch"] += t1 - t - (after - before)
        self.timings["sync"] += time.perf_counter() - t1
        return batch

    def batches(
        self,
        items: Sequence[Any],
        rows: Sequence[int],
        size: int,
        batch_size: int,
        prefetch_batches: int = 2,
    ) -> Iterator[images.Batch]:
        """Decoded ``items[rows]`` in order, ``prefetch_batches`` batches ahead of the consumer,
        made on a thread of their own (and a CUDA stream of their own) so decoding overlaps
        the forward pass. Each batch is complete on the device before it is handed over."""
        rows = list(rows)
        if not rows:
            return
        if not all(isinstance(items[i], str) for i in rows):
            yield from self.cpu.batches(items, rows, size, batch_size, prefetch_batches)
            return
        if self._pool is not None:
            parts = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
            yield from self._pool.run([([items[i] for i in part], part, size) for part in parts])
            return
        out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=prefetch_batches)
        stop = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                self.ready()
                starts = list(range(0, len(rows), batch_size))

                def paths_of(start: int) -> list[str]:
                    return [items[i] for i in rows[start : start + batch_size]]

                reads = self._readers.map(_read, paths_of(starts[0]))
                for j, start in enumerate(starts):
                    if stop.is_set():
                        return
                    part = rows[start : start + batch_size]
                    current = reads
                    if j + 1 < len(starts):  # the next batch's files are read while this one decodes
                        reads = self._readers.map(_read, paths_of(starts[j + 1]))
                    put(("batch", self.decode_paths(paths_of(start), part, size, current)))
                put(("end", None))
            except BaseException as e:  # handed to the consumer, raised there
                put(("error", e))

        worker = threading.Thread(target=produce, name="gpu-decode", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            worker.join()
