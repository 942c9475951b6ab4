"""Library versions for run.json and cache metadata: read from package metadata, so asking
never imports TensorFlow; the Keras backend is added when Keras is already loaded."""

from __future__ import annotations

import sys
from importlib import metadata

from pipeline.core.version import __version__

LIBRARIES = ("numpy", "h5py", "scikit-learn", "joblib", "skops", "keras", "tensorflow", "jax", "torch", "pillow")


def versions() -> dict[str, str]:
    """featcache, Python and every installed library of ``LIBRARIES``."""
    out = {"featcache": __version__, "python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if "keras" in sys.modules:
        out["keras_backend"] = sys.modules["keras"].backend.backend()
    return out
