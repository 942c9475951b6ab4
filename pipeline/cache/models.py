"""Model files kept beside a cache, and copied into run folders.

An int8 cache's features come from one quantised OpenVINO model, kept beside the cache as
``<cache stem>.openvino-<sha12>/`` (``pipeline.features.quantize`` makes it). Its identity is a
hash of its files; a run folder keeps its own hard link (or copy) of it, so ``predict`` runs
the very model that made the features even after the cache is rebuilt or deleted. This
module only moves and hashes files: it needs no OpenVINO.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.errors import CacheError

MODEL_FILES = ("model.xml", "model.bin")
RECORD = "calibration.json"


def model_sha256(folder: Path) -> str:
    """SHA-256 over the model's files (xml, then bin): the identity of the quantised model."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def keep_with_run(cache: Path, recorded: dict[str, Any], run_dir: Path) -> Path:
    """Hard-link (or copy) the cache's int8 model into ``run_dir``/int8-model, so predict runs
    the same model even after the cache is rebuilt or deleted."""
    src = Path(cache).parent / recorded["folder"]
    dst = Path(run_dir) / "int8-model"
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*MODEL_FILES, RECORD):
        target = dst / name
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError:
            shutil.copy2(src / name, target)
    if model_sha256(dst) != recorded["model_sha256"]:
        raise CacheError(f"int8 model {src} does not match what {cache} recorded; rebuild the cache with --force")
    return dst


__all__ = ["MODEL_FILES", "RECORD", "keep_with_run", "model_sha256"]
