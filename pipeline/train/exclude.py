"""``--exclude FILE.csv``: train rows a user has judged bad (``featcache inspect`` writes
such files) are left out of training, and only of training: validation and test keep every
row, so the score a run reports says what the cleaning bought.

The file is any CSV with a ``path`` column holding paths as the cache stores them (relative
to the data root); other columns are ignored, so each of inspect's CSVs works as it is.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError


def read_exclude(path: str | Path) -> frozenset[str]:
    """The paths listed in ``path``'s ``path`` column; a ConfigError naming the file when it is
    missing, not UTF-8 text, or has no such column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--exclude file {path} does not exist; give a CSV with a 'path' column (inspect writes them)"
        )
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ConfigError(
                    f"--exclude file {path} has no 'path' column (its header is {reader.fieldnames}); "
                    "give a CSV whose header names a 'path' column, like the ones `featcache inspect` writes"
                )
            listed = [row["path"] for row in reader if row.get("path")]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"--exclude file {path} is not a readable CSV ({e})") from e
    return frozenset(listed)


def keep_mask(paths: Sequence[str], listed: frozenset[str]) -> np.ndarray:
    """True for every row whose path is not listed."""
    return np.fromiter((p not in listed for p in paths), dtype=bool, count=len(paths))


def record(path: str | Path, listed: frozenset[str], dropped: Sequence[str]) -> dict[str, Any]:
    """What run.json keeps: the file, its hash, how many paths it lists, which train rows went."""
    path = Path(path)
    return {
        "file": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "listed": len(listed),
        "dropped": len(dropped),
        "dropped_paths": sorted(dropped),
    }


__all__ = ["keep_mask", "read_exclude", "record"]
