"""Stage one: run the frozen backbone once over every image and cache the features.

Decides what is already done (cache hit, or finished chunks of an interrupted run),
runs the rest in batches with decoding overlapped, and hands rows to the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.core import paths
from pipeline.core.config import ExtractConfig, as_dict
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.provenance import versions
from pipeline.core.vocab import is_view, view_split
from pipeline.features import backbone, gpu_decode, images, layout, quantize, registry, sources, tta_views
from pipeline.features.weights import verify_weights

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
        default_factory=lambda: {"waiting for decode": 0.0, "forward pass": 0.0, "saving chunks": 0.0}
    )
    new: int = 0  # files not in the cache before
    changed: int = 0  # files whose size/mtime (or content hash) changed
    removed: int = 0  # cached files no longer in the inputs (their rows dropped)
    reused: int = 0  # rows kept from the cache without recomputing
    update: str = ""  # "2 new, 1 changed, 1 removed, 19,997 reused" (+ how new files were split)
    int8: dict[str, Any] | None = None  # precision int8: the quantised model's summary (quantize.summary)
    decode: dict[str, Any] | None = None  # decoder gpu: images decoded on the device / by the CPU fallback

    @property
    def steady_rate(self) -> float:
        """Images/s after the one-time warm-up: what a long run approaches."""
        seconds = self.seconds - self.warmup_seconds
        return (self.images - self.warmup_images) / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        size_mb = self.path.stat().st_size / 1e6 if self.path.exists() else 0.0
        if self.hit:
            return f"cache hit: {self.path} ({size_mb:.1f} MB) matches the inputs and options; nothing to do" + (
                f" ({self.reused:,} rows)" if self.reused else ""
            )
        rate = self.images / self.seconds if self.seconds else 0.0
        n_skipped = sum(len(v) for v in self.skipped.values())
        lines = [
            f"wrote {self.path}" + (f": {self.update}" if self.update else ""),
            f"  {self.images} images in {self.seconds:.1f} s: {rate:.1f} images/s overall, "
            f"{self.steady_rate:.1f} images/s"
            + (f" ({self.steady_rate * self.gflop_per_image:.0f} GFLOP/s)" if self.gflop_per_image else "")
            + " after "
            f"a {self.warmup_seconds:.1f} s warm-up; cache {size_mb:.1f} MB on disk"
            + (f"; resumed after {self.resumed_chunks} finished chunk(s)" if self.resumed_chunks else ""),
            "  time: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
            + f", warm-up {self.warmup_seconds:.1f} s",
        ]
        if n_skipped:
            lines.append(f"  {n_skipped} file(s) skipped (recorded in the cache under <split>/skipped):")
            lines += [
                f"    {images.printable(p)}" + (f" (view {split})" if is_view(split) else "") + f": {reason}"
                for split, items in self.skipped.items()
                for p, reason in items
            ]
        return "\n".join(lines)


def extract(
    cfg: ExtractConfig,
    *,
    shards: int = 1,
    shard: int | None = None,
    merge: bool = False,
    progress: Callable[[int], None] | None = None,
    expect_todo: str | None = None,
) -> ExtractResult:
    """Make, update or find the cache for ``cfg``; ``layout.cache_path`` says where it lands.

    Incremental: rows of an existing cache with the same identity (weights, layer, size, dtype,
    precision, preprocessing) are reused for every file whose (path, key) is unchanged; only
    new and changed files go through the backbone, removed files are dropped.

    ``shard=I`` (with ``shards=N``) computes only slice I of that work into its own shard file;
    ``merge=True`` then presents the N shards as the cache (``pipeline.features.ray_engine`` does both).
    ``progress`` is called with the number of images done after each batch.
    """
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"--shards must be a positive integer; received {shards!r}")
    if shard is not None and not (isinstance(shard, int) and 0 <= shard < shards):
        raise ConfigError(f"--shard must be in 0..{shards - 1} for --shards {shards}; received {shard!r}")
    if shard is not None and merge:
        raise ConfigError("--shard I computes one slice, --merge joins them: give one of the two")
    p, old, index, delta, hit = _prepare(cfg, for_shard=shard is not None)
    if hit is not None:
        return hit
    assert delta is not None
    if expect_todo is not None and delta.todo_hash != expect_todo:
        raise CacheError(
            f"the inputs of {p.path} changed while the shards were being planned; run the extraction again"
        )
    if p.cfg.strict:  # before the lock: a refused run leaves nothing behind, not even a lock file
        _check_all_readable(p.source)
    if p.cfg.precision == "int8":
        quantize.require_openvino()  # before any work: say how to install the optional engine
    if shard is not None:
        target = shard_path(p.path, delta.todo_hash, shard, shards)
        with store.writer_lock(target):
            return _run_shard(p, delta, old, shard, shards, target, progress)
    with store.writer_lock(p.path):
        if merge:
            return _merge(p, delta, old, index, shards)
        return _run(p, delta, old, index, progress)


def _prepare(
    cfg: ExtractConfig, for_shard: bool = False
) -> tuple[layout.Plan, store.CacheMeta | None, store.RowIndex | None, Delta | None, ExtractResult | None]:
    """Plan, compare with the existing cache: (plan, old meta, its row index, the work, a hit result or None)."""
    p = layout.plan(cfg)
    for note in p.source.notes:
        log.info(note)
    old: store.CacheMeta | None = None
    index: store.RowIndex | None = None
    have = 0
    if p.path.exists() and not p.cfg.force:
        meta = store.read_meta(p.path)
        diffs = meta.key().identity_diff(p.key)
        if diffs:
            raise CacheError(
                f"{p.path} exists but was made differently ({'; '.join(diffs)}). "
                "Rebuild it with --force (make extract FORCE=1): the old file is replaced "
                "only once the new one is complete"
            )
        have = (meta.augment or {}).get("views", 0)
        if have and p.cfg.augment:
            _check_view_seed(p, have, (meta.augment or {}).get("seed"))
        have_tta = (meta.info.get("tta") or {}).get("views", 0)
        if have_tta and p.cfg.tta_views:
            _check_view_seed(
                p, have_tta, (meta.info.get("tta") or {}).get("seed"), "test-time", f"TTA_VIEWS={p.cfg.tta_views}"
            )
        if (
            meta.fingerprint == p.key.fingerprint
            and have >= p.cfg.augment
            and have_tta >= p.cfg.tta_views
            and not for_shard
        ):
            hit = ExtractResult(p.path, hit=True, reused=sum(meta.split_sizes.get(s, 0) for s in p.source.splits))
            return p, meta, None, None, hit
        old, index = meta, store.read_index(p.path)
    paths.check_writable(p.path.parent, "cache folder")  # only here: a hit reads, so a read-only cache serves it
    view_seed = int((old.augment or {}).get("seed", p.cfg.seed)) if old is not None and have else p.cfg.seed
    old_tta = (old.info.get("tta") or {}) if old is not None else {}
    have_tta = old_tta.get("views", 0)
    tta_seed = int(old_tta.get("seed", p.cfg.seed)) if have_tta else p.cfg.seed
    delta = _delta(p, index, max(p.cfg.augment, have), view_seed, max(p.cfg.tta_views, have_tta), tta_seed)
    return p, old, index, delta, None


def _check_view_seed(
    p: layout.Plan, have: int, made_with: Any, kind: str = "augmented", asked: str | None = None
) -> None:
    """One rule for views of another seed, whether as many or more are asked: refused, since a
    hit would serve the cached seed's views and an update would mix two seeds in one cache."""
    if made_with == p.cfg.seed:
        return
    raise CacheError(
        f"{p.path} holds {have} {kind} view(s) per {'train ' if kind == 'augmented' else ''}image made with seed "
        f"{made_with}; {asked or f'AUGMENT={p.cfg.augment}'} with SEED={p.cfg.seed} asks for views made with seed "
        f"{p.cfg.seed}, and a cache "
        f"holds the views of one seed only. Use SEED={made_with} to use (or add to) the cached views, or rebuild "
        f"with FORCE=1 (--force) to make them with seed {p.cfg.seed}: the old file is replaced only once the new "
        "one is complete"
    )


def plan_work(cfg: ExtractConfig) -> tuple[layout.Plan, Delta | None]:
    """What ``extract(cfg)`` would compute, without computing it: the plan and the work
    (``None`` on a cache hit). Engines use it to size their slices and check their workers."""
    p, _, _, delta, _ = _prepare(cfg)
    return p, delta


def _check_all_readable(source: sources.Source) -> None:
    if source.root is None:
        return
    bad = [
        (images.printable(p), reason)
        for s in source.splits.values()
        for p in s.paths
        if (reason := images.check_readable(str(source.root / p))) is not None
    ]
    if bad:
        listing = "\n".join(f"  {p}: {reason}" for p, reason in bad)
        raise ConfigError(
            f"--strict: {len(bad)} file(s) under {source.root} cannot be used; nothing was written. "
            f"Fix or remove them, or run without --strict to skip them:\n{listing}"
        )


# --------------------------------------------------------------------------- what to compute


@dataclass
class Delta:
    """The difference between the inputs and the cache: per split, which rows are reused and
    which items must go through the backbone."""

    plans: dict[str, store.SplitPlan]  # blocks still empty
    items: dict[str, Sequence[Any]]  # what the decoder takes, per split and item
    todo: dict[str, list[int]]  # items to compute, per split (views included)
    views: int
    view_seed: int
    tta: int = 0  # test-time views per image of every split (features.views)
    tta_seed: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    reused: int = 0
    new_by_split: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def todo_hash(self) -> str:
        """Names the work: partial chunks and shard files are only ever reused for the same work."""
        h = hashlib.sha256()
        for split, rows in self.todo.items():
            plan = self.plans[split]
            for i in rows:
                h.update(
                    f"{split}|".encode()
                    + plan.paths[i].encode("utf-8", "surrogateescape")
                    + f"|{plan.keys[i]}\n".encode()
                )
        return h.hexdigest()

    @property
    def n_todo(self) -> int:
        return sum(len(v) for v in self.todo.values())

    def slices(self, shards: int) -> list[dict[str, list[int]]]:
        """The work cut into ``shards`` contiguous, near-equal slices (views included)."""
        flat = [(split, i) for split, rows in self.todo.items() for i in rows]
        out = []
        for k in range(shards):
            part: dict[str, list[int]] = {}
            for split, i in flat[k * len(flat) // shards : (k + 1) * len(flat) // shards]:
                part.setdefault(split, []).append(i)
            out.append(part)
        return out

    def describe(self) -> str:
        text = f"{self.new:,} new, {self.changed:,} changed, {self.removed:,} removed, {self.reused:,} reused"
        if self.new_by_split and (self.new or self.changed):
            text += " (new and changed files: " + ", ".join(f"{n} {s}" for s, n in self.new_by_split.items()) + ")"
        views = sum(len(v) for s, v in self.todo.items() if is_view(s))
        if views:
            text += f"; {views:,} view(s) to compute"
        return text


def _delta(
    p: layout.Plan, index: store.RowIndex | None, views: int, view_seed: int, tta: int = 0, tta_seed: int = 0
) -> Delta:
    source = p.source
    old_rows: dict[str, tuple[str, int, str]] = {}
    old_skip: dict[str, tuple[str, str]] = {}
    if index is not None:
        for split, rows in index.rows.items():
            if not is_view(split):
                old_rows.update({path: (split, r, k) for path, (r, k) in rows.items()})
        for split, sk in index.skipped.items():
            if not is_view(split):
                old_skip.update(sk)
    delta = Delta({}, {}, {}, views, view_seed, tta, tta_seed)
    seen: set[str] = set()
    for split, items in source.splits.items():
        plan = store.SplitPlan(items.paths, items.labels, items.keys or [""] * len(items), {}, {}, [])
        todo: list[int] = []
        for i, (path, key) in enumerate(zip(plan.paths, plan.keys, strict=True)):
            seen.add(path)
            if key and path in old_rows and old_rows[path][2] == key:
                plan.reuse[i] = old_rows[path][:2]
            elif key and path in old_skip and old_skip[path][1] == key:
                plan.reuse_skip[i] = old_skip[path][0]
            else:
                todo.append(i)
                if path in old_rows or path in old_skip:
                    delta.changed += 1
                else:
                    delta.new += 1
        delta.reused += len(plan.reuse) + len(plan.reuse_skip)
        delta.new_by_split[split] = len(todo)
        delta.plans[split], delta.items[split], delta.todo[split] = plan, source.items(split), todo
    delta.removed = len((set(old_rows) | set(old_skip)) - seen)
    if views:
        if "train" not in source.splits:
            raise ConfigError(f"AUGMENT={views} makes views of the train split, and {p.cfg.data} has none")
        train, train_items = source.splits["train"], source.items("train")
        for k in range(1, views + 1):
            split = view_split(k)
            plan = store.SplitPlan(train.paths, train.labels, train.keys or [""] * len(train), {}, {}, [])
            old_v = index.rows.get(split, {}) if index is not None else {}
            old_vs = index.skipped.get(split, {}) if index is not None else {}
            todo = []
            for i, (path, key) in enumerate(zip(plan.paths, plan.keys, strict=True)):
                if key and path in old_v and old_v[path][1] == key:
                    plan.reuse[i] = (split, old_v[path][0])
                elif key and path in old_vs and old_vs[path][1] == key:
                    plan.reuse_skip[i] = old_vs[path][0]
                else:
                    todo.append(i)
            delta.plans[split], delta.todo[split] = plan, todo
            delta.items[split] = [
                (item, (view_seed, k, sources.path_hash(path)))
                for item, path in zip(train_items, train.paths, strict=True)
            ]
    for split, (plan, split_items, todo) in tta_views.plans(source, index, tta, tta_seed).items():  # test-time views
        delta.plans[split], delta.items[split], delta.todo[split] = plan, split_items, todo
    return delta


# --------------------------------------------------------------------------- computing


def shard_path(final: Path, todo_hash: str, shard: int, shards: int) -> Path:
    """Shard files sit next to the cache and name the work they hold, so a new sharded run
    never overwrites a shard that a merged cache still reads."""
    return final.with_name(f"{final.stem}.shard-{todo_hash[:12]}-{shard}-of-{shards}.h5")


def _cleanup_shards(final: Path, keep: str | None) -> None:
    """Delete shard files of ``final`` that it no longer reads (and that are not of the work ``keep``)."""
    shard_files = list(final.parent.glob(f"{final.stem}.shard-*.h5"))
    if not shard_files:
        return
    used: set[str] = set()
    if final.exists():
        import h5py

        with h5py.File(final, "r") as f:
            for split in f:
                ds = f[split].get("features")
                if ds is not None and ds.is_virtual:
                    used.update(Path(vs.file_name).name for vs in ds.virtual_sources())
    for path in shard_files:
        if path.name not in used and not (keep and f".shard-{keep[:12]}-" in path.name):
            path.unlink(missing_ok=True)


def _compute(
    p: layout.Plan,
    delta: Delta,
    todo: dict[str, list[int]],
    target: Path,
    old: store.CacheMeta | None,
    progress: Callable[[int], None] | None,
    result: ExtractResult,
) -> tuple[store.ChunkStore | None, dict[str, list[store.Block]], tuple[int, ...], str]:
    """Run the backbone over ``todo`` into resumable chunks next to ``target``.
    Returns (chunk store, blocks per split, feature shape, weights hash)."""
    cfg = p.cfg
    assert cfg.size is not None and cfg.layer is not None
    if not any(todo.values()):
        if old is None:
            raise CacheError(f"internal: nothing to compute for {target} and no cache to reuse")
        result.int8 = old.info.get("int8")
        return None, {}, tuple(old.feature_shape), old.weights_sha256
    import keras
    from tqdm.auto import tqdm

    cpu_decoder = images.Decoder(cfg.decode_threads, cfg.decode_processes)
    # made before the model: GPU decode processes (gpu_decode.WORKERS) start while it builds
    decoder = gpu_decode.GpuDecoder(cpu=cpu_decoder) if cfg.decoder == "gpu" else cpu_decoder
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
        model = _int8_engine(p, model, old)
        result.int8 = quantize.summary(model.record)
    feature_shape = tuple(int(d) for d in model.output_shape[1:])
    chunks = store.ChunkStore(
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
    blocks: dict[str, list[store.Block]] = {}
    t0 = time.perf_counter()
    writer = ChunkWriter(chunks)
    total = sum(len(v) for v in todo.values())
    with (
        decoder,
        writer,
        tqdm(
            total=total, desc=p.source.name, unit="img", disable=cfg.quiet, file=sys.stderr, dynamic_ncols=True
        ) as bar,
    ):
        for split, rows_todo in todo.items():
            if not rows_todo:
                continue
            n_chunks = math.ceil(len(rows_todo) / cfg.chunk_size)
            pending = [c for c in range(n_chunks) if not chunks.done(split, c)]
            result.resumed_chunks += n_chunks - len(pending)
            rows = [
                rows_todo[j]
                for c in pending
                for j in range(c * cfg.chunk_size, min((c + 1) * cfg.chunk_size, len(rows_todo)))
            ]
            done_before = len(rows_todo) - len(rows)
            bar.update(done_before)
            if progress is not None and done_before:
                progress(done_before)
            result.images += _run_split(
                cfg, model, decoder, delta.items[split], split, rows, rows_todo, writer, bar, result, progress
            )
    for split, rows_todo in todo.items():
        if rows_todo:
            blocks[split] = chunks.blocks(split, math.ceil(len(rows_todo) / cfg.chunk_size))
    result.seconds = time.perf_counter() - t0
    if isinstance(decoder, gpu_decode.GpuDecoder):
        result.decode = {"decoder": "gpu", **decoder.counts, "fallbacks": decoder.fallbacks[:100]}
    return chunks, blocks, feature_shape, weights_sha256


def _int8_engine(p: layout.Plan, model: Any, old: store.CacheMeta | None) -> quantize.OpenVINOEngine:
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


def _tidy(p: layout.Plan, result: ExtractResult) -> None:
    """Once the cache is complete: drop leftover shard files and int8 models it does not use."""
    _cleanup_shards(p.path, keep=None)
    if p.cfg.precision == "int8":
        quantize.discard_unused(p.path, keep=(result.int8 or {}).get("folder"))


def _meta(
    p: layout.Plan,
    delta: Delta,
    feature_shape: tuple[int, ...],
    weights_sha256: str,
    result: ExtractResult,
    **info: Any,
) -> store.CacheMeta:
    cfg, source = p.cfg, p.source
    views = delta.views
    augment = (
        {
            "views": views,
            "seed": delta.view_seed,
            "policy": images.AUGMENT_POLICY,
            "splits": [view_split(k) for k in range(1, views + 1)],
        }
        if views
        else None
    )
    flops = registry.flops_per_image(cfg.size, cfg.layer, cfg.backbone)  # type: ignore[arg-type]
    return store.CacheMeta(
        **dataclasses.asdict(p.key),
        class_names=tuple(source.class_names),
        feature_shape=feature_shape,
        weights_sha256=weights_sha256,
        weights_file_sha256=p.weights.file_sha256,
        weights_source=p.weights.source or "random",
        seed=cfg.seed,
        augment=augment,
        info={
            "flops_per_image": flops or 0.0,
            "extract_images_per_second": result.steady_rate,
            "data": str(source.root or cfg.data),
            "source": {"name": source.name, "kind": source.kind, "notes": source.notes},
            "versions": versions(),
            "config": as_dict(cfg),
            "compression": cfg.compression,
            "last_update": delta.describe(),
            **({"int8": result.int8} if result.int8 else {}),
            **({"decode": result.decode} if result.decode else {}),
            **({"tta": tta_views.record(delta.tta, delta.tta_seed, list(source.splits))} if delta.tta else {}),
            **info,
        },
    )


def _finish(p: layout.Plan, delta: Delta, result: ExtractResult) -> ExtractResult:
    result.new, result.changed, result.removed, result.reused = delta.new, delta.changed, delta.removed, delta.reused
    result.update = delta.describe()
    log.info("%s: %s", p.path.name, result.update)
    return result


def _run(
    p: layout.Plan,
    delta: Delta,
    old: store.CacheMeta | None,
    index: store.RowIndex | None,
    progress: Callable[[int], None] | None,
) -> ExtractResult:
    flops = registry.flops_per_image(p.cfg.size, p.cfg.layer, p.cfg.backbone)  # type: ignore[arg-type]
    result = ExtractResult(p.path, hit=False, gflop_per_image=flops / 1e9 if flops else 0.0)
    chunks, blocks, feature_shape, wsha = _compute(p, delta, delta.todo, p.path, old, progress, result)
    for split, plan in delta.plans.items():
        plan.blocks = blocks.get(split, [])
    result.skipped = store.assemble(
        p.path,
        delta.plans,
        feature_shape,
        p.cfg.dtype,
        _meta(p, delta, feature_shape, wsha, result),
        p.cfg.compression,
        old=p.path if old is not None else None,
    )
    if chunks is not None:
        chunks.discard()
    _tidy(p, result)
    return _finish(p, delta, result)


def _run_shard(
    p: layout.Plan,
    delta: Delta,
    old: store.CacheMeta | None,
    shard: int,
    shards: int,
    target: Path,
    progress: Callable[[int], None] | None,
) -> ExtractResult:
    """Compute slice ``shard`` of the work into ``target``: a cache file holding only those rows."""
    todo = delta.slices(shards)[shard]
    flops = registry.flops_per_image(p.cfg.size, p.cfg.layer, p.cfg.backbone)  # type: ignore[arg-type]
    result = ExtractResult(target, hit=False, gflop_per_image=flops / 1e9 if flops else 0.0)
    if target.exists():
        meta = store.read_meta(target)
        if (meta.info.get("shard") or {}).get("work") == delta.todo_hash:
            result.hit = True
            return _finish(p, delta, result)
    if not any(todo.values()) and old is None:  # an empty slice of a fresh cache: no model to ask for a shape
        raise ConfigError(f"--shards {shards} is more than the {delta.n_todo} image(s) to compute; use fewer shards")
    chunks, blocks, feature_shape, wsha = _compute(p, delta, todo, target, old, progress, result)
    plans: dict[str, store.SplitPlan] = {}
    for split, rows in todo.items():
        full = delta.plans[split]
        local = {item: j for j, item in enumerate(rows)}
        plans[split] = store.SplitPlan(
            [full.paths[i] for i in rows],
            full.labels[rows] if rows else full.labels[:0],
            [full.keys[i] for i in rows],
            {},
            {},
            [
                store.Block(
                    np.array([local[i] for i in b.rows.tolist()], np.int64),
                    [(local[i], r) for i, r in b.skipped],
                    npz=b.npz,
                )
                for b in blocks.get(split, [])
            ],
        )
    meta = _meta(p, delta, feature_shape, wsha, result, shard={"index": shard, "of": shards, "work": delta.todo_hash})
    result.skipped = store.assemble(target, plans, feature_shape, p.cfg.dtype, meta, p.cfg.compression)
    if chunks is not None:
        chunks.discard()
    return _finish(p, delta, result)


def _merge(
    p: layout.Plan, delta: Delta, old: store.CacheMeta | None, index: store.RowIndex | None, shards: int
) -> ExtractResult:
    """Present the shard files as the cache: features as virtual datasets over them when every
    row is in a shard (nothing copied), else copied next to the rows reused from the old cache."""
    result = ExtractResult(p.path, hit=False)
    missing, metas = [], []
    for k in range(shards):
        path = shard_path(p.path, delta.todo_hash, k, shards)
        if not path.exists():
            missing.append(k)
            continue
        meta = store.read_meta(path)
        if (meta.info.get("shard") or {}).get("work") != delta.todo_hash or meta.key().identity_diff(p.key):
            raise CacheError(f"{path} was made for other inputs or options; rerun shard {k}")
        metas.append((path, meta))
    if missing:
        raise CacheError(
            f"cannot merge {p.path}: shard(s) {missing} of {shards} are not finished; run "
            + "; ".join(f"`featcache extract ... --shards {shards} --shard {k}`" for k in missing)
        )
    hashes = {m.weights_sha256 for _, m in metas} | ({old.weights_sha256} if old is not None else set())
    if len(hashes) > 1:
        raise CacheError(f"the shards of {p.path} were computed with different weight values; rerun them")
    int8 = [m.info.get("int8") for _, m in metas] + ([old.info.get("int8")] if old is not None else [])
    if p.cfg.precision == "int8":
        if len({json.dumps(r, sort_keys=True) for r in int8}) > 1 or not all(int8):
            raise CacheError(f"the shards of {p.path} were computed with different int8 models; rerun them")
        result.int8 = int8[0] if int8 else None
    feature_shape = tuple(metas[0][1].feature_shape) if metas else tuple(old.feature_shape)  # type: ignore[union-attr]
    for path, meta in metas:
        with h5py_file(path) as f:
            for split in meta.splits:
                plan = delta.plans[split]
                item_of = {q: i for i, q in enumerate(plan.paths)}
                names = [store.decode_path(q) for q in f[split]["paths"][()]]
                skipped = [store.decode_path(q) for q in f[split]["skipped"]["paths"][()]]
                reasons = [store.decode_path(q) for q in f[split]["skipped"]["reasons"][()]]
                plan.blocks.append(
                    store.Block(
                        np.array([item_of[q] for q in names], np.int64),
                        [(item_of[q], r) for q, r in zip(skipped, reasons, strict=True)],
                        h5=path,
                        dataset=f"{split}/features",
                    )
                )
        result.images += sum(meta.split_sizes.values())
    virtual = all(not plan.reuse for plan in delta.plans.values())
    result.skipped = store.assemble(
        p.path,
        delta.plans,
        feature_shape,
        p.cfg.dtype,
        _meta(
            p,
            delta,
            feature_shape,
            metas[0][1].weights_sha256 if metas else (old.weights_sha256 if old else ""),
            result,
            merged={"shards": shards, "virtual": virtual},
        ),
        p.cfg.compression,
        old=p.path if old is not None else None,
        virtual=virtual,
    )
    _tidy(p, result)
    return _finish(p, delta, result)


def h5py_file(path: Path) -> Any:
    import h5py

    return h5py.File(path, "r")


def _run_split(
    cfg: ExtractConfig,
    model: Any,
    decoder: images.Decoder | gpu_decode.GpuDecoder,
    items: Any,
    split: str,
    rows: list[int],
    rows_todo: list[int],
    writer: ChunkWriter,
    bar: Any,
    result: ExtractResult,
    progress: Callable[[int], None] | None,
) -> int:
    """Forward ``rows`` (item indices), saving each chunk the moment its last row is done.

    Chunk c holds positions c*chunk_size.. of ``rows_todo`` (the split's items to compute,
    in order), so chunks mean the same thing in a resumed run. Returns rows run."""
    assert cfg.size is not None
    chunk = cfg.chunk_size
    position = {item: j for j, item in enumerate(rows_todo)}
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
            feats = gpu_decode.forward(model, batch.images, cfg.batch_size)  # backbone.forward for numpy
            if not result.warmup_images:
                result.warmup_seconds, result.warmup_images = time.perf_counter() - t1, len(batch.rows)
            else:
                result.timings["forward pass"] += time.perf_counter() - t1
            sent += len(batch.rows)
        t2 = time.perf_counter()
        ok_chunk = np.array([position[int(i)] // chunk for i in batch.rows], np.int64)
        failed_chunk = [position[i] // chunk for i, _ in batch.failed]
        for c in sorted(set(ok_chunk.tolist()) | set(failed_chunk)):
            acc = open_chunks.setdefault(int(c), {"features": [], "rows": [], "failed": []})
            mine = ok_chunk == c
            if mine.any():
                acc["features"].append(feats[mine])
                acc["rows"].append(np.asarray(batch.rows)[mine])
            acc["failed"] += [
                (i, reason) for (i, reason), fc in zip(batch.failed, failed_chunk, strict=True) if fc == c
            ]
            expected_rows = min((c + 1) * chunk, len(rows_todo)) - c * chunk
            if sum(len(r) for r in acc["rows"]) + len(acc["failed"]) == expected_rows:
                features = (
                    np.concatenate(acc["features"])
                    if acc["features"]
                    else np.zeros((0, *model.output_shape[1:]), np.float32)
                )
                writer.save(
                    split,
                    int(c),
                    features.astype(cfg.dtype),
                    np.concatenate(acc["rows"]) if acc["rows"] else np.zeros(0, np.int64),
                    np.array([i for i, _ in acc["failed"]], np.int64),
                    [r for _, r in acc["failed"]],
                )
                del open_chunks[int(c)]
        result.timings["saving chunks"] += time.perf_counter() - t2
        done = len(batch.rows) + len(batch.failed)
        bar.update(done)
        if progress is not None:
            progress(done)
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

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()
