"""Shared helpers for the benchmark scripts: where the real images are, subsets, timing."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FEATCACHE_BENCH_DATA", REPO.parent / "shared" / "data" / "cats_and_dogs_small")).resolve()
HED_WEIGHTS = REPO / "cache" / "weights" / "vgg16-hed-bsds500.weights.h5"


def require_data() -> Path:
    """The real images, or a clean exit (status 0) saying why the benchmark is skipped."""
    if not (DATA / "train").is_dir():
        print(f"SKIP: {DATA} not found (set FEATCACHE_BENCH_DATA to a cats_and_dogs_small folder)")
        sys.exit(0)
    return DATA


def subset(n_per_class: int, splits: tuple[str, ...] = ("train",), root: Path | None = None) -> Path:
    """A temporary folder of symlinks to the first n images per class and split (no copies)."""
    root = root or require_data()
    out = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    for split in splits:
        for cls in sorted(p.name for p in (root / split).iterdir()):
            files = sorted((root / split / cls).iterdir(), key=lambda p: int(p.name.split(".")[1]))[:n_per_class]
            (out / split / cls).mkdir(parents=True)
            for f in files:
                (out / split / cls / f.name).symlink_to(f.resolve())
    return out


def machine() -> str:
    import keras

    cpu, flags = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    wanted = ("amx", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
                    flags = " ".join(sorted(x for x in line.split(":", 1)[1].split() if x.startswith(wanted)))
    except OSError:
        pass
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}; flags: {flags or 'unknown'}), "
        f"Python {platform.python_version()}, "
        f"Keras {keras.__version__} ({keras.backend.backend()} backend)"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
