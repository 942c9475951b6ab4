"""The Python API, for notebooks and scripts: the same stages as the command line.

    import pipeline as fc

    cache = fc.extract(data="path/to/images", size=180)        # stage one, once
    run = fc.classify(cache.path)                              # stage two: the default sweep
    x, y, paths = fc.load_split(cache.path, "validation")      # the cached arrays themselves
    fc.read_meta(cache.path).class_names
    found = fc.inspect(cache.path)                             # duplicates, label errors, outliers
    csv = fc.predict("new/images", run=run.run_dir)            # the winner on new images

Each function takes a config object or its fields as keywords (unknown keywords are a
ConfigError naming them), and raises ConfigError (a bad value) or CacheError (a missing or
mismatched cache), the errors the CLI turns into exit codes 2 and 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.app.inspection import InspectResult, inspect_cache
from pipeline.app.predict import predict as _predict
from pipeline.cache.store import CacheMeta, load_split, read_meta
from pipeline.core.config import ExtractConfig, InspectConfig, SweepConfig, replace
from pipeline.core.errors import ConfigError
from pipeline.features.extract import ExtractResult
from pipeline.features.extract import extract as _extract
from pipeline.features.layout import locate
from pipeline.train.sweep import SweepResult, run_sweep


def extract(config: ExtractConfig | None = None, **options: Any) -> ExtractResult:
    """Stage one: run the frozen backbone over every image once and cache the features.

    ``extract(data="images/", size=180)`` or ``extract(ExtractConfig(...), force=True)``.
    A matching complete cache is a hit (nothing recomputed); new or changed images only are
    computed. Returns the cache's path, whether it was a hit, and timings."""
    return _extract(replace(config or ExtractConfig(), **options))


def classify(
    cache: str | Path | ExtractConfig | None = None, config: SweepConfig | None = None, **options: Any
) -> SweepResult:
    """Stage two: fit every head of the sweep grid on a cache, pick the winner on validation
    (or out of fold over train + validation with ``cv=K``, then refit it), score it once on
    test, and write a run folder (results.csv, report.html, the winner).

    ``cache`` is a cache file, or the ExtractConfig that names one (as ``make classify``
    finds it); ``options`` are SweepConfig fields (``sweep_file``, ``n_jobs``, ``track``, ...)."""
    cfg = replace(config or SweepConfig(), **options)
    return run_sweep(cfg, _cache_path(cache, cfg.cache, "classify"))


def inspect(
    cache: str | Path | ExtractConfig | None = None, config: InspectConfig | None = None, **options: Any
) -> InspectResult:
    """Look at a cache's data through its features: near-duplicates (leakage when they cross
    splits), likely label errors, outliers, a 2-D map; writes a run folder with inspect.html
    and one CSV per finding (``classify(..., exclude=<csv>)`` trains without those rows).

    ``cache`` as for ``classify``; ``options`` are InspectConfig fields."""
    cfg = replace(config or InspectConfig(), **options)
    return inspect_cache(_cache_path(cache, cfg.cache, "inspect"), cfg)


def _cache_path(cache: str | Path | ExtractConfig | None, configured: Path | None, what: str) -> Path:
    """The cache file a stage-two call names: a path, the ExtractConfig that made it, or the
    config's own ``cache`` field."""
    if isinstance(cache, ExtractConfig):
        return locate(cache)
    if cache is not None:
        return Path(cache)
    if configured is not None:
        return Path(configured)
    raise ConfigError(f"{what} needs a cache: a cache file, or the ExtractConfig that made it")


def predict(images: str | Path, run: str | Path | None = None, **options: Any) -> Path:
    """Classify an image or a folder with a run's winning head (default: the newest run under
    ``./runs``); writes and returns a CSV of path, class, probability and one column per class.
    ``options``: out, batch_size, runs_dir, request (backbone/size/... that must match)."""
    return _predict(images, run_dir=run, **options)


__all__ = [
    "CacheMeta",
    "ExtractConfig",
    "ExtractResult",
    "InspectConfig",
    "InspectResult",
    "SweepConfig",
    "SweepResult",
    "classify",
    "extract",
    "inspect",
    "load_split",
    "predict",
    "read_meta",
]
