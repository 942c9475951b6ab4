"""Where featcache keeps its files: the working folder, never the installed package.

Caches, run folders and the MLflow store live under a *home* folder: ``$FEATCACHE_HOME`` when
set, else the current working directory (as MLflow's ``./mlruns`` and DVC do), so a wheel
installed by pip or pipx writes nothing inside site-packages. ``FEATCACHE_CACHE_DIR`` and
``FEATCACHE_RUNS_DIR`` override one folder each. The default sweep grid ships inside the
package and is read through ``importlib.resources``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from pipeline.core.errors import ConfigError

HOME_ENV = "FEATCACHE_HOME"


def home() -> Path:
    """``$FEATCACHE_HOME``, else the current working directory (read at each call)."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd())


def cache_dir() -> Path:
    """``$FEATCACHE_CACHE_DIR``, else ``<home>/cache``."""
    return Path(os.environ.get("FEATCACHE_CACHE_DIR") or home() / "cache")


def runs_dir() -> Path:
    """``$FEATCACHE_RUNS_DIR``, else ``<home>/runs``."""
    return Path(os.environ.get("FEATCACHE_RUNS_DIR") or home() / "runs")


def weights_dir() -> Path:
    """Where ``featcache hed-weights`` / ``pretrained-weights`` write converted weights."""
    return cache_dir() / "weights"


def default_sweep() -> Path:
    """The default grid of heads shipped with the package (``pipeline/train/default_sweep.toml``)."""
    return Path(str(resources.files("pipeline.train").joinpath("default_sweep.toml")))


def check_writable(folder: Path, what: str) -> None:
    """Refuse, before any compute, a folder that cannot be created or written."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder}: {existing} is a file, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {folder}: {existing} is not writable; choose another {what} or fix its permissions")


__all__ = ["HOME_ENV", "cache_dir", "check_writable", "default_sweep", "home", "runs_dir", "weights_dir"]
