"""The cache format: self-describing HDF5 files, written so that a crash never leaves one
that looks complete.

Layout of a finished cache (one file per dataset x backbone x weights x layer x size x dtype)::

    attrs: format_version, complete, and every field of CacheMeta: the key (backbone, weights,
           layer, size, dtype, precision, preprocessing, fingerprint), class_names,
           feature_shape, weights_sha256, weights_file_sha256, weights_source, seed,
           augment, info (structures as JSON, listed in json_attrs)
    /<split>/features  (N, h, w, C)  chunked along N, Fletcher-32 checksum per chunk
    /<split>/labels    (N,)          int64 index into class_names, checksummed
    /<split>/paths     (N,)          bytes (UTF-8, surrogate escapes), relative to the data root
    /<split>/keys      (N,)          what each row depends on: "size|mtime_ns", "sha256:<hex>" or an array hash;
                                     a rerun recomputes only rows whose (path, key) is new (incremental)
    /<split>/skipped/paths, /<split>/skipped/reasons, /<split>/skipped/keys   files that could not be decoded
    /train@aug<k>/...  the k-th augmented view of every train image (AUGMENT=K), same layout
    /<split>@tta<k>/... the k-th test-time view of every image of <split> (TTA_VIEWS=N; 1 the mirror), same layout;
                        described by info["tta"] (views, seed, policy, splits); absent from older caches

A cache merged from shards (``extract --shards N``) has the same layout, but each
``features`` dataset is an HDF5 virtual dataset over the shard files next to it
(``<name>.shard-<i>-of-<n>.h5``): no feature bytes are copied, readers see one cache, and
``read_meta`` refuses it when a shard file is missing.

While stage one runs, every finished chunk of rows is its own small ``.npz`` file in a
hidden ``.<name>.partial/`` folder (written to a temporary name, then renamed), because
an HDF5 file whose writer is killed is often unreadable (h5py#1807). The final file is
assembled from those chunks into a temporary name and renamed into place.

This module imports h5py and numpy only: a cache hit or a scikit-learn sweep never pays
for TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np

from pipeline.core.errors import CacheError
from pipeline.core.vocab import SPLITS

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: per-row keys (incremental), unsplit folders split by path hash, shards as virtual datasets
# 2: typed identity (size, precision), weights_sha256 = hash of weight values, checksums
FEATURE_CHUNK_ROWS = 64  # HDF5 chunk length along N: small enough to stream, large enough to read fast


# --------------------------------------------------------------------------- the cache description


@dataclass(frozen=True)
class CacheKey:
    """What the features depend on: a cache answers a request only when every field is equal."""

    backbone: str
    weights: str  # weights id: "imagenet", "random-seed<N>", "<file stem>-<sha8>"
    layer: str
    size: int  # square input size in pixels
    dtype: str  # stored feature dtype
    precision: str  # compute precision of the forward pass
    preprocessing: str
    fingerprint: str  # of the inputs: every file's relative path, size and mtime (or the arrays)

    def identity_diff(self, other: CacheKey) -> list[str]:
        """Differences that forbid reusing any row: everything but the input fingerprint
        (rows are matched one by one on their path and key instead)."""
        return self.diff(other, IDENTITY_FIELDS)

    def diff(self, other: CacheKey, fields: Sequence[str] | None = None) -> list[str]:
        """One line per field (of ``fields``, default all) where ``other`` differs from this cache."""
        names = fields or [f.name for f in dataclasses.fields(CacheKey)]
        return [
            f"{n}: cache has {getattr(self, n)!r}, asked for {getattr(other, n)!r}"
            for n in names
            if getattr(self, n) != getattr(other, n)
        ]


IDENTITY_FIELDS = ("backbone", "weights", "layer", "size", "dtype", "precision", "preprocessing")


@dataclass(frozen=True)
class CacheMeta(CacheKey):
    """Everything a cache file says about itself: its key, the classes, the weights' hashes,
    and provenance. ``to_attrs``/``from_attrs`` map it to HDF5 attributes (structures as JSON)."""

    class_names: tuple[str, ...] = ()
    feature_shape: tuple[int, ...] = ()
    weights_sha256: str = ""  # of the whole base's weight values (see pipeline.features.weights)
    weights_file_sha256: str = ""  # of the weights file's bytes ("" without a file)
    weights_source: str = "random"  # a file path, "imagenet" or "random"
    seed: int = 0
    augment: dict[str, Any] | None = None  # {"views", "seed", "policy", "splits"} when views are cached
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance: data, versions, config, timings
    format_version: int = FORMAT_VERSION
    splits: tuple[str, ...] = ()  # filled when read
    split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # filled when read
    path: str = ""  # filled when read

    def key(self) -> CacheKey:
        return CacheKey(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CacheKey)})

    @property
    def view_splits(self) -> list[str]:
        return list((self.augment or {}).get("splits", []))

    def tta_splits(self, split: str) -> list[str]:
        """The cached test-time views of ``split`` (``features.tta_views``), view 1 first; [] when none."""
        return list(((self.info.get("tta") or {}).get("splits") or {}).get(split, []))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (run.json keeps a copy, so a run folder describes its cache)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(CacheKey) if f.name not in data)
        if missing:
            raise CacheError(f"cache metadata lacks {missing}; it was not written by this version of featcache")
        kw = {k: v for k, v in data.items() if k in known}
        for name in ("class_names", "feature_shape", "splits"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def to_attrs(self) -> dict[str, Any]:
        out = self.to_dict()
        for name in ("splits", "split_sizes", "path"):
            out.pop(name)
        return out


def _check_rows(path: Path, meta: CacheMeta, split: str, group: h5py.Group) -> None:
    """Shapes that must agree before anything is trusted, and the shard files a merged cache reads."""
    n = group["labels"].shape[0]
    feats = group["features"]
    if feats.is_virtual:  # a missing source would read as zeros: refuse instead
        for vs in feats.virtual_sources():
            source = path.parent / vs.file_name
            if not source.is_file():
                raise CacheError(
                    f"{path} is merged from shards and its shard file {source} is missing; "
                    "rerun the shards (or `make extract FORCE=1`)"
                )
    if feats.shape[0] != n or group["paths"].shape[0] != n:
        raise CacheError(
            f"{path} is corrupt: split {split!r} has {feats.shape[0]} feature rows, {n} labels and "
            f"{group['paths'].shape[0]} paths; rebuild it with `make extract FORCE=1`"
        )
    if meta.feature_shape and tuple(feats.shape[1:]) != tuple(meta.feature_shape):
        raise CacheError(
            f"{path} is corrupt: split {split!r} holds features of shape {feats.shape[1:]}, its metadata "
            f"says {tuple(meta.feature_shape)}; rebuild it with `make extract FORCE=1`"
        )


# --------------------------------------------------------------------------- reading


def read_meta(path: str | Path) -> CacheMeta:
    """The description of a complete cache, checked: its format version, completeness and
    the shapes of every split. Anything else is a CacheError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(
            f"no cache file at {path}; run `make extract` (or `featcache extract`) with the same options to make it"
        )
    rebuild = "rebuild it with `make extract FORCE=1` (same options)"
    try:
        with h5py.File(path, "r") as f:
            if "format_version" not in f.attrs:
                raise CacheError(f"{path} is an HDF5 file but not a featcache cache (no format_version attribute)")
            version = _decode_attr(f.attrs["format_version"], False)
            if version != FORMAT_VERSION:
                raise CacheError(
                    f"{path} has format_version={version!r}; this featcache reads {FORMAT_VERSION}. "
                    f"It was made by another version: {rebuild}"
                )
            if not bool(f.attrs.get("complete", False)):
                raise CacheError(
                    f"{path} is incomplete (no complete=True marker): the run that wrote it did not finish; {rebuild}"
                )
            json_keys = set(json.loads(_decode_attr(f.attrs.get("json_attrs", "[]"), False)))
            attrs = {
                k: _decode_attr(v, k in json_keys) for k, v in f.attrs.items() if k not in ("json_attrs", "complete")
            }
            splits = [s for s in SPLITS if s in f] + sorted((s for s in f if s not in SPLITS), key=_natural)
            meta = CacheMeta.from_dict(
                {
                    **attrs,
                    "splits": splits,
                    "path": str(path),
                    "split_sizes": {s: int(f[s]["labels"].shape[0]) for s in splits},
                }
            )
            for s in splits:
                _check_rows(path, meta, s, f[s])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CacheError(f"{path} is not a readable featcache cache ({type(e).__name__}: {e}); {rebuild}") from e
    return meta


def _natural(name: str) -> tuple[str, int]:
    """train@aug2 before train@aug10."""
    head, _, tail = name.rpartition("aug")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def _checked_labels(path: Path, meta: CacheMeta, split: str, labels: np.ndarray) -> np.ndarray:
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= len(meta.class_names))
    if bad.any():
        raise CacheError(
            f"{path} is corrupt: split {split!r} has {int(bad.sum())} label(s) outside the "
            f"{len(meta.class_names)} classes (e.g. {int(labels[bad][0])}); rebuild it with "
            "`make extract FORCE=1`"
        )
    return labels


def load_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features (N,h,w,C), labels (N,) int64, paths) of one split, read in one pass and
    checked: labels within the classes, HDF5 checksums verified."""
    path = Path(path)
    meta = read_meta(path)
    if split not in meta.splits:
        raise CacheError(f"{path} has no split {split!r}; it has {list(meta.splits)}")
    try:
        with h5py.File(path, "r") as f:
            group = f[split]
            features = group["features"][()]
            labels = _checked_labels(path, meta, split, group["labels"][()])
            paths = [decode_path(p) for p in group["paths"][()]]
    except OSError as e:  # a fletcher32 mismatch surfaces here: the bytes on disk changed
        raise CacheError(
            f"{path}: split {split!r} failed its checksum or could not be read ({e}); the file is "
            "corrupt: rebuild it with `make extract FORCE=1`"
        ) from e
    return features, labels, paths


def decode_path(p: bytes | str) -> str:
    """Stored paths are UTF-8 with surrogate escapes, so any Linux file name round-trips."""
    return p.decode("utf-8", "surrogateescape") if isinstance(p, bytes) else p


def iter_split(path: str | Path, split: str, rows: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (features, labels) blocks of a split that may not fit in memory."""
    path = Path(path)
    meta = read_meta(path)
    with h5py.File(path, "r") as f:
        features, labels = f[split]["features"], f[split]["labels"]
        for start in range(0, labels.shape[0], rows):
            yield features[start : start + rows], _checked_labels(path, meta, split, labels[start : start + rows])


# --------------------------------------------------------------------------- writing


def write_cache(
    path: str | Path,
    splits: Mapping[str, Mapping[str, Any]],
    meta: CacheMeta,
    compression: str = "none",
    checksum: bool = True,
) -> Path:
    """Write a complete cache from in-memory arrays, atomically (tests, small datasets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _write_attrs(f, meta)
        for split, data in splits.items():
            features = np.asarray(data["features"])
            dataset = _create_features(
                f, split, features.shape[0], features.shape[1:], features.dtype, compression, checksum
            )
            dataset[...] = features
            _write_rows_meta(
                f[split], np.asarray(data["labels"]), list(data["paths"]), data.get("skipped", []), data.get("keys")
            )
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return path


def _write_attrs(f: h5py.File, meta: CacheMeta) -> None:
    """Scalars as HDF5 attributes, structures as JSON (listed in ``json_attrs``); ``complete``
    stays False until every row is written."""
    attrs = {**meta.to_attrs(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    json_keys = []
    for key, value in attrs.items():
        if value is None or isinstance(value, (list, tuple, dict)):  # HDF5 attributes hold scalars
            json_keys.append(key)
            value = json.dumps(value)
        f.attrs[key] = value
    f.attrs["json_attrs"] = json.dumps(sorted(json_keys))
    f.attrs["complete"] = False


def _decode_attr(value: Any, is_json: bool) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if is_json and isinstance(value, str):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _create_features(
    f: h5py.File, split: str, n: int, shape: Sequence[int], dtype: Any, compression: str, checksum: bool = True
) -> h5py.Dataset:
    """Chunked along N with a Fletcher-32 checksum per chunk: flipped bytes fail the read."""
    group = f.require_group(split)
    kwargs: dict[str, Any] = {}
    if n > 0:
        kwargs.update(chunks=(min(FEATURE_CHUNK_ROWS, n), *shape), fletcher32=checksum)
    if compression == "lzf":
        kwargs["compression"] = "lzf"
    elif compression == "gzip":
        kwargs.update(compression="gzip", compression_opts=1)
    return group.create_dataset("features", shape=(n, *shape), dtype=dtype, **kwargs)


def _write_text(where: h5py.Group, name: str, values: Sequence[str]) -> None:
    """Strings as their exact bytes: a file name that is not UTF-8 arrives as a str with
    lone surrogates (surrogateescape) and is stored in a dataset typed as bytes rather than
    one claiming UTF-8 (``decode_path`` reads both). All-UTF-8 datasets are plain UTF-8."""
    raw = [str(v).encode("utf-8", "surrogateescape") for v in values]
    try:
        for r in raw:
            r.decode("utf-8")
        dtype = h5py.string_dtype("utf-8")
    except UnicodeDecodeError:
        dtype = h5py.string_dtype("ascii")
    where.create_dataset(name, data=np.array(raw, dtype=object), dtype=dtype)


def _write_rows_meta(
    group: h5py.Group,
    labels: np.ndarray,
    paths: list[str],
    skipped: Sequence[tuple[str, str]],
    keys: Sequence[str] | None = None,
    skipped_keys: Sequence[str] | None = None,
) -> None:
    labels = labels.astype(np.int64)
    group.create_dataset(
        "labels", data=labels, chunks=(max(1, len(labels)),) if len(labels) else None, fletcher32=bool(len(labels))
    )
    _write_text(group, "paths", paths)
    _write_text(group, "keys", list(keys) if keys is not None else [""] * len(paths))
    sk = group.create_group("skipped")
    _write_text(sk, "paths", [p for p, _ in skipped])
    _write_text(sk, "reasons", [r for _, r in skipped])
    _write_text(sk, "keys", list(skipped_keys) if skipped_keys is not None else [""] * len(skipped))


@dataclass
class RowIndex:
    """Where each (path, key) of a cache lives: what an incremental run may reuse."""

    rows: dict[str, dict[str, tuple[int, str]]]  # split -> path -> (row, key)
    skipped: dict[str, dict[str, tuple[str, str]]]  # split -> path -> (reason, key)
    virtual: bool  # features are virtual datasets over shard files


def read_index(path: str | Path) -> RowIndex:
    """Paths and keys of every row (and skipped file) of a complete cache; no features read."""
    path = Path(path)
    meta = read_meta(path)
    rows: dict[str, dict[str, tuple[int, str]]] = {}
    skipped: dict[str, dict[str, tuple[str, str]]] = {}
    virtual = False
    with h5py.File(path, "r") as f:
        for split in meta.splits:
            g = f[split]
            virtual = virtual or g["features"].is_virtual
            paths = [decode_path(p) for p in g["paths"][()]]
            keys = [decode_path(k) for k in g["keys"][()]] if "keys" in g else [""] * len(paths)
            rows[split] = {p: (i, k) for i, (p, k) in enumerate(zip(paths, keys, strict=True))}
            sk = g["skipped"]
            sp = [decode_path(p) for p in sk["paths"][()]]
            sr = [decode_path(r) for r in sk["reasons"][()]]
            skk = [decode_path(k) for k in sk["keys"][()]] if "keys" in sk else [""] * len(sp)
            skipped[split] = {p: (r, k) for p, r, k in zip(sp, sr, skk, strict=True)}
    return RowIndex(rows, skipped, virtual)


# --------------------------------------------------------------------------- assembling from pieces


@dataclass
class Block:
    """Computed rows of one split: item indices, their features (an ``.npz`` chunk or an HDF5
    dataset of a shard file) and the items that failed to decode."""

    rows: np.ndarray  # (n,) item indices, in the order of the features
    skipped: list[tuple[int, str]]  # (item index, reason)
    npz: Path | None = None  # a ChunkStore chunk
    h5: Path | None = None  # a shard file
    dataset: str = ""  # the features dataset inside ``h5``

    def load(self, start: int, stop: int) -> np.ndarray:
        if self.npz is not None:
            with np.load(self.npz) as z:
                return z["features"][start:stop]
        assert self.h5 is not None
        with h5py.File(self.h5, "r") as f:
            return f[self.dataset][start:stop]


@dataclass
class SplitPlan:
    """One split of the cache to write: every item in output order, and where its row comes from."""

    paths: list[str]
    labels: np.ndarray
    keys: list[str]
    reuse: dict[int, tuple[str, int]]  # item -> (split, row) in the previous cache
    reuse_skip: dict[int, str]  # item -> reason it was skipped before (unchanged file)
    blocks: list[Block]  # computed rows


def plan_view_rows(plan: SplitPlan, split: str, index: RowIndex | None) -> list[int]:
    """Fill ``plan``'s reuse from the view split ``split`` of a previous cache: a row (or a
    skip) is reused where that split holds the same (path, key). Returns the items to compute."""
    old = index.rows.get(split, {}) if index is not None else {}
    old_skipped = index.skipped.get(split, {}) if index is not None else {}
    todo = []
    for i, (path, key) in enumerate(zip(plan.paths, plan.keys, strict=True)):
        if key and path in old and old[path][1] == key:
            plan.reuse[i] = (split, old[path][0])
        elif key and path in old_skipped and old_skipped[path][1] == key:
            plan.reuse_skip[i] = old_skipped[path][0]
        else:
            todo.append(i)
    return todo


def _runs(plan: SplitPlan) -> tuple[list[tuple[Any, int, int]], list[tuple[str, str, str]]]:
    """Output as runs ``(origin, start, length)``, origin ``("old", split)`` or ``("block", b)``,
    coalesced where consecutive items come from consecutive rows; and the skipped
    (path, reason, key) in item order."""
    where: dict[int, tuple[Any, int]] = {i: (("old", s), r) for i, (s, r) in plan.reuse.items()}
    failed: dict[int, str] = dict(plan.reuse_skip)
    for b, block in enumerate(plan.blocks):
        for j, item in enumerate(block.rows.tolist()):
            where[item] = (("block", b), j)
        failed.update(block.skipped)
    runs: list[tuple[Any, int, int]] = []
    for item in range(len(plan.paths)):
        if item in failed:
            continue
        if item not in where:
            raise CacheError(f"internal: no row computed for {plan.paths[item]!r}")
        origin, row = where[item]
        if runs and runs[-1][0] == origin and runs[-1][1] + runs[-1][2] == row:
            runs[-1] = (origin, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((origin, row, 1))
    skipped = [(plan.paths[i], failed[i], plan.keys[i]) for i in sorted(failed)]
    return runs, skipped


def assemble(
    target: Path,
    plans: Mapping[str, SplitPlan],
    feature_shape: Sequence[int],
    dtype: str,
    meta: CacheMeta,
    compression: str = "none",
    old: Path | None = None,
    virtual: bool = False,
) -> dict[str, list[tuple[str, str]]]:
    """Write the cache ``target`` from reused rows of ``old`` and computed blocks, atomically.

    Rows come out in item order, so the result equals a full extraction row for row.
    ``virtual``: features become virtual datasets over the blocks' HDF5 files (shards), which
    must then all be HDF5 blocks and must stay next to ``target``. Returns skipped files per split.
    """
    tmp = target.with_name(target.name + ".tmp")
    all_skipped: dict[str, list[tuple[str, str]]] = {}
    old_file = h5py.File(old, "r") if old is not None else None
    try:
        with h5py.File(tmp, "w") as f:
            _write_attrs(f, meta)
            for split, plan in plans.items():
                runs, skipped = _runs(plan)
                n_ok = sum(n for _, _, n in runs)
                if virtual:
                    _virtual_features(f, split, plan, runs, n_ok, feature_shape, dtype, target.parent)
                else:
                    dataset = _create_features(f, split, n_ok, feature_shape, dtype, compression)
                    start = 0
                    for (kind, which), row, n in runs:
                        if kind == "old":
                            assert old_file is not None
                            block = old_file[which]["features"][row : row + n]
                        else:
                            block = plan.blocks[which].load(row, row + n)
                        dataset[start : start + n] = block.astype(dtype, copy=False)
                        start += n
                failed = set(plan.reuse_skip) | {i for b in plan.blocks for i, _ in b.skipped}
                items = [i for i in range(len(plan.paths)) if i not in failed]
                _write_rows_meta(
                    f[split],
                    np.asarray(plan.labels)[items],
                    [plan.paths[i] for i in items],
                    [(p, r) for p, r, _ in skipped],
                    [plan.keys[i] for i in items],
                    [k for _, _, k in skipped],
                )
                all_skipped[split] = [(p, r) for p, r, _ in skipped]
            f.attrs["complete"] = True
            f.flush()
    finally:
        if old_file is not None:
            old_file.close()
    os.replace(tmp, target)
    return all_skipped


def _virtual_features(
    f: h5py.File,
    split: str,
    plan: SplitPlan,
    runs: list[tuple[Any, int, int]],
    n: int,
    shape: Sequence[int],
    dtype: str,
    folder: Path,
) -> None:
    """``/<split>/features`` as a virtual dataset: each run maps rows of a shard file.

    Source files are named relative to the cache's folder (HDF5 looks there), so the cache
    folder can move as a whole."""
    group = f.require_group(split)
    if n == 0:
        group.create_dataset("features", shape=(0, *shape), dtype=dtype)
        return
    layout = h5py.VirtualLayout(shape=(n, *shape), dtype=dtype)
    start = 0
    for (kind, which), row, length in runs:
        block = plan.blocks[which] if kind == "block" else None
        if block is None or block.h5 is None:
            raise CacheError("internal: a virtual cache can only map shard files")
        with h5py.File(block.h5, "r") as src:
            src_shape = src[block.dataset].shape
        name = os.path.relpath(block.h5, folder)
        layout[start : start + length] = h5py.VirtualSource(name, block.dataset, shape=src_shape)[row : row + length]
        start += length
    group.create_virtual_dataset("features", layout, fillvalue=np.nan)


# --------------------------------------------------------------------------- resumable progress


class ChunkStore:
    """Finished chunks of a running extraction, one ``.npz`` per chunk, safe against kill -9.

    ``identity`` (what is being computed) is stored in ``meta.json``; a folder left by a
    run with another identity is discarded, never mixed in.
    """

    def __init__(self, final_path: Path, identity: Mapping[str, Any]):
        self.final_path = Path(final_path)
        self.dir = self.folder(self.final_path)
        self.identity = json.loads(json.dumps(identity))
        meta_file = self.dir / "meta.json"
        if self.dir.exists():
            try:
                previous = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != self.identity:
                log.warning("discarding partial work in %s: it was made for other inputs or options", self.dir)
                shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            _atomic_write_bytes(meta_file, json.dumps(self.identity, indent=1).encode())

    @staticmethod
    def folder(final_path: Path) -> Path:
        """Where the chunks of an extraction into ``final_path`` live (absent: nothing to resume)."""
        return Path(final_path).with_name(f".{Path(final_path).stem}.partial")

    def chunk_file(self, split: str, index: int) -> Path:
        return self.dir / f"{split}-{index:06d}.npz"

    def done(self, split: str, index: int) -> bool:
        return self.chunk_file(split, index).exists()

    def save(
        self,
        split: str,
        index: int,
        features: np.ndarray,
        rows: np.ndarray,
        skipped_rows: np.ndarray,
        skipped_reasons: Sequence[str],
    ) -> None:
        """Store one chunk: features of the decodable rows and the reasons for the others."""
        target = self.chunk_file(split, index)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                features=features,
                rows=np.asarray(rows, np.int64),
                skipped_rows=np.asarray(skipped_rows, np.int64),
                skipped_reasons=np.asarray(list(skipped_reasons), dtype=str),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def blocks(self, split: str, n_chunks: int) -> list[Block]:
        """The finished chunks of ``split`` as blocks for ``assemble``."""
        out = []
        for i in range(n_chunks):
            with np.load(self.chunk_file(split, i)) as z:
                out.append(
                    Block(
                        z["rows"].astype(np.int64),
                        list(zip(z["skipped_rows"].tolist(), [str(r) for r in z["skipped_reasons"]], strict=True)),
                        npz=self.chunk_file(split, i),
                    )
                )
        return out

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _StaleLockFile(Exception):
    """The lock file this process locked had been removed by its previous holder."""


def _same_file(lock_path: Path, held: list[os.stat_result]) -> Callable[[int], None]:
    """``on_acquired`` check: the locked file must still be the one at ``lock_path``. A holder
    removes its lock file before releasing it, so a process that opened the file just before
    then locks a removed file; it must let go and lock the file now at the path instead."""

    def check(fd: int) -> None:
        locked = os.fstat(fd)
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            raise _StaleLockFile(lock_path) from None
        if not os.path.samestat(locked, current):
            raise _StaleLockFile(lock_path)
        held[:] = [locked]

    return check


@contextlib.contextmanager
def writer_lock(final_path: Path) -> Iterator[None]:
    """One writer per cache file. The OS drops the lock when its holder dies, so a killed
    run never blocks the next one; a live holder is named in the error. The lock file is
    removed on release (while still held: see ``_same_file``), so none is left beside the cache."""
    from filelock import FileLock, Timeout

    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final_path.with_name(final_path.name + ".lock")
    info_path = final_path.with_name(final_path.name + ".lock.json")
    held: list[os.stat_result] = []
    lock = FileLock(str(lock_path), on_acquired=_same_file(lock_path, held))
    for _attempt in range(5):  # a lock file removed under us by a holder that finished: lock the new one
        try:
            lock.acquire(timeout=0)
            break
        except _StaleLockFile:
            continue
        except Timeout:
            if lock_path.exists():
                _raise_locked(final_path, lock_path, info_path)
    else:
        _raise_locked(final_path, lock_path, info_path)
    try:
        _atomic_write_bytes(
            info_path,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            ).encode(),
        )
        yield
    finally:
        with contextlib.suppress(OSError):
            info_path.unlink()
        with contextlib.suppress(OSError):  # ours while we hold it: nobody else removes or replaces it
            if held and os.path.samestat(os.stat(lock_path), held[0]):
                lock_path.unlink()
        lock.release()


def _raise_locked(final_path: Path, lock_path: Path, info_path: Path) -> NoReturn:
    try:
        holder = json.loads(info_path.read_text())
        who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError):
        who = "another process"
    raise CacheError(f"{final_path} is being written by {who} (lock {lock_path}); wait for it to finish") from None
