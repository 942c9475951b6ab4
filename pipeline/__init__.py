"""featcache: run a frozen ImageNet backbone once, cache its features in HDF5, and train
light heads on the cache in seconds.

    import pipeline as fc
    cache = fc.extract(data="path/to/images", size=180)
    run = fc.classify(cache.path)
    x_train, y_train, paths = fc.load_split(cache.path, "train")

Layers, each importing only the ones below it (``make lint`` checks this):
``app`` (CLI, API, compare, finetune, predict) > ``train`` (stage two: heads, sweeps) |
``features`` (stage one: images to cached features) > ``cache`` (the HDF5 format) | ``runs``
(run folders, reports, tracking) > ``core`` (errors, allowed values, configs, paths).

Importing the package is cheap: the API (and with it scikit-learn and h5py) loads on first
use, TensorFlow only when a model is built.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.core.version import __version__

if os.environ.get("FEATCACHE_QUIET_TF") == "1":  # set by the CLI: its worker processes stay quiet too
    from pipeline.core import quiet

    quiet.install()

API: tuple[str, ...] = ("CacheMeta", "ExtractConfig", "ExtractResult", "InspectConfig", "InspectResult")
API += ("SweepConfig", "SweepResult", "classify", "extract", "inspect", "load_split", "predict", "read_meta")
__all__ = [*API, "__version__"]


def __getattr__(name: str) -> Any:  # PEP 562: the API module loads on first use, from the top layer
    if name in API:
        from pipeline.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
