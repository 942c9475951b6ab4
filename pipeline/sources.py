"""Turn DATA (a folder, a ``.npz`` file, or a built-in name) into labelled items per split.

Everything here is cheap (a directory walk and ``stat`` calls, or a small array): the
cache-hit path runs it to compute the input fingerprint without building any model.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import SPLITS, ConfigError, ExtractConfig

log = logging.getLogger(__name__)

BUILTINS = ("digits", "cifar10")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Split:
    """Items of one split: ``paths`` name them (relative to the data root, or ``name[i]``)."""

    paths: list[str]
    labels: np.ndarray  # (N,) int64 index into Source.class_names
    arrays: np.ndarray | None = None  # (N,H,W,3) uint8 for array sources, else None

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Source:
    """What stage one reads: class names, items per split, and a fingerprint of all of it."""

    name: str  # human name: folder name, npz stem or built-in name
    key: str  # cache folder name: unique per data source
    root: Path | None  # folder the item paths are relative to (None for arrays)
    class_names: list[str]
    splits: dict[str, Split]
    fingerprint: str
    kind: str  # "folder", "npz" or "builtin"
    notes: list[str] = field(default_factory=list)

    def items(self, split: str) -> Sequence[str | np.ndarray]:
        """What ``images.load`` takes for each item of ``split``: absolute paths or arrays."""
        s = self.splits[split]
        if s.arrays is not None:
            return s.arrays  # type: ignore[return-value]
        return [str(self.root / p) for p in s.paths]  # type: ignore[operator]


def resolve(cfg: ExtractConfig) -> Source:
    """Read DATA as named by ``cfg.data``; every problem is a ConfigError naming the value."""
    data = cfg.data
    if data in BUILTINS:
        return _digits(cfg) if data == "digits" else _cifar10(cfg)
    path = Path(data).expanduser()
    if path.suffix == ".npz":
        return _npz(path, cfg)
    if not path.exists():
        raise ConfigError(f"data {data!r} is neither a folder, a .npz file, nor a built-in dataset {list(BUILTINS)}")
    if not path.is_dir():
        raise ConfigError(f"data {data!r} is a file but not a .npz; give a folder of images, a .npz, or one of {list(BUILTINS)}")
    return _folder(path.resolve(), cfg)


# --------------------------------------------------------------------------- folders

def _list_files(folder: Path) -> list[Path]:
    """Every visible regular file below ``folder`` (non-images too: they are reported, not hidden)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))
    return out


def _class_dirs(folder: Path) -> dict[str, list[Path]]:
    classes = {d.name: _list_files(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not classes:
        raise ConfigError(f"{folder} has no class folders; expected {folder}/<class>/<image files>")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ConfigError(f"class folder(s) {[str(folder / e) for e in empty]} are empty; add images or remove them")
    return classes


def _folder(root: Path, cfg: ExtractConfig) -> Source:
    present = [s for s in SPLITS if (root / s).is_dir()]
    per_split: dict[str, dict[str, list[Path]]] = {}
    notes: list[str] = []
    if present:
        for s in present:
            per_split[s] = _class_dirs(root / s)
        names = sorted(set().union(*[set(c) for c in per_split.values()]))
        for s, classes in per_split.items():
            missing = [n for n in names if n not in classes]
            if missing:
                raise ConfigError(f"class(es) {missing} exist in other splits but not in {root / s}; "
                                  "every split needs the same class folders")
        split_how = "folders"
    else:
        classes = _class_dirs(root)
        names = sorted(classes)
        files = [f for n in names for f in classes[n]]
        labels = np.array([i for i, n in enumerate(names) for _ in classes[n]], np.int64)
        assignment = stratified_assignment(labels, cfg.split, cfg.seed)
        for si, s in enumerate(SPLITS):
            chosen = np.flatnonzero(assignment == si)
            if chosen.size:
                per_split[s] = {n: [files[i] for i in chosen if labels[i] == ci] for ci, n in enumerate(names)}
        split_how = f"stratified split {list(cfg.split)} seed {cfg.seed}"
        notes.append(f"no train/validation/test folders in {root}: {split_how}")
    if not names:
        raise ConfigError(f"{root} has no images")
    splits: dict[str, Split] = {}
    digest = hashlib.sha256(f"folder|{split_how}\n".encode())
    for s, classes in per_split.items():
        paths, labels_ = [], []
        for ci, n in enumerate(names):
            for f in classes.get(n, []):
                rel = f.relative_to(root).as_posix()
                st = f.stat()
                digest.update(f"{s}|{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                paths.append(rel)
                labels_.append(ci)
        splits[s] = Split(paths, np.array(labels_, np.int64))
    key = f"{_slug(root.name)}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    return Source(root.name, key, root, names, splits, digest.hexdigest(), "folder", notes)


# --------------------------------------------------------------------------- arrays

def _from_arrays(name: str, key: str, x: np.ndarray, y: np.ndarray, class_names: list[str], cfg: ExtractConfig,
                 given_splits: dict[str, np.ndarray] | None = None) -> Source:
    """Arrays are split (stratified, seeded) unless ``given_splits`` names each split's rows."""
    digest = hashlib.sha256(name.encode())
    digest.update(x.tobytes())
    digest.update(y.astype(np.int64).tobytes())
    notes = []
    if given_splits is None:
        assignment = stratified_assignment(y, cfg.split, cfg.seed)
        given_splits = {s: np.flatnonzero(assignment == i) for i, s in enumerate(SPLITS)}
        digest.update(f"split {list(cfg.split)} seed {cfg.seed}".encode())
        notes.append(f"{name}: stratified split {list(cfg.split)} seed {cfg.seed}")
    splits = {s: Split([f"{name}[{i}]" for i in rows], y[rows].astype(np.int64), x[rows])
              for s, rows in given_splits.items() if len(rows)}
    return Source(name, key, None, class_names, splits, digest.hexdigest(), "builtin" if key == name else "npz", notes)


def _digits(cfg: ExtractConfig) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N,8,8) in 0..16 -> 0..255
    x = np.repeat(gray[..., None], 3, axis=-1)
    return _from_arrays("digits", "digits", x, d.target.astype(np.int64), [str(i) for i in range(10)], cfg)


def _cifar10(cfg: ExtractConfig) -> Source:
    try:
        from keras.datasets import cifar10

        (x_train, y_train), (x_test, y_test) = cifar10.load_data()
    except Exception as e:  # network, truncated download, missing keras: all mean "not available"
        raise ConfigError(
            f"DATA=cifar10 could not be loaded ({type(e).__name__}: {e}). Keras downloads it once into "
            "~/.keras/datasets/cifar-10-batches-py.tar.gz; put that file there on an offline machine, "
            "or use DATA=digits / a folder of images") from e
    x = np.concatenate([x_train, x_test])
    y = np.concatenate([y_train, y_test]).reshape(-1).astype(np.int64)
    n = len(x_train)
    return _from_arrays("cifar10", "cifar10", x, y, CIFAR10_CLASSES, cfg,
                        {"train": np.arange(n), "test": np.arange(n, len(x))})


def _npz(path: Path, cfg: ExtractConfig) -> Source:
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f]
            if missing:
                raise ConfigError(f"{path} lacks array(s) {missing}; a .npz needs x (N,H,W,3 or N,H,W uint8) and y (N,)")
            x, y = f["x"], f["y"]
            names = [str(n) for n in f["class_names"]] if "class_names" in f else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable .npz file: {e}") from e
    if x.dtype != np.uint8:
        raise ConfigError(f"{path}: x must be uint8 (0..255); received dtype {x.dtype}")
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"{path}: x must have shape (N,H,W,3) or (N,H,W); received {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"{path}: y must have shape ({len(x)},); received {y.shape}")
    values, y_idx = np.unique(y, return_inverse=True)
    if names is None:
        names = [str(v) for v in values]
    elif len(names) != len(values):
        raise ConfigError(f"{path}: class_names has {len(names)} entries but y has {len(values)} distinct values")
    key = f"{_slug(path.stem)}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    return _from_arrays(path.stem, key, x, y_idx.astype(np.int64), names, cfg)


# --------------------------------------------------------------------------- helpers

def stratified_assignment(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) per item: per class, shuffled with
    ``seed``, cut at the rounded cumulative fractions so every class keeps its share."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    bounds = np.cumsum(fractions)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(bounds * len(idx)).astype(int)
        out[idx] = np.searchsorted(cuts, np.arange(len(idx)), side="right")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "data"
