"""What a run of stage one did: counts, timings and the closing line the CLI prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.vocab import is_view
from pipeline.features import images


@dataclass
class ExtractResult:
    """What a run of stage one did; ``summary()`` is the closing line the CLI prints."""

    path: Path
    hit: bool
    images: int = 0  # images sent through the backbone in this run
    skipped: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    gflop_per_image: float = 0.0
    resumed_chunks: int = 0
    warmup_seconds: float = 0.0  # the first forward pass: graph tracing and kernel set-up, paid once
    warmup_images: int = 0
    timings: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"waiting for decode": 0.0, "forward pass": 0.0, "saving chunks": 0.0}
    )
    new: int = 0  # files not in the cache before
    changed: int = 0  # files whose size/mtime (or content hash) changed
    removed: int = 0  # cached files no longer in the inputs (their rows dropped)
    reused: int = 0  # rows kept from the cache without recomputing
    update: str = ""  # "2 new, 1 changed, 1 removed, 19,997 reused" (+ how new files were split)
    int8: dict[str, Any] | None = None  # precision int8: the quantised model's summary (quantize.summary)
    decode: dict[str, Any] | None = None  # decoder gpu: images decoded on the device / by the CPU fallback

    writer_seconds: float = 0.0  # the background writer's time saving chunks (overlapped with the loop)

    steady_seconds: float = 0.0  # from the warm-up batch's features to the last batch filed

    @property
    def steady_rate(self) -> float:
        """Images/s after the one-time warm-up: what a long run approaches. The clock runs from
        the first batch's features to the last batch filed, so it leaves out the start and the
        end: building the model, starting decode pools, waiting for the last saves, assembling."""
        seconds = self.steady_seconds
        return (self.images - self.warmup_images) / seconds if seconds > 0 else 0.0

    def summary(self) -> str:
        size_mb = self.path.stat().st_size / 1e6 if self.path.exists() else 0.0
        if self.hit:
            return f"cache hit: {self.path} ({size_mb:.1f} MB) matches the inputs and options; nothing to do" + (
                f" ({self.reused:,} rows)" if self.reused else ""
            )
        rate = self.images / self.seconds if self.seconds else 0.0
        n_skipped = sum(len(v) for v in self.skipped.values())
        lines = [
            f"wrote {self.path}" + (f": {self.update}" if self.update else ""),
            f"  {self.images} images in {self.seconds:.1f} s: {rate:.1f} images/s overall, "
            f"{self.steady_rate:.1f} images/s"
            + (f" ({self.steady_rate * self.gflop_per_image:.0f} GFLOP/s)" if self.gflop_per_image else "")
            + " after "
            f"a {self.warmup_seconds:.1f} s warm-up; cache {size_mb:.1f} MB on disk"
            + (f"; resumed after {self.resumed_chunks} finished chunk(s)" if self.resumed_chunks else ""),
            "  time: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
            + f", warm-up {self.warmup_seconds:.1f} s",
        ]
        if n_skipped:
            lines.append(f"  {n_skipped} file(s) skipped (recorded in the cache under <split>/skipped):")
            lines += [
                f"    {images.printable(p)}" + (f" (view {split})" if is_view(split) else "") + f": {reason}"
                for split, items in self.skipped.items()
                for p, reason in items
            ]
        return "\n".join(lines)
