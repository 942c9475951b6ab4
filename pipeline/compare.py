"""Compare backbones: extract with each (cache hits for those done before), run the same
sweep on each, and put the winners side by side in one table, CSV and bar chart."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import store
from .backbone import spec
from .config import ConfigError, ExtractConfig, SweepConfig
from .extract import extract
from .report import fmt, pyplot
from .sweep import new_run_dir, run_sweep

log = logging.getLogger(__name__)

COLUMNS = ("backbone", "size", "layer", "feature_shape", "features_per_image", "best_head", "val_accuracy",
           "test_accuracy", "extract_images_per_second", "cache_mb", "run_dir")


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    table: str
    csv: Path
    chart: Path


def compare(backbones: list[str], base: ExtractConfig, sweep_cfg: SweepConfig, size: int | None = None) -> CompareResult:
    """One row per backbone; ``size`` None gives each backbone its own default input size."""
    if not backbones:
        raise ConfigError("compare needs at least one backbone")
    for name in backbones:
        spec(name)  # unknown names fail before any work
    if base.weights not in ("imagenet", "none") and len(backbones) > 1:
        raise ConfigError(f"weights={base.weights!r} is a file, which fits one backbone; compare several with "
                          "WEIGHTS=imagenet or WEIGHTS=none")
    rows = []
    for name in backbones:
        cfg = dataclasses.replace(base, backbone=name, size=size, layer=None)
        result = extract(cfg)
        log.info(result.summary())
        meta = store.read_meta(result.path)
        sweep = run_sweep(dataclasses.replace(sweep_cfg, name=f"{sweep_cfg.name}-{name}"), result.path)
        w = sweep.winner
        shape = meta["feature_shape"]
        rows.append({"backbone": name, "size": cfg.size, "layer": cfg.layer, "feature_shape": "x".join(map(str, shape)),
                     "features_per_image": int(np.prod(shape)),
                     "best_head": f"{w['head']} {w['pooling']} {w['params']}", "val_accuracy": w["val_accuracy"],
                     "test_accuracy": w.get("test_accuracy"),
                     "extract_images_per_second": meta.get("extract_images_per_second"),
                     "cache_mb": result.path.stat().st_size / 1e6, "run_dir": str(sweep.run_dir)})
    out = new_run_dir(dataclasses.replace(sweep_cfg, name="compare"))
    csv_path, chart = out / "compare.csv", out / "compare.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows([{k: fmt(r[k]) for k in COLUMNS} for r in rows])
    _bar_chart(rows, chart)
    (out / "compare.json").write_text(json.dumps({"backbones": backbones, "rows": rows}, indent=2, default=str))
    return CompareResult(rows, _table(rows), csv_path, chart)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if c != "run_dir"]
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    return "\n".join(["  ".join(c.ljust(w) for c, w in zip(cols, widths))] +
                     ["  ".join(v.ljust(w) for v, w in zip(x, widths)) for x in cells])


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    names = [r["backbone"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4))
    val = [r["val_accuracy"] for r in rows]
    test = [r["test_accuracy"] if r["test_accuracy"] is not None else np.nan for r in rows]
    ax.bar(x - 0.2, val, 0.4, label="validation accuracy (selection)")
    ax.bar(x + 0.2, test, 0.4, label="test accuracy (winner)")
    for i, r in enumerate(rows):
        rate = r["extract_images_per_second"]
        ax.text(i, 0.02, f"{rate:.0f} img/s" if rate else "", ha="center", fontsize=8, rotation=90, color="white")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("best head per backbone")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
