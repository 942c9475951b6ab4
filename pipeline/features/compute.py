"""The forward-pass loop of stage one: decode, run the backbone, save resumable chunks.

``compute`` starts decoding, builds the model once and runs it as a compiled call on the
decoded batches (``overlap``: decoding, the forward pass and the bookkeeping at the same
time), and hands every chunk to a background writer the moment its last row is done, so
an interrupted run resumes from its finished chunks. Writing the cache file is ``commit``'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.core import lean
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError
from pipeline.features import (
    backbone,
    compiled,
    device_forward,
    gpu_decode,
    images,
    layout,
    overlap,
    quantize,
    tta_views,
)
from pipeline.features.delta import Delta
from pipeline.features.result import ExtractResult
from pipeline.features.weights import verify_weights

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class Computed:
    """What ``compute`` leaves for ``commit``: the chunks on disk as blocks per split."""

    chunks: store.ChunkStore | None  # None when nothing was computed (every row reused)
    blocks: dict[str, list[store.Block]]
    feature_shape: tuple[int, ...]
    weights_sha256: str

    def discard(self) -> None:
        """Delete the chunk folder once the cache holding its rows is complete."""
        if self.chunks is not None:
            self.chunks.discard()


def compute(
    p: layout.Plan,
    delta: Delta,
    todo: dict[str, list[int]],
    target: Path,
    old: store.CacheMeta | None,
    progress: Progress | None,
    result: ExtractResult,
) -> Computed:
    """Run the backbone over ``todo`` (item indices per split) into resumable chunks next to
    ``target``; counts and timings go into ``result``.

    With the CPU decoder the base runs as one compiled call (``compiled``) fed by the
    overlapped pipeline (``overlap``): when there is nothing to resume, every row starts
    decoding before Keras is even imported. The GPU decoder runs on this thread (its batches
    live on the device); under JAX, one batch is queued ahead on the device (``device_forward``)."""
    if not any(todo.values()):
        if old is None:
            raise CacheError(f"internal: nothing to compute for {target} and no cache to reuse")
        result.int8 = old.info.get("int8")
        return Computed(None, {}, tuple(old.feature_shape), old.weights_sha256)
    cfg = p.cfg
    assert cfg.size is not None
    gpu = cfg.decoder == "gpu"
    cpu_decoder = images.Decoder(cfg.decode_threads, cfg.decode_processes)
    # made before the model: GPU decode processes start (and warm up) while it builds
    workers = gpu_decode.processes_for(sum(map(len, todo.values())))
    decoder = gpu_decode.GpuDecoder(cpu=cpu_decoder, workers=workers) if gpu else cpu_decoder
    with decoder, overlap.Pipeline(decoder, cfg.size, cfg.batch_size, threaded=not gpu) as pipe:
        if not gpu and not store.ChunkStore.folder(target).exists():  # nothing to resume: all rows are work
            pipe.feed(_work(delta, todo, cfg.chunk_size, None, result))
        model, weights_sha256 = _build_model(p, old, result)
        chunks = _chunk_store(p, delta, todo, target, weights_sha256, result)
        work = _work(delta, todo, cfg.chunk_size, chunks, result)
        if pipe.fed is None:
            pipe.feed(work)
        elif pipe.fed != work:
            raise CacheError(f"internal: the rows decoded ahead for {target} are not the rows to compute")
        t0 = time.perf_counter()
        if gpu:  # device batches; under JAX the next one is queued before the last one's features return
            queued = device_forward.queued_for(model, cfg.batch_size) if device_forward.queues_ahead() else None
            pipe.start(lambda x: device_forward.forward(model, x, cfg.batch_size), queued=queued)
        else:
            model = compiled.CompiledForward(model, cfg.batch_size)
            pipe.start(lambda x: backbone.forward(model, x, cfg.batch_size))
        feature_shape = tuple(int(d) for d in model.output_shape[1:])
        _collect(cfg, p.source.name, pipe, feature_shape, chunks, todo, work, progress, result)
        result.warmup_seconds, result.warmup_images = pipe.warmup_seconds, pipe.warmup_images
        result.timings.update(pipe.timings)
    blocks = {
        split: chunks.blocks(split, math.ceil(len(rows) / cfg.chunk_size)) for split, rows in todo.items() if rows
    }
    result.seconds = time.perf_counter() - t0
    if isinstance(decoder, gpu_decode.GpuDecoder):
        result.decode = {"decoder": "gpu", **decoder.counts, "fallbacks": decoder.fallbacks[:100]}
    return Computed(chunks, blocks, feature_shape, weights_sha256)


def _work(
    delta: Delta,
    todo: dict[str, list[int]],
    chunk: int,
    chunks: store.ChunkStore | None,
    result: ExtractResult,
) -> list[overlap.Work]:
    """The rows of every split's chunks not finished yet (all of them when ``chunks`` is None,
    before the chunk folder exists), in order; finished chunks are counted in ``result``."""
    work = []
    for split, rows_todo in todo.items():
        if not rows_todo:
            continue
        n_chunks = math.ceil(len(rows_todo) / chunk)
        pending = [c for c in range(n_chunks) if chunks is None or not chunks.done(split, c)]
        if chunks is not None:
            result.resumed_chunks += n_chunks - len(pending)
        rows = [rows_todo[j] for c in pending for j in range(c * chunk, min((c + 1) * chunk, len(rows_todo)))]
        work.append(overlap.Work(split, delta.items[split], rows))
    return work


def _build_model(p: layout.Plan, old: store.CacheMeta | None, result: ExtractResult) -> tuple[Any, str]:
    """The backbone (or its int8 OpenVINO engine) and the hash of its float weights, checked
    against the cache's when rows are added to one."""
    keras = lean.import_keras()
    cfg = p.cfg
    assert cfg.size is not None and cfg.layer is not None
    t_build = time.perf_counter()
    int8 = cfg.precision == "int8"  # OpenVINO quantises the float32 base (pipeline.features.quantize)
    model = backbone.build(
        cfg.backbone, size=cfg.size, layer=cfg.layer, weights=p.weights, precision="float32" if int8 else cfg.precision
    )
    log.info(
        "built %s (%s weights, %s, Keras backend %s) in %.1f s",
        model.name,
        p.weights.id,
        cfg.precision,
        keras.backend.backend(),
        time.perf_counter() - t_build,
    )
    if old is not None:  # the rows we add must come from the same weights as the rows we keep
        verify_weights(model.base_weights_sha256, old.weights_sha256, str(p.path))
    weights_sha256 = model.base_weights_sha256
    if int8:
        model = int8_engine(p, model, old)
        result.int8 = quantize.summary(model.record)
    return model, weights_sha256


def int8_engine(p: layout.Plan, model: Any, old: store.CacheMeta | None) -> quantize.OpenVINOEngine:
    """The quantised model of the cache: the one an existing cache recorded, else kept or new."""
    recorded = old.info.get("int8") if old is not None else None
    if old is not None and not recorded:
        raise CacheError(f"{p.path} holds int8 features but does not name its quantised model; rebuild with --force")
    assert p.cfg.size is not None
    return quantize.engine_for(
        p.path,
        model,
        source=p.source,
        size=p.cfg.size,
        seed=p.cfg.seed,
        decode=(p.cfg.decode_threads, p.cfg.decode_processes),
        recorded=recorded,
        batch_size=p.cfg.batch_size,
        quiet=p.cfg.quiet,
    )


def _chunk_store(
    p: layout.Plan,
    delta: Delta,
    todo: dict[str, list[int]],
    target: Path,
    weights_sha256: str,
    result: ExtractResult,
) -> store.ChunkStore:
    """The chunk folder of this work: chunks left by an interrupted run are reused only when
    everything they depend on (identity, weights, chunking, seeds, the work itself) is the same."""
    cfg = p.cfg
    return store.ChunkStore(
        target,
        {
            **dataclasses.asdict(p.key),
            "weights_sha256": weights_sha256,
            "int8_model_sha256": (result.int8 or {}).get("model_sha256"),
            "chunk_size": cfg.chunk_size,
            "seed": cfg.seed,
            "view_seed": delta.view_seed,
            "augment_policy": images.AUGMENT_POLICY,
            **({"tta_seed": delta.tta_seed, "tta_policy": tta_views.POLICY} if delta.tta else {}),
            "todo": hashlib.sha256(json.dumps(todo).encode()).hexdigest(),
            "work": delta.todo_hash,
            "fingerprint": p.key.fingerprint,
        },
    )


def _collect(
    cfg: ExtractConfig,
    desc: str,
    pipe: overlap.Pipeline,
    feature_shape: tuple[int, ...],
    chunks: store.ChunkStore,
    todo: dict[str, list[int]],
    work: list[overlap.Work],
    progress: Progress | None,
    result: ExtractResult,
) -> None:
    """Every split's features from the pipeline into chunks, each saved the moment its last
    row is done (while the model runs the next batch), with one progress bar for the run.

    Chunk c holds positions c*chunk_size.. of the split's rows to compute (``todo``, in
    order), so chunks mean the same thing in a resumed run."""
    from tqdm.auto import tqdm

    total = sum(len(v) for v in todo.values())
    with (
        ChunkWriter(chunks) as writer,
        tqdm(total=total, desc=desc, unit="img", disable=cfg.quiet, file=sys.stderr, dynamic_ncols=True) as bar,
    ):

        def advance(done: int) -> None:
            bar.update(done)
            if progress is not None and done:
                progress(done)

        steady_from: float | None = None  # the end of the warm-up batch: the steady rate's clock starts
        for w in work:
            rows_todo = todo[w.split]
            advance(len(rows_todo) - len(w.rows))  # rows of chunks an earlier run finished
            open_chunks = _OpenChunks(w.split, rows_todo, cfg.chunk_size, feature_shape, cfg.dtype)
            for batch, feats in pipe.results(w.split):
                t0 = time.perf_counter()
                if steady_from is None and feats is not None:
                    steady_from = t0
                open_chunks.add(batch, feats, writer)
                result.timings["saving chunks"] += time.perf_counter() - t0
                result.images += len(batch.rows)
                advance(len(batch.rows) + len(batch.failed))
        if steady_from is not None:
            result.steady_seconds = time.perf_counter() - steady_from
        result.writer_seconds = writer.seconds


class _OpenChunks:
    """Rows of the chunks of one split still being filled; a chunk is saved once complete."""

    def __init__(
        self, split: str, rows_todo: list[int], chunk: int, feature_shape: tuple[int, ...], dtype: str
    ) -> None:
        self.split, self.n_todo, self.chunk = split, len(rows_todo), chunk
        self.position = {item: j for j, item in enumerate(rows_todo)}
        self.feature_shape, self.dtype = tuple(feature_shape), dtype
        self.open: dict[int, dict[str, list]] = {}

    def add(self, batch: Any, feats: np.ndarray | None, writer: ChunkWriter) -> None:
        """File the batch's rows (and failures) under their chunks; save every chunk now complete."""
        ok_chunk = np.array([self.position[int(i)] // self.chunk for i in batch.rows], np.int64)
        failed_chunk = [self.position[i] // self.chunk for i, _ in batch.failed]
        for c in sorted(set(ok_chunk.tolist()) | set(failed_chunk)):
            acc = self.open.setdefault(int(c), {"features": [], "rows": [], "failed": []})
            mine = ok_chunk == c
            if mine.all():  # the usual case: the whole batch in one chunk, no copy
                assert feats is not None
                acc["features"].append(feats)
                acc["rows"].append(np.asarray(batch.rows))
            elif mine.any():
                assert feats is not None
                acc["features"].append(feats[mine])
                acc["rows"].append(np.asarray(batch.rows)[mine])
            acc["failed"] += [
                (i, reason) for (i, reason), fc in zip(batch.failed, failed_chunk, strict=True) if fc == c
            ]
            expected_rows = min((c + 1) * self.chunk, self.n_todo) - c * self.chunk
            if sum(len(r) for r in acc["rows"]) + len(acc["failed"]) == expected_rows:
                self._save(int(c), acc, writer)

    def _save(self, c: int, acc: dict[str, list], writer: ChunkWriter) -> None:
        features = (
            (acc["features"][0] if len(acc["features"]) == 1 else np.concatenate(acc["features"]))
            if acc["features"]
            else np.zeros((0, *self.feature_shape), np.float32)
        )
        writer.save(
            self.split,
            c,
            features.astype(self.dtype, copy=False),
            np.concatenate(acc["rows"]) if acc["rows"] else np.zeros(0, np.int64),
            np.array([i for i, _ in acc["failed"]], np.int64),
            [r for _, r in acc["failed"]],
        )
        del self.open[c]


class ChunkWriter:
    """Saves finished chunks on a background thread so the model never waits for the disk.

    At most ``depth`` saves are queued (memory stays bounded); the first error raised by a
    save is raised again in the caller, and leaving the context waits for every save.
    """

    def __init__(self, chunks: store.ChunkStore, depth: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.chunks, self.depth = chunks, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
        self.pending: list[Any] = []
        self.seconds = 0.0  # time spent saving, on the writer's thread

    def save(self, *args: Any) -> None:
        self.pending.append(self.pool.submit(self._save, *args))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.pop(0).result()

    def _save(self, *args: Any) -> None:
        t = time.perf_counter()
        self.chunks.save(*args)
        self.seconds += time.perf_counter() - t

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()
