"""What a run of stage one must compute: the inputs compared with the cache already on disk.

``prepare`` reads the existing cache (if any), refuses one made differently, answers a cache
hit, and otherwise returns the ``Delta``: per split, which rows are reused and which items
(files, and augmented views of train files) still have to go through the backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.cache import store
from pipeline.core import paths
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.vocab import is_view, view_split
from pipeline.features import images, layout, sources, tta_views
from pipeline.features.result import ExtractResult

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """The difference between the inputs and the cache: per split, which rows are reused and
    which items must go through the backbone."""

    plans: dict[str, store.SplitPlan]  # blocks still empty
    items: dict[str, Sequence[Any]]  # what the decoder takes, per split and item
    todo: dict[str, list[int]]  # items to compute, per split (views included)
    views: int
    view_seed: int
    tta: int = 0  # test-time views per image of every split (features.tta_views)
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


@dataclass
class Prepared:
    """The plan, the cache already there (its meta and row index), and either the work or a hit."""

    plan: layout.Plan
    old: store.CacheMeta | None
    index: store.RowIndex | None
    delta: Delta | None  # None on a cache hit
    hit: ExtractResult | None  # the result to return on a cache hit


def prepare(cfg: ExtractConfig, for_shard: bool = False) -> Prepared:
    """Plan ``cfg`` and compare it with the existing cache: a hit, or the work still to do."""
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
            check_view_seed(p, have, (meta.augment or {}).get("seed"))
        have_tta = (meta.info.get("tta") or {}).get("views", 0)
        if have_tta and p.cfg.tta_views:
            check_view_seed(
                p, have_tta, (meta.info.get("tta") or {}).get("seed"), "test-time", f"TTA_VIEWS={p.cfg.tta_views}"
            )
        if (
            meta.fingerprint == p.key.fingerprint
            and have >= p.cfg.augment
            and have_tta >= p.cfg.tta_views
            and not for_shard
        ):
            hit = ExtractResult(p.path, hit=True, reused=sum(meta.split_sizes.get(s, 0) for s in p.source.splits))
            return Prepared(p, meta, None, None, hit)
        old, index = meta, store.read_index(p.path)
    paths.check_writable(p.path.parent, "cache folder")  # only here: a hit reads, so a read-only cache serves it
    view_seed = int((old.augment or {}).get("seed", p.cfg.seed)) if old is not None and have else p.cfg.seed
    old_tta = (old.info.get("tta") or {}) if old is not None else {}
    have_tta = old_tta.get("views", 0)
    tta_seed = int(old_tta.get("seed", p.cfg.seed)) if have_tta else p.cfg.seed
    delta = delta_for(p, index, max(p.cfg.augment, have), view_seed, max(p.cfg.tta_views, have_tta), tta_seed)
    return Prepared(p, old, index, delta, None)


def check_view_seed(
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


def check_all_readable(source: sources.Source) -> None:
    """--strict: refuse the whole run, before anything is written, if any file cannot be decoded."""
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


def delta_for(
    p: layout.Plan, index: store.RowIndex | None, views: int, view_seed: int, tta: int = 0, tta_seed: int = 0
) -> Delta:
    """Compare every input (and ``views`` augmented views of train, ``tta`` test-time views of
    every split) with ``index``, the rows of the existing cache: a (path, key) seen before is
    reused, anything else is to compute."""
    source = p.source
    old_rows, old_skip = _clean_rows(index)
    delta = Delta({}, {}, {}, views, view_seed, tta, tta_seed)
    seen: set[str] = set()
    for split, items in source.splits.items():
        plan = _split_plan(items)
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
        _add_views(delta, p, index, views, view_seed)
    for split, (plan, split_items, todo) in tta_views.plans(source, index, tta, tta_seed).items():
        delta.plans[split], delta.items[split], delta.todo[split] = plan, split_items, todo
    return delta


def _clean_rows(
    index: store.RowIndex | None,
) -> tuple[dict[str, tuple[str, int, str]], dict[str, tuple[str, str]]]:
    """Rows and skipped files of the train/validation/test splits of a cache, by path: a file
    may move between splits and still be reused."""
    old_rows: dict[str, tuple[str, int, str]] = {}
    old_skip: dict[str, tuple[str, str]] = {}
    if index is not None:
        for split, rows in index.rows.items():
            if not is_view(split):
                old_rows.update({path: (split, r, k) for path, (r, k) in rows.items()})
        for split, sk in index.skipped.items():
            if not is_view(split):
                old_skip.update(sk)
    return old_rows, old_skip


def _split_plan(items: sources.Split) -> store.SplitPlan:
    return store.SplitPlan(items.paths, items.labels, items.keys or [""] * len(items), {}, {}, [])


def _add_views(delta: Delta, p: layout.Plan, index: store.RowIndex | None, views: int, view_seed: int) -> None:
    """Views 1..``views`` of every train image: reused where the view split of the cache holds
    the same (path, key), else to compute (decoded with a seed that names image and view)."""
    source = p.source
    if "train" not in source.splits:
        raise ConfigError(f"AUGMENT={views} makes views of the train split, and {p.cfg.data} has none")
    train, train_items = source.splits["train"], source.items("train")
    for k in range(1, views + 1):
        split = view_split(k)
        plan = _split_plan(train)
        delta.plans[split], delta.todo[split] = plan, store.plan_view_rows(plan, split, index)
        delta.items[split] = [
            (item, (view_seed, k, sources.path_hash(path))) for item, path in zip(train_items, train.paths, strict=True)
        ]
