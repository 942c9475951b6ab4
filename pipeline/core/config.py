"""Frozen configuration per stage.

Everything a run depends on lives in one of these dataclasses; the CLI and the Makefile
only override fields. Importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.errors import ConfigError
from pipeline.core.memory import parse_budget
from pipeline.core.vocab import (
    COMPRESSIONS,
    DECODERS,
    DTYPES,
    EXPORT_FORMATS,
    EXPORT_PRECISIONS,
    MAPS,
    POOLINGS,
    PRECISIONS,
    STREAM_MODES,
    TRAIN_ON,
    check_choice,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _default_decode_processes() -> int:
    """Processes beat threads only with cores to spare: 0 (threads) below 8 cores."""
    cores = os.cpu_count() or 1
    return cores - 2 if cores >= 8 else 0


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one: which images go through which frozen backbone, and how the cache is kept."""

    data: str = "digits"  # folder, .npz file, or built-in name ("digits", "cifar10")
    size: int | None = None  # square input size; None -> the backbone's (VGG16: 150 -> (4,4,512)), set by the plan
    weights: str = "imagenet"  # "imagenet", "random" (seeded initialisation) or a weights file
    layer: str | None = None  # layer whose output is cached; None -> the backbone's (VGG16: block5_pool)
    backbone: str = "vgg16"  # a name in pipeline.features.backbone.BACKBONES
    batch_size: int = 32  # images per forward pass
    dtype: str = "float32"  # stored feature dtype: float32 or float16
    compression: str = "none"  # HDF5 filter for features: none, lzf, gzip (level 1)
    precision: str = "auto"  # compute: auto (fastest this machine runs natively), float32, bfloat16, float16, int8
    strict: bool = False  # unreadable images are an error before any work, not a skip
    force: bool = False  # rebuild even when a matching cache exists
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # for ROOT/<class>/* and arrays
    seed: int = 0  # split shuffling and random weights
    chunk_size: int = 256  # images per resumable chunk
    augment: int = 0  # K augmented views of every train image (seed 003's flip/rotation/zoom), cached once
    tta_views: int = (
        0  # N test-time views of every image of every split (1: the mirror; then policy views), cached once
    )
    decode_threads: int = 2  # threads decoding images ahead of the model (when decode_processes is 0)
    decode_processes: int = _default_decode_processes()  # >0: decode in processes (many-core GPU hosts)
    cache_dir: Path = dataclasses.field(default_factory=paths.cache_dir)  # ./cache or $FEATCACHE_HOME/cache
    quiet: bool = False  # no progress bars
    content_hash: bool = False  # key rows by a SHA-256 of each file's bytes instead of (size, mtime)
    decoder: str = "auto"  # cpu (Pillow), gpu (nvJPEG on CUDA), auto: gpu where usable; part of the identity

    def __post_init__(self) -> None:
        """Checks what needs no registry; size and layer are resolved by ``layout.plan``."""
        if self.size is not None and (not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1):
            raise ConfigError(f"size must be a positive integer (pixels); received size={self.size!r}")
        check_choice("decoder", self.decoder, DECODERS)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.decode_processes, int) or self.decode_processes < 0:
            raise ConfigError(f"decode_processes must be an integer >= 0; received {self.decode_processes!r}")
        if not isinstance(self.augment, int) or self.augment < 0:
            raise ConfigError(
                f"augment must be an integer >= 0 (views per train image); received augment={self.augment!r}"
            )
        if not isinstance(self.tta_views, int) or isinstance(self.tta_views, bool) or self.tta_views < 0:
            raise ConfigError(
                "tta_views must be an integer >= 0 (test-time views per image; 1 is the mirror); "
                f"received tta_views={self.tta_views!r}"
            )
        for name in ("batch_size", "chunk_size", "decode_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; received {name}={value!r}")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compression", self.compression, COMPRESSIONS)
        fractions = tuple(float(f) for f in self.split)
        if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(
                f"split must be three non-negative fractions (train, validation, test) summing to 1 "
                f"with train > 0; received split={self.split!r}"
            )
        object.__setattr__(self, "split", fractions)
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))


@dataclass(frozen=True)
class SweepConfig:
    """Stage two: which cache, which grid of heads, where the run folder goes."""

    cache: Path | None = None  # cache file; None -> the one the extract options name (CLI)
    sweep_file: Path = dataclasses.field(default_factory=paths.default_sweep)  # TOML grid of heads
    name: str = "sweep"  # run folder suffix
    seed: int = 0  # every random number generator
    n_jobs: int = 2  # configs fitted in parallel (joblib processes)
    carve_fraction: float = 0.2  # of train, held out for selection when the cache has no validation split
    train_on: str = "clean"  # clean features, cached augmented views, or both (a sweep file may vary it)
    views: int | None = None  # use the first N cached views (None: all)
    runs_dir: Path = dataclasses.field(default_factory=paths.runs_dir)  # ./runs or $FEATCACHE_HOME/runs
    stream: str = "auto"  # train from the HDF5 file in chunks: auto (over memory_budget), on, off
    memory_budget: str = "auto"  # e.g. "4GB"; auto: half of the machine's RAM
    track: bool = True  # log to MLflow (pipeline.runs.tracking); TRACK=0 in the environment also turns it off
    exclude: Path | None = None  # CSV with a ``path`` column (e.g. inspect's): those train rows are not trained on
    tta: bool = False  # score heads on the mean over cached test-time views (or the sweep file's `tta`)
    ensemble: int | None = None  # the mean of the top-k configs is one more row; None: the sweep file's `ensemble`
    cv: int | None = None  # select on K-fold out-of-fold predictions over train + validation (0: off); None: the file's

    def __post_init__(self) -> None:
        check_choice("stream", self.stream, STREAM_MODES)
        parse_budget(self.memory_budget)  # ConfigError naming the value when it is not a size
        if not 0 < self.carve_fraction < 1:
            raise ConfigError(f"carve_fraction must be in (0, 1); received {self.carve_fraction!r}")
        check_choice("train_on", self.train_on, TRAIN_ON)
        if self.views is not None and (not isinstance(self.views, int) or self.views < 1):
            raise ConfigError(f"views must be a positive integer; received views={self.views!r}")
        if self.ensemble is not None and (
            not isinstance(self.ensemble, int) or isinstance(self.ensemble, bool) or self.ensemble < 0
        ):
            raise ConfigError(f"ensemble must be an integer >= 0 (0 or 1: off); received ensemble={self.ensemble!r}")
        if self.cv is not None and (
            not isinstance(self.cv, int) or isinstance(self.cv, bool) or self.cv == 1 or self.cv < 0
        ):
            raise ConfigError(f"cv must be 0 (off) or a number of folds >= 2; received cv={self.cv!r}")
        if not isinstance(self.n_jobs, int) or self.n_jobs == 0:
            raise ConfigError(f"n_jobs must be a non-zero integer; received n_jobs={self.n_jobs!r}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning: block5 + head on cached block4_pool features (or end to end on images)."""

    epochs: int = 10  # block5 + head at the low learning rate
    learning_rate: float = 1e-5  # seeds 001 and 003: RMSprop 1e-5 once block5 is unfrozen
    head_epochs: int = 30  # the frozen-base head, when no run is given to warm-start from
    head_learning_rate: float = 1e-4  # for that head
    batch_size: int = 32
    patience: int = 3  # early stopping on validation loss, best weights kept
    train_on: str = "clean"  # clean block4 rows, their cached augmented views, or both
    views: int | None = None  # the first N cached views (None: all)
    head_run: Path | None = None  # a stage-two run on block5_pool whose MLP winner starts the head
    trust_pickle: bool = False  # load an old pickle-format head_run (only runs you made yourself)
    end_to_end: bool = False  # the seeds' recipe on images instead (GPU-sized work)
    seed: int = 0
    name: str = "finetune"
    runs_dir: Path = dataclasses.field(default_factory=paths.runs_dir)
    verbose: bool = False
    track: bool = True  # log to MLflow (pipeline.runs.tracking); TRACK=0 also turns it off

    def __post_init__(self) -> None:
        check_choice("train_on", self.train_on, tuple(t for t in TRAIN_ON if t != "tta"))  # block4 has no tta views
        for name in ("epochs", "head_epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; received {name}={value!r}")
        for name in ("learning_rate", "head_learning_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0; received {name}={getattr(self, name)!r}")


@dataclass(frozen=True)
class InspectConfig:
    """``featcache inspect``: what counts as a near-duplicate, a likely label error and an
    outlier in a cache's pooled features, and where the run folder goes."""

    cache: Path | None = None  # cache file; None -> the one the extract options name (CLI)
    pooling: str = "avg"  # (h, w, C) maps -> vectors before L2 normalisation: avg (C), max (C) or flatten
    duplicate_similarity: float = 0.95  # cosine at or above which two rows are near-duplicates (leakage across splits)
    neighbours: int = 10  # nearest neighbours searched per row (duplicates) and averaged over (outliers)
    folds: int = 5  # cross-validation folds for the out-of-fold probabilities of train rows
    C: float = 1.0  # inverse regularisation of the logistic regression on standardised features
    outlier_mad: float = 6.0  # outlier: mean k-NN distance this many scaled MADs above train's median
    map: str = "pca"  # the 2-D map: pca, or umap (the `inspect` extra)
    show: int = 30  # rows per finding shown with thumbnails in inspect.html (the CSVs hold all)
    memory_mb: int = 256  # working memory of one block of the neighbour search (bounds its peak)
    seed: int = 0
    name: str = "inspect"  # run folder suffix
    runs_dir: Path = dataclasses.field(default_factory=paths.runs_dir)

    def __post_init__(self) -> None:
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("map", self.map, MAPS)
        if not 0 < self.duplicate_similarity <= 1:
            raise ConfigError(
                f"duplicate_similarity must be a cosine in (0, 1]; received {self.duplicate_similarity!r}"
            )
        for name, low in (("neighbours", 1), ("folds", 2), ("show", 0), ("memory_mb", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}; received {name}={value!r}")
        for name in ("C", "outlier_mad"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0; received {name}={getattr(self, name)!r}")
        object.__setattr__(self, "runs_dir", Path(self.runs_dir))


@dataclass(frozen=True)
class ExportConfig:
    """``featcache export``: one run folder's winner as a model from uint8 pixels to class
    probabilities, in the formats asked for, checked against ``predict`` before it is kept."""

    run: Path  # the run folder (classify or finetune) whose winner is exported
    formats: tuple[str, ...] = ("keras",)  # model.keras is always written (predict --model reads it)
    out: Path | None = None  # None -> <run>/export; never an existing path
    precision: str = "cache"  # compute of the backbone: the cache's, or float32 / bfloat16
    check_images: int = 8  # validation images of the run checked against predict's probabilities
    tolerance: float | None = None  # max |p_export - p_predict|; None -> TOLERANCES[precision]
    batch_size: int = 32
    trust_pickle: bool = False  # an old pickle-format run folder (only folders you made)

    def __post_init__(self) -> None:
        formats = tuple(dict.fromkeys(("keras", *self.formats)))  # keras first, no repeats
        for f in formats:
            check_choice("format", f, EXPORT_FORMATS)
        object.__setattr__(self, "formats", formats)
        check_choice("precision", self.precision, EXPORT_PRECISIONS)
        object.__setattr__(self, "run", Path(self.run))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        for name in ("check_images", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; received {name}={value!r}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ConfigError(f"tolerance must be > 0; received tolerance={self.tolerance!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def replace(config: Any, **overrides: Any) -> Any:
    """dataclasses.replace that rejects unknown keys by name (minGPT's habit)."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {type(config).__name__}; known: {sorted(known)}")
    return dataclasses.replace(config, **overrides)


def as_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly view of a config (paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
    return out


__all__ = [
    "ExportConfig",
    "ExtractConfig",
    "FinetuneConfig",
    "InspectConfig",
    "SweepConfig",
    "as_dict",
    "load_toml",
    "replace",
]
