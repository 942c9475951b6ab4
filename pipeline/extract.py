"""Stage one: run the frozen backbone once over every image and cache the features.

Decides what is already done (cache hit, or finished chunks of an interrupted run),
runs the rest in batches with decoding overlapped, and hands rows to the store.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import backbone, images, layout, registry, sources, store
from .config import ExtractConfig, as_dict
from .errors import CacheError, ConfigError
from .provenance import versions

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What a run of stage one did; ``summary()`` is the closing line the CLI prints."""

    path: Path
    hit: bool
    images: int = 0  # images sent through the backbone in this run
    skipped: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    gflop_per_image: float = 0.0
    resumed_chunks: int = 0
    warmup_seconds: float = 0.0  # the first forward pass: graph tracing and kernel set-up, paid once
    warmup_images: int = 0
    timings: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"waiting for decode": 0.0, "forward pass": 0.0, "saving chunks": 0.0})

    @property
    def steady_rate(self) -> float:
        """Images/s after the one-time warm-up: what a long run approaches."""
        seconds = self.seconds - self.warmup_seconds
        return (self.images - self.warmup_images) / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        size_mb = self.path.stat().st_size / 1e6 if self.path.exists() else 0.0
        if self.hit:
            return f"cache hit: {self.path} ({size_mb:.1f} MB) matches the inputs and options; nothing to do"
        rate = self.images / self.seconds if self.seconds else 0.0
        n_skipped = sum(len(v) for v in self.skipped.values())
        lines = [f"wrote {self.path}",
                 f"  {self.images} images in {self.seconds:.1f} s: {rate:.1f} images/s overall, "
                 f"{self.steady_rate:.1f} images/s"
                 + (f" ({self.steady_rate * self.gflop_per_image:.0f} GFLOP/s)" if self.gflop_per_image else "")
                 + " after "
                 f"a {self.warmup_seconds:.1f} s warm-up; cache {size_mb:.1f} MB on disk"
                 + (f"; resumed after {self.resumed_chunks} finished chunk(s)" if self.resumed_chunks else ""),
                 "  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
                 + f", warm-up {self.warmup_seconds:.1f} s"]
        if n_skipped:
            lines.append(f"  {n_skipped} file(s) skipped (recorded in the cache under <split>/skipped):")
            lines += [f"    {images.printable(p)}" + (f" (view {split})" if "@" in split else "") + f": {reason}"
                      for split, items in self.skipped.items() for p, reason in items]
        return "\n".join(lines)


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Make (or find) the cache for ``cfg``; ``layout.cache_path`` says where it lands."""
    p = layout.plan(cfg)
    for note in p.source.notes:
        log.info(note)
    layout.check_writable(p.path.parent, "cache folder")
    reuse = None
    if p.path.exists() and not p.cfg.force:
        meta = store.read_meta(p.path)
        diffs = meta.key().diff(p.key)
        if diffs:
            raise CacheError(f"{p.path} exists but was made differently ({'; '.join(diffs)}). "
                             "Rebuild it with --force (make extract FORCE=1): the old file is replaced "
                             "only once the new one is complete")
        have = (meta.augment or {}).get("views", 0)
        if have >= p.cfg.augment:
            return ExtractResult(p.path, hit=True)
        if have and meta.augment and meta.augment.get("seed") != p.cfg.seed:
            raise CacheError(f"{p.path} holds {have} views made with seed {meta.augment['seed']}; more views "
                             f"with seed {p.cfg.seed} would mix two policies. Use SEED={meta.augment['seed']}, "
                             "or rebuild with --force")
        reuse = meta  # keep what the file has; compute only the missing views
    if p.cfg.strict:  # before the lock: a refused run leaves nothing behind, not even a lock file
        _check_all_readable(p.source)
    with store.writer_lock(p.path):
        return _run(p, reuse)


def _check_all_readable(source: sources.Source) -> None:
    if source.root is None:
        return
    bad = [(images.printable(p), reason) for s in source.splits.values() for p in s.paths
           if (reason := images.check_readable(str(source.root / p))) is not None]
    if bad:
        listing = "\n".join(f"  {p}: {reason}" for p, reason in bad)
        raise ConfigError(f"--strict: {len(bad)} file(s) under {source.root} cannot be used; nothing was written. "
                          f"Fix or remove them, or run without --strict to skip them:\n{listing}")


def view_split(k: int) -> str:
    """Name of the split holding the k-th augmented view (1-based) of every train image."""
    return f"train@aug{k}"


def _jobs(cfg: ExtractConfig, source: sources.Source, reuse: store.CacheMeta | None) -> dict[str, tuple[Any, sources.Split]]:
    """What to compute: split name -> (decoder items, the split's paths and labels)."""
    jobs: dict[str, tuple[Any, sources.Split]] = {}
    if reuse is None:
        jobs = {s: (source.items(s), items) for s, items in source.splits.items()}
    if cfg.augment:
        if "train" not in source.splits:
            raise ConfigError(f"AUGMENT={cfg.augment} makes views of the train split, and {cfg.data} has none")
        train = source.items("train")
        first = 1 + ((reuse.augment or {}).get("views", 0) if reuse else 0)
        for k in range(first, cfg.augment + 1):
            jobs[view_split(k)] = ([(item, (cfg.seed, k, i)) for i, item in enumerate(train)], source.splits["train"])
    return jobs


def _run(p: layout.Plan, reuse: store.CacheMeta | None = None) -> ExtractResult:
    import keras
    from tqdm.auto import tqdm

    cfg, source = p.cfg, p.source
    assert cfg.size is not None and cfg.layer is not None
    t_build = time.perf_counter()
    model = backbone.build(cfg.backbone, size=cfg.size, layer=cfg.layer, weights=p.weights, precision=cfg.precision)
    log.info("built %s (%s weights, %s, Keras backend %s) in %.1f s", model.name, p.weights.id, cfg.precision,
             keras.backend.backend(), time.perf_counter() - t_build)
    if reuse is not None:  # the views we add must come from the same weights as the rows we keep
        from .weights import verify_weights

        verify_weights(model.base_weights_sha256, reuse.weights_sha256, str(p.path))
    feature_shape = tuple(int(d) for d in model.output_shape[1:])
    chunks = store.ChunkStore(p.path, {**dataclasses.asdict(p.key), "weights_sha256": model.base_weights_sha256,
                                       "chunk_size": cfg.chunk_size, "seed": cfg.seed,
                                       "augment_policy": images.AUGMENT_POLICY})
    flops = registry.flops_per_image(cfg.size, cfg.layer, cfg.backbone)
    result = ExtractResult(p.path, hit=False, gflop_per_image=flops / 1e9 if flops else 0.0)
    layout_: dict[str, tuple[int, list[str], np.ndarray]] = {}
    t0 = time.perf_counter()
    decoder = images.Decoder(cfg.decode_threads, cfg.decode_processes)
    writer = ChunkWriter(chunks)
    with decoder, writer:
        for split, (decoder_items, items) in _jobs(cfg, source, reuse).items():
            n_chunks = math.ceil(len(items) / cfg.chunk_size)
            layout_[split] = (n_chunks, items.paths, items.labels)
            todo = [c for c in range(n_chunks) if not chunks.done(split, c)]
            result.resumed_chunks += n_chunks - len(todo)
            rows = [r for c in todo for r in range(c * cfg.chunk_size, min((c + 1) * cfg.chunk_size, len(items)))]
            with tqdm(total=len(items), initial=len(items) - len(rows), desc=f"{source.name}/{split}", unit="img",
                      disable=cfg.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
                result.images += _run_split(cfg, model, decoder, decoder_items, split, rows, writer, len(items), bar,
                                            result)
    result.seconds = time.perf_counter() - t0
    views = max(cfg.augment, (reuse.augment or {}).get("views", 0) if reuse else 0)
    augment = ({"views": views, "seed": cfg.seed, "policy": images.AUGMENT_POLICY,
                "splits": [view_split(k) for k in range(1, views + 1)]} if views else None)
    meta = store.CacheMeta(
        **dataclasses.asdict(p.key), class_names=tuple(source.class_names), feature_shape=feature_shape,
        weights_sha256=model.base_weights_sha256, weights_file_sha256=p.weights.file_sha256,
        weights_source=p.weights.source or "random", seed=cfg.seed, augment=augment,
        info={"flops_per_image": flops or 0.0, "extract_images_per_second": result.steady_rate,
              "data": str(source.root or cfg.data), "source": {"name": source.name, "kind": source.kind,
                                                              "notes": source.notes},
              "versions": versions(), "config": as_dict(cfg), "compression": cfg.compression})
    result.skipped = chunks.assemble(layout_, feature_shape, cfg.dtype, meta, cfg.compression,
                                     reuse_from=p.path if reuse else None)
    return result


def _run_split(cfg: ExtractConfig, model: Any, decoder: images.Decoder, items: Any, split: str,
               rows: list[int], writer: "ChunkWriter", n_items: int, bar: Any, result: ExtractResult) -> int:
    """Forward every row, saving each chunk the moment its last row is done. Returns rows run."""
    chunk = cfg.chunk_size
    open_chunks: dict[int, dict[str, list]] = {}
    sent = 0
    stream = decoder.batches(items, rows, cfg.size, cfg.batch_size)
    while True:
        t0 = time.perf_counter()
        batch = next(stream, None)
        t1 = time.perf_counter()
        result.timings["waiting for decode"] += t1 - t0
        if batch is None:
            break
        if len(batch.rows):
            feats = backbone.forward(model, batch.images, cfg.batch_size)
            if not result.warmup_images:
                result.warmup_seconds, result.warmup_images = time.perf_counter() - t1, len(batch.rows)
            else:
                result.timings["forward pass"] += time.perf_counter() - t1
            sent += len(batch.rows)
        t2 = time.perf_counter()
        for c in np.unique(np.concatenate([batch.rows // chunk, [i // chunk for i, _ in batch.failed]]).astype(int)):
            acc = open_chunks.setdefault(int(c), {"features": [], "rows": [], "failed": []})
            mine = batch.rows // chunk == c
            if mine.any():
                acc["features"].append(feats[mine])
                acc["rows"].append(batch.rows[mine])
            acc["failed"] += [(i, reason) for i, reason in batch.failed if i // chunk == c]
            expected_rows = min((c + 1) * chunk, n_items) - c * chunk
            if sum(len(r) for r in acc["rows"]) + len(acc["failed"]) == expected_rows:
                features = (np.concatenate(acc["features"]) if acc["features"]
                            else np.zeros((0, *model.output_shape[1:]), np.float32))
                writer.save(split, int(c), features.astype(cfg.dtype),
                              np.concatenate(acc["rows"]) if acc["rows"] else np.zeros(0, np.int64),
                              np.array([i for i, _ in acc["failed"]], np.int64), [r for _, r in acc["failed"]])
                del open_chunks[int(c)]
        result.timings["saving chunks"] += time.perf_counter() - t2
        bar.update(len(batch.rows) + len(batch.failed))
    return sent


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

    def save(self, *args: Any) -> None:
        self.pending.append(self.pool.submit(self.chunks.save, *args))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.pop(0).result()

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()
