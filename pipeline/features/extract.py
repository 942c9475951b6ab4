"""Stage one: run the frozen backbone once over every image and cache the features.

The entry point; each step has its own module: ``delta`` decides what is already done (a
cache hit, or which rows an existing cache gives back), ``compute`` runs the rest through the
backbone into resumable chunks, ``commit`` writes them into the cache atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.cache import store
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.features import commit, layout, quantize, registry
from pipeline.features.commit import h5py_file, shard_path
from pipeline.features.compute import ChunkWriter, compute
from pipeline.features.delta import Delta, check_all_readable, prepare
from pipeline.features.result import ExtractResult

__all__ = ["ChunkWriter", "Delta", "ExtractResult", "extract", "h5py_file", "plan_work", "shard_path"]

log = logging.getLogger(__name__)


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
    prepared = prepare(cfg, for_shard=shard is not None)
    if prepared.hit is not None:
        return prepared.hit
    p, old, delta = prepared.plan, prepared.old, prepared.delta
    assert delta is not None
    if expect_todo is not None and delta.todo_hash != expect_todo:
        raise CacheError(
            f"the inputs of {p.path} changed while the shards were being planned; run the extraction again"
        )
    if p.cfg.strict:  # before the lock: a refused run leaves nothing behind, not even a lock file
        check_all_readable(p.source)
    if p.cfg.precision == "int8":
        quantize.require_openvino()  # before any work: say how to install the optional engine
    if shard is not None:
        target = shard_path(p.path, delta.todo_hash, shard, shards)
        with store.writer_lock(target):
            return _run_shard(p, delta, old, (shard, shards), target, progress)
    with store.writer_lock(p.path):
        if merge:
            return _finish(p, delta, commit.merge_shards(p, delta, old, shards))
        return _run(p, delta, old, progress)


def plan_work(cfg: ExtractConfig) -> tuple[layout.Plan, Delta | None]:
    """What ``extract(cfg)`` would compute, without computing it: the plan and the work
    (``None`` on a cache hit). Engines use it to size their slices and check their workers."""
    prepared = prepare(cfg)
    return prepared.plan, prepared.delta


def _new_result(p: layout.Plan, target: Path) -> ExtractResult:
    flops = registry.flops_per_image(p.cfg.size, p.cfg.layer, p.cfg.backbone)  # type: ignore[arg-type]
    return ExtractResult(target, hit=False, gflop_per_image=flops / 1e9 if flops else 0.0)


def _run(
    p: layout.Plan, delta: Delta, old: store.CacheMeta | None, progress: Callable[[int], None] | None
) -> ExtractResult:
    """The whole work, then the cache: reused rows and new ones in one atomic write."""
    result = _new_result(p, p.path)
    computed = compute(p, delta, delta.todo, p.path, old, progress, result)
    commit.write_cache(p, delta, old, computed, result)
    return _finish(p, delta, result)


def _run_shard(
    p: layout.Plan,
    delta: Delta,
    old: store.CacheMeta | None,
    shard: tuple[int, int],
    target: Path,
    progress: Callable[[int], None] | None,
) -> ExtractResult:
    """Compute slice ``shard`` = (index, of) of the work into ``target``: a cache file holding only those rows."""
    index, shards = shard
    todo = delta.slices(shards)[index]
    result = _new_result(p, target)
    if commit.shard_done(target, delta):
        result.hit = True
        return _finish(p, delta, result)
    if not any(todo.values()) and old is None:  # an empty slice of a fresh cache: no model to ask for a shape
        raise ConfigError(f"--shards {shards} is more than the {delta.n_todo} image(s) to compute; use fewer shards")
    computed = compute(p, delta, todo, target, old, progress, result)
    commit.write_shard(p, delta, todo, target, computed, result, shard)
    return _finish(p, delta, result)


def _finish(p: layout.Plan, delta: Delta, result: ExtractResult) -> ExtractResult:
    result.new, result.changed, result.removed, result.reused = delta.new, delta.changed, delta.removed, delta.reused
    result.update = delta.describe()
    log.info("%s: %s", p.path.name, result.update)
    return result
