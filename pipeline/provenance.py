"""Library versions for run.json and cache metadata, and the check that warns when a saved
artifact is loaded under another major version."""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of what is loaded (never imports a framework just to ask)."""
    import h5py
    import numpy as np

    from . import __version__

    out = {"featcache": __version__, "python": sys.version.split()[0], "numpy": np.__version__, "h5py": h5py.__version__}
    for name, module in (("scikit-learn", "sklearn"), ("joblib", "joblib"), ("keras", "keras"),
                         ("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch"), ("pillow", "PIL")):
        if module in sys.modules:
            out[name] = getattr(sys.modules[module], "__version__", "?")
    if "keras" in sys.modules:
        out["keras_backend"] = sys.modules["keras"].backend.backend()
    return out


def warn_on_major_change(saved: Mapping[str, str], what: str) -> list[str]:
    """Warn (never fail) for each library whose major version differs from ``saved``."""
    now = versions()
    notes = []
    for name, old in saved.items():
        new = now.get(name)
        if new and old and name != "python" and str(new).split(".")[0] != str(old).split(".")[0]:
            notes.append(f"{what} was saved with {name} {old}, this is {name} {new}")
    for note in notes:
        log.warning("%s; results may differ", note)
    return notes
