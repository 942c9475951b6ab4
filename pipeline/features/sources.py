"""Turn DATA (a folder, a ``.npz`` file, or a built-in name) into labelled items per split.

Everything here is cheap (a directory walk and ``stat`` calls, or a small array): the
cache-hit path runs it to compute the input fingerprint without building any model.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.config import ExtractConfig
from pipeline.core.errors import ConfigError
from pipeline.core.vocab import SPLITS
from pipeline.features import images
from pipeline.features.images import printable

log = logging.getLogger(__name__)

BUILTINS = ("digits", "cifar10")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Split:
    """Items of one split: ``paths`` name them (relative to the data root, or ``name[i]``)."""

    paths: list[str]
    labels: np.ndarray  # (N,) int64 index into Source.class_names
    arrays: np.ndarray | None = None  # (N,H,W,3) uint8 for array sources, else None
    keys: list[str] = field(default_factory=list)  # per item: what its features depend on (stat or content hash)

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
    ignored: list[str] = field(default_factory=list)  # files under root that are not images (relative paths)

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
        raise ConfigError(
            f"data {data!r} is a file but not a .npz; give a folder of images, a .npz, or one of {list(BUILTINS)}"
        )
    return _folder(path.resolve(), cfg)


# --------------------------------------------------------------------------- folders
#
# Which files are images is decided by extension (images.IMAGE_EXTENSIONS); an image file
# whose content cannot be decoded is skipped and reported later, like before. Every other
# file (notes.txt, Thumbs.db) is ignored: counted in a note, listed with -v, and left out of
# the fingerprint, so adding a README.txt does not invalidate a cache.
#
# File names are bytes on Linux. A name that is not UTF-8 arrives from os.walk as a str
# with lone surrogates (surrogateescape); it is kept as is (it opens the file and the cache
# stores its exact bytes) and shown through images.printable (backslash escapes).


def _fs_bytes(text: str) -> bytes:
    """The bytes of a file name, as on disk (the same bytes as ``.encode()`` for UTF-8 names)."""
    return text.encode("utf-8", "surrogateescape")


def _walk_error(e: OSError) -> None:
    raise ConfigError(f"cannot read folder {printable(str(e.filename))}: {e.strerror}; fix its permissions")


def _list_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below ``folder``, sorted; hidden files and folders are left out."""
    found: list[Path] = []
    other: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in sorted(filenames):
            if not n.startswith("."):
                (found if images.is_image_name(n) else other).append(Path(dirpath) / n)
    return found, other


def _class_dirs(folder: Path, split: str | None, ignored: list[Path]) -> dict[str, list[Path]]:
    """Image files per class folder of ``folder``; non-images go to ``ignored``.

    A class folder without a single image file is an error naming it (an empty folder, or one
    holding only other files), and so is a split in which no class folder has any image.
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot read folder {printable(str(folder))}: {e.strerror}") from None
    classes: dict[str, list[Path]] = {}
    dirs: dict[str, Path] = {}
    others: dict[str, list[Path]] = {}
    for d in entries:
        if d.name.startswith("."):
            continue
        if not d.is_dir():
            ignored.append(d)  # a loose file next to the class folders
            continue
        label = printable(d.name)  # class names are labels: a name that is not UTF-8 shows its escapes
        if label in classes:
            raise ConfigError(
                f"class folders {printable(str(dirs[label]))!r} and {printable(str(d))!r} have the same "
                "printable name; rename one"
            )
        dirs[label] = d
        classes[label], others[label] = _list_files(d)
        ignored.extend(others[label])
    shown = printable(str(folder))
    if not classes:
        raise ConfigError(f"{shown} has no class folders; expected {shown}/<class>/<image files>")
    empty = [label for label, files in classes.items() if not files]
    if empty:

        def why(label: str) -> str:
            rest = others[label]
            if not rest:
                return f"{printable(str(dirs[label]))} is empty"
            sample = ", ".join(printable(f.name) for f in rest[:3]) + (", ..." if len(rest) > 3 else "")
            return f"{printable(str(dirs[label]))} holds no image files, only {len(rest)} other file(s) ({sample})"

        what = (
            f"split {split!r} ({shown}) has no images"
            if len(empty) == len(classes) and split
            else (f"{shown} has no images" if len(empty) == len(classes) else "class folder(s) without images")
        )
        raise ConfigError(
            f"{what}: "
            + "; ".join(why(label) for label in empty)
            + f". Images are files ending in {', '.join(images.IMAGE_EXTENSIONS)}; "
            "add some or remove the folder"
        )
    return classes


def _stat_key(f: Path) -> str:
    """Size and mtime for the fingerprint; a broken symlink counts by the link itself (it is
    kept as an item, and reported as a bad file when decoded)."""
    try:
        st = f.stat()
    except OSError:
        try:
            st = f.lstat()
        except OSError:
            return "missing"
        return f"link|{st.st_size}|{st.st_mtime_ns}"
    return f"{st.st_size}|{st.st_mtime_ns}"


def _content_key(f: Path) -> str:
    """SHA-256 of the file's bytes (``--content-hash``): survives a touch or a copy that
    changes the mtime; costs a read of every file on every run."""
    h = hashlib.sha256()
    try:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return _stat_key(f)  # unreadable: decoding reports it; the stat still tells a change
    return "sha256:" + h.hexdigest()


def _folder(root: Path, cfg: ExtractConfig) -> Source:
    present = [s for s in SPLITS if (root / s).is_dir()]
    per_split: dict[str, dict[str, list[Path]]] = {}
    notes: list[str] = []
    ignored: list[Path] = []
    shown = printable(str(root))
    if present:
        for s in present:
            per_split[s] = _class_dirs(root / s, s, ignored)
        names = sorted(set().union(*[set(c) for c in per_split.values()]))
        for s, classes in per_split.items():
            missing = [n for n in names if n not in classes]
            if missing:
                raise ConfigError(
                    f"class(es) {missing} exist in other splits but not in {printable(str(root / s))}; "
                    "every split needs the same class folders"
                )
        split_how = "folders"
    else:
        classes = _class_dirs(root, None, ignored)
        names = sorted(classes)
    if len(names) < 2:
        raise ConfigError(
            f"{shown} has a single class, {names[0]!r}: a classifier needs at least two class folders "
            f"(expected {shown}/" + ("<split>/" if present else "") + "<class>/<image files>). "
            "Add another class folder, or point DATA at the folder that holds the class folders"
        )
    if not present:
        files = [f for n in names for f in classes[n]]
        assignment = hashed_assignment([f.relative_to(root).as_posix() for f in files], cfg.split, cfg.seed)
        labels = np.array([i for i, n in enumerate(names) for _ in classes[n]], np.int64)
        for si, s in enumerate(SPLITS):
            chosen = np.flatnonzero(assignment == si)
            if chosen.size:
                per_split[s] = {n: [files[i] for i in chosen if labels[i] == ci] for ci, n in enumerate(names)}
        split_how = f"split {list(cfg.split)} by a hash of each file's path with seed {cfg.seed}"
        notes.append(
            f"no train/validation/test folders in {shown}: {split_how} (a file keeps its split when "
            "others are added or removed)"
        )
    if ignored:
        kinds = collections.Counter(f.suffix.lower() or "no extension" for f in ignored)
        notes.append(
            f"ignored {len(ignored)} file(s) under {shown} that are not images by extension ("
            + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
            + "); -v lists them"
        )
        for f in ignored:
            log.debug("not an image, ignored: %s", printable(f.relative_to(root).as_posix()))
    splits: dict[str, Split] = {}
    digest = hashlib.sha256(f"folder|{split_how}\n".encode())
    content_hash = bool(getattr(cfg, "content_hash", False))
    for s, classes in per_split.items():
        paths, labels_, keys = [], [], []
        for ci, n in enumerate(names):
            for f in classes.get(n, []):
                rel = f.relative_to(root).as_posix()
                key = _content_key(f) if content_hash else _stat_key(f)
                digest.update(f"{s}|".encode() + _fs_bytes(rel) + f"|{key}\n".encode())
                paths.append(rel)
                labels_.append(ci)
                keys.append(key)
        splits[s] = Split(paths, np.array(labels_, np.int64), keys=keys)
    key = f"{_slug(printable(root.name))}-{hashlib.sha256(_fs_bytes(str(root))).hexdigest()[:8]}"
    return Source(
        printable(root.name),
        key,
        root,
        names,
        splits,
        digest.hexdigest(),
        "folder",
        notes,
        [f.relative_to(root).as_posix() for f in ignored],
    )


# --------------------------------------------------------------------------- arrays


def _from_arrays(
    name: str,
    key: str,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    cfg: ExtractConfig,
    given_splits: dict[str, np.ndarray] | None = None,
) -> Source:
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
    splits = {
        s: Split(
            [f"{name}[{i}]" for i in rows],
            y[rows].astype(np.int64),
            x[rows],
            keys=[hashlib.blake2b(x[i].tobytes(), digest_size=16).hexdigest() for i in rows],
        )
        for s, rows in given_splits.items()
        if len(rows)
    }
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
            "or use DATA=digits / a folder of images"
        ) from e
    x = np.concatenate([x_train, x_test])
    y = np.concatenate([y_train, y_test]).reshape(-1).astype(np.int64)
    n = len(x_train)
    return _from_arrays(
        "cifar10", "cifar10", x, y, CIFAR10_CLASSES, cfg, {"train": np.arange(n), "test": np.arange(n, len(x))}
    )


NPZ_HOW = "DATA=*.npz must be written by numpy.savez(path, x=images, y=labels)"


def _npz(path: Path, cfg: ExtractConfig) -> Source:
    shown = printable(str(path))
    if not path.is_file():
        raise ConfigError(f"data file {shown} does not exist")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise ConfigError(f"cannot read {shown}: {e.strerror}") from None
    if not magic.startswith(b"PK"):  # numpy would try it as a pickle and suggest allow_pickle: never that
        what = (
            "it is empty"
            if not magic
            else "it holds a single array written by numpy.save"
            if magic.startswith(b"\x93NUM")
            else "it is not a zip archive"
        )
        raise ConfigError(f"{shown} is not a valid .npz file ({what}); {NPZ_HOW}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f]
            if missing:
                raise ConfigError(
                    f"{shown} lacks array(s) {missing}; a .npz needs x (N,H,W,3 or N,H,W uint8) and y (N,)"
                )
            x, y = f["x"], f["y"]
            names = [str(n) for n in f["class_names"]] if "class_names" in f else None
    except ConfigError:
        raise
    except ValueError as e:
        if "pickle" in str(e):  # an object array: featcache never unpickles data (it can run code)
            raise ConfigError(
                f"{shown} holds an array of Python objects (dtype=object); save plain arrays "
                "instead: x as uint8, y as integers or strings, class_names as strings"
            ) from None
        raise ConfigError(f"{shown} is not a valid .npz file ({e}); {NPZ_HOW}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(f"{shown} is not a valid .npz file ({type(e).__name__}: {e}); {NPZ_HOW}") from None
    if x.dtype != np.uint8:
        raise ConfigError(f"{shown}: x must be uint8 (0..255); received dtype {x.dtype}")
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"{shown}: x must have shape (N,H,W,3) or (N,H,W); received {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"{shown}: y must have shape ({len(x)},); received {y.shape}")
    if len(x) == 0:
        raise ConfigError(f"{shown} holds no images (x has 0 rows)")
    values, y_idx = np.unique(y, return_inverse=True)
    if names is None:
        names = [str(v) for v in values]
    elif len(names) != len(values):
        raise ConfigError(f"{shown}: class_names has {len(names)} entries but y has {len(values)} distinct values")
    if len(values) < 2:
        raise ConfigError(
            f"{shown} has a single class, {names[0]!r} (every y is {values[0].item()!r}): a classifier needs "
            "at least two classes"
        )
    key = f"{_slug(printable(path.stem))}-{hashlib.sha256(_fs_bytes(str(path.resolve()))).hexdigest()[:8]}"
    return _from_arrays(printable(path.stem), key, x, y_idx.astype(np.int64), names, cfg)


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


def path_hash(path: str, seed: int = 0) -> int:
    """A stable 64-bit number per relative path (and seed): the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}|".encode() + _fs_bytes(path)).digest()
    return int.from_bytes(digest[:8], "big")


def hashed_assignment(paths: Sequence[str], fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) per relative path, from a hash of the path
    and ``seed``: a file's split never depends on which other files exist, so adding or
    removing images moves no existing image between splits (shares are close to ``fractions``
    on large folders, not exact on tiny ones)."""
    u = np.array([path_hash(p, seed) / 2.0**64 for p in paths], np.float64)
    return np.searchsorted(np.cumsum(fractions)[:-1], u, side="right").astype(np.int64)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "data"
