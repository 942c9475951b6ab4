"""featcache: run a frozen ImageNet backbone once, cache its features in HDF5, and train
light heads on the cache in seconds.

    from pipeline import ExtractConfig
    from pipeline.features import extract
    from pipeline import load_split
    result = extract(ExtractConfig(data="path/to/images", size=150))
    x_train, y_train, paths = load_split(result.path, "train")
    read_meta(result.path).class_names

Importing the package is cheap: TensorFlow loads only when a model is built.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

if os.environ.get("FEATCACHE_QUIET_TF") == "1":  # set by the CLI: its worker processes stay quiet too
    from pipeline.core import quiet

    quiet.install()

__all__ = ["CacheMeta", "ExtractConfig", "SweepConfig", "__version__", "extract", "load_split", "read_meta"]


def __getattr__(name: str) -> Any:  # lazy, so `import pipeline` imports neither keras nor h5py
    if name in ("ExtractConfig", "SweepConfig"):
        from pipeline.core import config

        return getattr(config, name)
    if name == "extract":
        from pipeline.features.extract import extract

        return extract
    if name in ("load_split", "read_meta", "CacheMeta"):
        from pipeline.cache import store

        return getattr(store, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
