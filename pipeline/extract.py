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

from . import __version__, backbone, images, sources, store
from .config import ConfigError, ExtractConfig, as_dict

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
            lines += [f"    {images.printable(p)}" + (f" (view {split})" if "@" in split else "") + f": {reason}" for split, items in self.skipped.items() for p, reason in items]
        return "\n".join(lines)


def cache_path(cfg: ExtractConfig, source: sources.Source, weights: backbone.Weights) -> Path:
    """One file per (data source, backbone, weights, layer, size, dtype)."""
    name = f"{cfg.backbone}-{weights.id}-{cfg.layer}-{cfg.size}" + ("-float16" if cfg.dtype == "float16" else "")
    return cfg.cache_dir / source.key / f"{name}.h5"


def identity(cfg: ExtractConfig, source: sources.Source, weights: backbone.Weights) -> dict[str, Any]:
    """The attributes that must match for a cache to answer this request."""
    out = {"format_version": store.FORMAT_VERSION, "backbone": cfg.backbone, "weights": weights.id,
           "layer": cfg.layer, "image_size": cfg.size,
           "preprocessing": backbone.spec(cfg.backbone).describe_preprocessing(),
           "dtype": cfg.dtype, "fingerprint": source.fingerprint}
    if weights.sha256:  # random weights are pinned by id (seed) until the model exists
        out["weights_sha256"] = weights.sha256
    return out


def plan(cfg: ExtractConfig) -> tuple[sources.Source, backbone.Weights, Path]:
    """Check every option and input before any work; no model is built."""
    backbone.check_layer(cfg.layer, cfg.backbone)
    source = sources.resolve(cfg)
    weights = backbone.resolve_weights(cfg)
    return source, weights, cache_path(cfg, source, weights)


def locate(cfg: ExtractConfig) -> Path:
    """The complete cache that ``cfg`` names, checked against the current inputs; no model,
    no download. Stage two uses it to find what stage one made."""
    source = sources.resolve(cfg)
    weights = backbone.Weights(backbone.weights_id(cfg), None, "")
    path = cache_path(cfg, source, weights)
    command = (f"make extract DATA={cfg.data} BACKBONE={cfg.backbone} SIZE={cfg.size} WEIGHTS={cfg.weights} "
               f"LAYER={cfg.layer}" + (f" DTYPE={cfg.dtype}" if cfg.dtype != "float32" else ""))
    if not path.exists():
        raise store.CacheError(f"no cache at {path}; make it with `{command}`")
    meta = store.read_meta(path)
    diffs = store.mismatches(meta, identity(cfg, source, weights))
    if diffs:
        raise store.CacheError(f"{path} no longer matches its inputs ({'; '.join(diffs)}); "
                               f"rebuild it with `{command} FORCE=1`")
    return path


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Make (or find) the cache for ``cfg``; see ``cache_path`` for where it lands."""
    source, weights, path = plan(cfg)
    for note in source.notes:
        log.info(note)
    expected = identity(cfg, source, weights)
    reuse = None
    if path.exists() and not cfg.force:
        meta = store.read_meta(path)
        diffs = store.mismatches(meta, expected)
        if diffs:
            raise store.CacheError(f"{path} exists but was made differently ({'; '.join(diffs)}). "
                                   "Rebuild it with --force (make extract FORCE=1): the old file is replaced "
                                   "only once the new one is complete")
        have = meta.get("augment", {}).get("views", 0)
        if have >= cfg.augment:
            return ExtractResult(path, hit=True)
        if have and meta["augment"].get("seed") != cfg.seed:
            raise store.CacheError(f"{path} holds {have} views made with seed {meta['augment']['seed']}; more views "
                                   f"with seed {cfg.seed} would mix two policies. Use SEED={meta['augment']['seed']}, "
                                   "or rebuild with --force")
        reuse = meta  # keep what the file has; compute only the missing views
    if cfg.strict:  # before the lock: a refused run leaves nothing behind, not even a lock file
        _check_all_readable(source)
    with store.writer_lock(path):
        return _run(cfg, source, weights, path, expected, reuse)


def _check_all_readable(source: sources.Source) -> None:
    if source.root is None:
        return
    bad = [(images.printable(p), reason) for split, s in source.splits.items() for p in s.paths
           if (reason := images.check_readable(str(source.root / p))) is not None]
    if bad:
        listing = "\n".join(f"  {p}: {reason}" for p, reason in bad)
        raise ConfigError(f"--strict: {len(bad)} file(s) under {source.root} cannot be used; nothing was written. "
                          f"Fix or remove them, or run without --strict to skip them:\n{listing}")


def view_split(k: int) -> str:
    """Name of the split holding the k-th augmented view (1-based) of every train image."""
    return f"train@aug{k}"


def _jobs(cfg: ExtractConfig, source: sources.Source, reuse: dict[str, Any] | None) -> dict[str, tuple[Any, sources.Split]]:
    """What to compute: split name -> (decoder items, the split's paths and labels)."""
    jobs: dict[str, tuple[Any, sources.Split]] = {}
    if reuse is None:
        jobs = {s: (source.items(s), items) for s, items in source.splits.items()}
    if cfg.augment:
        if "train" not in source.splits:
            raise ConfigError(f"AUGMENT={cfg.augment} makes views of the train split, and {cfg.data} has none")
        train = source.items("train")
        first = 1 + (reuse.get("augment", {}).get("views", 0) if reuse else 0)
        for k in range(first, cfg.augment + 1):
            jobs[view_split(k)] = ([(item, (cfg.seed, k, i)) for i, item in enumerate(train)], source.splits["train"])
    return jobs


def _run(cfg: ExtractConfig, source: sources.Source, weights: backbone.Weights, path: Path,
         expected: dict[str, Any], reuse: dict[str, Any] | None = None) -> ExtractResult:
    import keras
    from tqdm.auto import tqdm

    t_build = time.perf_counter()
    model = backbone.build(cfg, weights)
    if not weights.sha256:
        weights = dataclasses.replace(weights, sha256=model.base_weights_sha256)
    log.info("built %s (%s weights, Keras backend %s) in %.1f s", model.name, weights.id, keras.backend.backend(),
             time.perf_counter() - t_build)
    feature_shape = tuple(int(d) for d in model.output_shape[1:])
    progress = store.Progress(path, {**expected, "weights_sha256": weights.sha256, "chunk_size": cfg.chunk_size,
                                     "augment": {"seed": cfg.seed, "policy": images.AUGMENT_POLICY}})
    flops = backbone.flops_per_image(cfg.size, cfg.layer, cfg.backbone)
    result = ExtractResult(path, hit=False, gflop_per_image=flops / 1e9 if flops else 0.0)
    layout = {}
    t0 = time.perf_counter()
    decoder = images.Decoder(cfg.decode_threads, cfg.decode_processes)
    writer = ChunkWriter(progress)
    with decoder, writer:
        for split, (decoder_items, items) in _jobs(cfg, source, reuse).items():
            n_chunks = math.ceil(len(items) / cfg.chunk_size)
            layout[split] = (n_chunks, items.paths, items.labels)
            todo = [c for c in range(n_chunks) if not progress.done(split, c)]
            result.resumed_chunks += n_chunks - len(todo)
            rows = [r for c in todo for r in range(c * cfg.chunk_size, min((c + 1) * cfg.chunk_size, len(items)))]
            with tqdm(total=len(items), initial=len(items) - len(rows), desc=f"{source.name}/{split}", unit="img",
                      disable=cfg.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
                result.images += _run_split(cfg, model, decoder, decoder_items, split, rows, writer, len(items), bar,
                                            result)
    result.seconds = time.perf_counter() - t0
    attrs = {**expected, "weights_sha256": weights.sha256, "weights_source": weights.source or "random",
             "class_names": source.class_names, "feature_shape": list(feature_shape),
             "flops_per_image": flops or 0.0, "extract_images_per_second": result.steady_rate,
             "data": str(source.root or cfg.data),
             "source": {"name": source.name, "kind": source.kind, "notes": source.notes},
             "versions": _versions(), "config": as_dict(cfg), "compression": cfg.compression,
             "mixed_precision": cfg.mixed_precision}
    views = max(cfg.augment, reuse.get("augment", {}).get("views", 0) if reuse else 0)
    if views:
        attrs["augment"] = {"views": views, "seed": cfg.seed, "policy": images.AUGMENT_POLICY,
                            "splits": [view_split(k) for k in range(1, views + 1)]}
    result.skipped = progress.assemble(layout, feature_shape, cfg.dtype, attrs, cfg.compression,
                                       reuse_from=path if reuse else None)
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

    def __init__(self, progress: store.Progress, depth: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.progress, self.depth = progress, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
        self.pending: list[Any] = []

    def save(self, *args: Any) -> None:
        self.pending.append(self.pool.submit(self.progress.save, *args))
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


def _versions() -> dict[str, str]:
    import h5py
    import keras
    import PIL

    out = {"featcache": __version__, "keras": keras.__version__, "keras_backend": keras.backend.backend(),
           "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
           "python": sys.version.split()[0]}
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    return out
