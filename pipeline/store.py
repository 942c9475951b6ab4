"""The cache format: self-describing HDF5 files, written so that a crash never leaves one
that looks complete.

Layout of a finished cache (one file per dataset x backbone x weights x layer x size x dtype)::

    attrs: format_version, complete, class_names (JSON), backbone, weights, weights_sha256,
           layer, image_size, preprocessing, dtype, fingerprint, versions (JSON), created, ...
    /<split>/features  (N, h, w, C)  chunked along N
    /<split>/labels    (N,)          int64 index into class_names
    /<split>/paths     (N,)          UTF-8, relative to the data root (or "name[i]" for arrays)
    /<split>/skipped/paths, /<split>/skipped/reasons   files that could not be decoded
    /train@aug<k>/...  the k-th augmented view of every train image (AUGMENT=K), same layout

While stage one runs, every finished chunk of rows is its own small ``.npz`` file in a
hidden ``.<name>.partial/`` folder (written to a temporary name, then renamed), because
an HDF5 file whose writer is killed is often unreadable (h5py#1807). The final file is
assembled from those chunks into a temporary name and renamed into place.

This module imports h5py and numpy only: a cache hit or a scikit-learn sweep never pays
for TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURE_CHUNK_ROWS = 64  # HDF5 chunk length along N: small enough to stream, large enough to read fast


class CacheError(RuntimeError):
    """A cache file is missing, incomplete, locked, or does not match what was asked for."""


# --------------------------------------------------------------------------- reading

def read_meta(path: str | Path) -> dict[str, Any]:
    """Attributes of a complete cache, JSON fields decoded, plus ``splits`` and ``split_sizes``."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no cache file at {path}; run `make extract` (or `featcache extract`) with the same options to make it")
    try:
        with h5py.File(path, "r") as f:
            json_keys = set(json.loads(f.attrs.get("json_attrs", "[]")))
            meta = {k: _decode_attr(v, k in json_keys) for k, v in f.attrs.items() if k != "json_attrs"}
            meta["splits"] = [s for s in ("train", "validation", "test") if s in f] + sorted(
                (s for s in f if s not in ("train", "validation", "test")), key=_natural)
            meta["split_sizes"] = {s: int(f[s]["labels"].shape[0]) for s in meta["splits"]}
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 cache ({e}); delete it and run `make extract` again") from e
    if not meta.get("complete"):
        raise CacheError(f"{path} is incomplete (no complete=True marker); run `make extract` again to rebuild it")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format_version={meta.get('format_version')!r}, this tool reads {FORMAT_VERSION}; "
                         "rebuild it with `make extract FORCE=1`")
    meta["path"] = str(path)
    return meta


def _natural(name: str) -> tuple[str, int]:
    """train@aug2 before train@aug10."""
    head, _, tail = name.rpartition("aug")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def load_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N,h,w,C), labels (N,) int64, metadata) of one split, read in one pass."""
    meta = read_meta(path)
    if split not in meta["splits"]:
        raise CacheError(f"{path} has no split {split!r}; it has {meta['splits']}")
    with h5py.File(path, "r") as f:
        group = f[split]
        features = group["features"][()]
        labels = group["labels"][()].astype(np.int64)
        meta["paths"] = [p.decode() if isinstance(p, bytes) else p for p in group["paths"][()]]
    return features, labels, meta


def iter_split(path: str | Path, split: str, rows: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (features, labels) blocks of a split that may not fit in memory."""
    read_meta(path)
    with h5py.File(path, "r") as f:
        features, labels = f[split]["features"], f[split]["labels"]
        for start in range(0, labels.shape[0], rows):
            yield features[start:start + rows], labels[start:start + rows].astype(np.int64)


def mismatches(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable list of identity fields whose stored value differs from ``expected``."""
    out = []
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            out.append(f"{key}: cache has {have!r}, asked for {want!r}")
    return out


# --------------------------------------------------------------------------- writing

def write_cache(path: str | Path, splits: Mapping[str, Mapping[str, Any]], attrs: Mapping[str, Any],
                compression: str = "none") -> Path:
    """Write a complete cache from in-memory arrays, atomically (tests, small datasets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _write_attrs(f, attrs)
        for split, data in splits.items():
            features = np.asarray(data["features"])
            dataset = _create_features(f, split, features.shape[0], features.shape[1:], features.dtype, compression)
            dataset[...] = features
            _write_rows_meta(f[split], np.asarray(data["labels"]), list(data["paths"]),
                             data.get("skipped", []))
        f.attrs["complete"] = True
    os.replace(tmp, path)
    return path


def _write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    base = {"format_version": FORMAT_VERSION, "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backbone": "vgg16",
            "preprocessing": "unknown", "fingerprint": "", "weights": "unknown", "weights_sha256": ""}
    base.update(attrs)
    json_keys = []
    for key, value in base.items():
        if isinstance(value, (list, tuple, dict)):  # HDF5 attributes hold scalars; structures go as JSON
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


def _create_features(f: h5py.File, split: str, n: int, shape: Sequence[int], dtype: Any,
                     compression: str) -> h5py.Dataset:
    group = f.require_group(split)
    kwargs: dict[str, Any] = {}
    if n > 0:
        kwargs["chunks"] = (min(FEATURE_CHUNK_ROWS, n), *shape)
    if compression == "lzf":
        kwargs["compression"] = "lzf"
    elif compression == "gzip":
        kwargs.update(compression="gzip", compression_opts=1)
    return group.create_dataset("features", shape=(n, *shape), dtype=dtype, **kwargs)


def _write_rows_meta(group: h5py.Group, labels: np.ndarray, paths: list[str],
                     skipped: Sequence[tuple[str, str]]) -> None:
    """Labels, paths and skipped files of a split. A file name that is not UTF-8 comes in as a
    str with lone surrogates (surrogateescape) and is stored as its exact bytes, in a dataset
    typed as bytes (h5py's ASCII convention) rather than one claiming UTF-8; read the names back
    with ``.decode("utf-8", "surrogateescape")``. All-UTF-8 datasets are written as before."""
    def text(where: h5py.Group, name: str, values: Sequence[str]) -> None:
        raw = [str(v).encode("utf-8", "surrogateescape") for v in values]
        try:
            for r in raw:
                r.decode("utf-8")
            dtype = h5py.string_dtype("utf-8")
        except UnicodeDecodeError:
            dtype = h5py.string_dtype("ascii")
        where.create_dataset(name, data=np.array(raw, dtype=object), dtype=dtype)

    group.create_dataset("labels", data=labels.astype(np.int64))
    text(group, "paths", paths)
    sk = group.create_group("skipped")
    text(sk, "paths", [p for p, _ in skipped])
    text(sk, "reasons", [r for _, r in skipped])


# --------------------------------------------------------------------------- resumable progress

class Progress:
    """Finished chunks of a running extraction, one ``.npz`` per chunk, safe against kill -9.

    ``identity`` (what is being computed) is stored in ``meta.json``; a folder left by a
    run with another identity is discarded, never mixed in.
    """

    def __init__(self, final_path: Path, identity: Mapping[str, Any]):
        self.final_path = Path(final_path)
        self.dir = self.final_path.with_name(f".{self.final_path.stem}.partial")
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

    def chunk_file(self, split: str, index: int) -> Path:
        return self.dir / f"{split}-{index:06d}.npz"

    def done(self, split: str, index: int) -> bool:
        return self.chunk_file(split, index).exists()

    def save(self, split: str, index: int, features: np.ndarray, rows: np.ndarray,
             skipped_rows: np.ndarray, skipped_reasons: Sequence[str]) -> None:
        """Store one chunk: features of the decodable rows and the reasons for the others."""
        target = self.chunk_file(split, index)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, features=features, rows=np.asarray(rows, np.int64),
                     skipped_rows=np.asarray(skipped_rows, np.int64),
                     skipped_reasons=np.asarray(list(skipped_reasons), dtype=str))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def assemble(self, layout: Mapping[str, tuple[int, Sequence[str], np.ndarray]], feature_shape: Sequence[int],
                 dtype: str, attrs: Mapping[str, Any], compression: str = "none",
                 reuse_from: Path | None = None) -> dict[str, list[tuple[str, str]]]:
        """Build the final HDF5 from the chunks and rename it into place.

        ``layout[split] = (number of chunks, item paths, item labels)``; splits of
        ``reuse_from`` (a complete cache) not in ``layout`` are copied over unchanged.
        Returns the skipped files per split.
        """
        tmp = self.final_path.with_name(self.final_path.name + ".tmp")
        all_skipped: dict[str, list[tuple[str, str]]] = {}
        with h5py.File(tmp, "w") as f:
            _write_attrs(f, attrs)
            for split, (n_chunks, paths, labels) in layout.items():
                chunks = [np.load(self.chunk_file(split, i)) for i in range(n_chunks)]
                n_ok = sum(c["rows"].shape[0] for c in chunks)
                dataset = _create_features(f, split, n_ok, feature_shape, dtype, compression)
                start, rows, skipped = 0, [], []
                for c in chunks:
                    block = c["features"]
                    dataset[start:start + block.shape[0]] = block.astype(dtype, copy=False)
                    start += block.shape[0]
                    rows.extend(c["rows"].tolist())
                    skipped.extend((paths[r], str(reason)) for r, reason in zip(c["skipped_rows"].tolist(), c["skipped_reasons"]))
                _write_rows_meta(f[split], np.asarray(labels)[rows], [paths[r] for r in rows], skipped)
                all_skipped[split] = skipped
            if reuse_from is not None:
                with h5py.File(reuse_from, "r") as old:
                    for split in old:
                        if split not in layout:
                            old.copy(old[split], f, name=split)
            f.attrs["complete"] = True
            f.flush()
        os.replace(tmp, self.final_path)
        shutil.rmtree(self.dir, ignore_errors=True)
        return all_skipped


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def writer_lock(final_path: Path) -> Iterator[None]:
    """One writer per cache file. The OS drops the lock when its holder dies, so a killed
    run never blocks the next one; a live holder is named in the error."""
    from filelock import FileLock, Timeout

    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final_path.with_name(final_path.name + ".lock")
    info_path = final_path.with_name(final_path.name + ".lock.json")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads(info_path.read_text())
            who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise CacheError(f"{final_path} is being written by {who} (lock {lock_path}); wait for it to finish") from None
    try:
        _atomic_write_bytes(info_path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            info_path.unlink()
        lock.release()
