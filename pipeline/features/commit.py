"""Writing what stage one computed into the cache: one atomic commit, whole or nothing.

The full cache, a shard file (one slice of the work, ``--shard``) and the merge of shard
files all go through ``store.assemble``, which writes beside the target and renames it into
place only when complete; this module builds the rows' plans and the self-describing metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.core.config import as_dict
from pipeline.core.errors import CacheError
from pipeline.core.provenance import versions
from pipeline.core.vocab import view_split
from pipeline.features import images, layout, quantize, registry, tta_views
from pipeline.features.compute import Computed
from pipeline.features.delta import Delta
from pipeline.features.result import ExtractResult


def write_cache(
    p: layout.Plan, delta: Delta, old: store.CacheMeta | None, computed: Computed, result: ExtractResult
) -> None:
    """The cache at ``p.path``: reused rows of ``old`` and the computed chunks, in input order."""
    for split, plan in delta.plans.items():
        plan.blocks = computed.blocks.get(split, [])
    result.skipped = store.assemble(
        p.path,
        delta.plans,
        computed.feature_shape,
        p.cfg.dtype,
        cache_meta(p, delta, computed.feature_shape, computed.weights_sha256, result),
        p.cfg.compression,
        old=p.path if old is not None else None,
    )
    computed.discard()
    tidy(p, result)


def shard_path(final: Path, todo_hash: str, shard: int, shards: int) -> Path:
    """Shard files sit next to the cache and name the work they hold, so a new sharded run
    never overwrites a shard that a merged cache still reads."""
    return final.with_name(f"{final.stem}.shard-{todo_hash[:12]}-{shard}-of-{shards}.h5")


def shard_done(target: Path, delta: Delta) -> bool:
    """True when ``target`` is a finished shard file of this very work."""
    return target.exists() and (store.read_meta(target).info.get("shard") or {}).get("work") == delta.todo_hash


def write_shard(
    p: layout.Plan,
    delta: Delta,
    todo: dict[str, list[int]],
    target: Path,
    computed: Computed,
    result: ExtractResult,
    shard: tuple[int, int],
) -> None:
    """``target``: a cache file holding only the rows of slice ``shard`` = (index, of) of the work."""
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
                for b in computed.blocks.get(split, [])
            ],
        )
    index, of = shard
    meta = cache_meta(
        p,
        delta,
        computed.feature_shape,
        computed.weights_sha256,
        result,
        shard={"index": index, "of": of, "work": delta.todo_hash},
    )
    result.skipped = store.assemble(target, plans, computed.feature_shape, p.cfg.dtype, meta, p.cfg.compression)
    computed.discard()


def merge_shards(p: layout.Plan, delta: Delta, old: store.CacheMeta | None, shards: int) -> ExtractResult:
    """Present the shard files as the cache: features as virtual datasets over them when every
    row is in a shard (nothing copied), else copied next to the rows reused from the old cache."""
    result = ExtractResult(p.path, hit=False)
    metas = _finished_shards(p, delta, shards)
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
        _add_shard_blocks(delta, path, meta)
        result.images += sum(meta.split_sizes.values())
    virtual = all(not plan.reuse for plan in delta.plans.values())
    result.skipped = store.assemble(
        p.path,
        delta.plans,
        feature_shape,
        p.cfg.dtype,
        cache_meta(
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
    tidy(p, result)
    return result


def _finished_shards(p: layout.Plan, delta: Delta, shards: int) -> list[tuple[Path, store.CacheMeta]]:
    """Every shard file of this work with its meta; an error naming the ones still to run."""
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
    return metas


def _add_shard_blocks(delta: Delta, path: Path, meta: store.CacheMeta) -> None:
    """The rows of shard file ``path`` as blocks of the merged cache's splits."""
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


def h5py_file(path: Path) -> Any:
    import h5py

    return h5py.File(path, "r")


def cleanup_shards(final: Path, keep: str | None) -> None:
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


def tidy(p: layout.Plan, result: ExtractResult) -> None:
    """Once the cache is complete: drop leftover shard files and int8 models it does not use."""
    cleanup_shards(p.path, keep=None)
    if p.cfg.precision == "int8":
        quantize.discard_unused(p.path, keep=(result.int8 or {}).get("folder"))


def cache_meta(
    p: layout.Plan,
    delta: Delta,
    feature_shape: tuple[int, ...],
    weights_sha256: str,
    result: ExtractResult,
    **info: Any,
) -> store.CacheMeta:
    """The cache's self-description: identity, classes, weights, views, and how it was made."""
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
