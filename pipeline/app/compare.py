"""Compare backbones and input sizes: extract each (backbone, size) once (cache hits for
those done before), run the same sweep on each, and put the winners side by side in one
table, CSV and bar chart, with each one's backbone compute in seed-recipe passes. The
overall winner is picked on validation alone."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.core import accounting
from pipeline.core.config import ExtractConfig, SweepConfig, as_dict
from pipeline.core.errors import ConfigError
from pipeline.features.extract import extract
from pipeline.features.layout import resolve_options
from pipeline.features.weights import IMAGENET, RANDOM
from pipeline.runs import report, tracking
from pipeline.runs.folder import RunFolder, text_table
from pipeline.runs.plots import pyplot
from pipeline.train.sweep import run_sweep

log = logging.getLogger(__name__)

COLUMNS = (
    "backbone",
    "size",
    "layer",
    "feature_shape",
    "features_per_image",
    "best_head",
    "val_accuracy",
    "selected_on",
    "test_accuracy",
    "passes",
    "recipe_share",
    "extract_seconds",
    "sweep_seconds",
    "extract_images_per_second",
    "cache_mb",
    "winner",
    "run_dir",
)


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    table: str
    csv: Path
    chart: Path


def compare(
    backbones: list[str], base: ExtractConfig, sweep_cfg: SweepConfig, sizes: Sequence[int] | None = None
) -> CompareResult:
    """One row per (backbone, size). ``sizes`` (else ``base.size``, else each backbone's
    default) and ``base.layer`` apply to every backbone. ``passes`` is the winner's backbone
    compute in seed-recipe 180 px passes (views included); the row marked ``winner`` has the
    best validation accuracy (then validation log-loss; out-of-fold figures with cv), never a test figure."""
    cfgs = _configs(backbones, base, sizes)
    run = RunFolder(sweep_cfg.runs_dir, "compare")
    rows, log_losses = [], []
    for cfg in cfgs:
        row, log_loss = _extract_and_sweep(cfg, sweep_cfg)
        rows.append(row)
        log_losses.append(log_loss)
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], log_losses[i], i))
    for i, row in enumerate(rows):
        row["winner"] = i == best
    csv_path, chart = run.write_results(rows, COLUMNS, "compare.csv"), run.path / "compare.png"
    _bar_chart(rows, chart)
    # --- issue 15: report.html and MLflow (one child per backbone; each sweep is its own parent run too)
    report.table_report(run.path, "compare", rows, COLUMNS, ["compare.png"])
    tracked = _track(run, backbones, base, sweep_cfg, cfgs, rows)
    run.write_json(
        {
            "kind": "compare",
            "backbones": backbones,
            "sizes": sorted({c.size for c in cfgs}),
            "rows": rows,
            "extract": as_dict(base),
            "sweep": as_dict(sweep_cfg),
            "tracking": tracked,
        }
    )
    return CompareResult(rows, _table(rows, best), csv_path, chart)


def _configs(backbones: list[str], base: ExtractConfig, sizes: Sequence[int] | None) -> list[ExtractConfig]:
    """One extract config per (backbone, size), all checked before any work."""
    if not backbones:
        raise ConfigError("compare needs at least one backbone")
    if sizes is not None and (not sizes or len(set(sizes)) != len(sizes)):
        raise ConfigError(f"compare needs one or more distinct sizes; received sizes={sizes!r}")
    size_list: list[int | None] = list(sizes) if sizes else [base.size]
    cfgs = [
        resolve_options(dataclasses.replace(base, backbone=name, size=size)) for name in backbones for size in size_list
    ]
    if base.weights not in (IMAGENET, RANDOM) and len(backbones) > 1:
        raise ConfigError(
            f"weights={base.weights!r} is a file, which fits one backbone; compare several with "
            "WEIGHTS=imagenet or WEIGHTS=random"
        )
    return cfgs


def _extract_and_sweep(cfg: ExtractConfig, sweep_cfg: SweepConfig) -> tuple[dict[str, Any], float]:
    """Extract ``cfg`` (a cache hit when done before), sweep its cache; (its row, the winner's
    validation log-loss, the tie-break between rows)."""
    result = extract(cfg)
    log.info(result.summary())
    meta = store.read_meta(result.path)
    t0 = time.perf_counter()
    sweep = run_sweep(dataclasses.replace(sweep_cfg, name=f"{sweep_cfg.name}-{cfg.backbone}-{cfg.size}"), result.path)
    sweep_seconds = time.perf_counter() - t0
    w = sweep.winner
    row = {
        "name": f"{cfg.backbone}-{cfg.size}",
        "backbone": cfg.backbone,
        "size": cfg.size,
        "layer": cfg.layer,
        "feature_shape": "x".join(map(str, meta.feature_shape)),
        "features_per_image": int(np.prod(meta.feature_shape)),
        "best_head": f"{w['head']} {w['pooling']} {w['params']}",
        "val_accuracy": w["val_accuracy"],
        "selected_on": sweep.selected_on,  # validation, or out of fold over train + validation (cv)
        "test_accuracy": w.get("test_accuracy"),
        "passes": w.get("passes"),
        "recipe_share": accounting.recipe_share(w.get("passes")),
        "extract_seconds": 0.0 if result.hit else result.seconds,  # this call's: 0 on a cache hit
        "sweep_seconds": sweep_seconds,
        "extract_images_per_second": meta.info.get("extract_images_per_second"),
        "cache_mb": result.path.stat().st_size / 1e6,
        "run_dir": str(sweep.run_dir),
    }
    return row, w["val_log_loss"]


def _track(
    run: RunFolder,
    backbones: list[str],
    base: ExtractConfig,
    sweep_cfg: SweepConfig,
    cfgs: list[ExtractConfig],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The MLflow parent run of this comparison, one child per row (what run.json records)."""
    return tracking.log_table_run(
        tracking.Tracker(track=sweep_cfg.track),
        run.path,
        "compare",
        {"featcache.backbones": ",".join(backbones), "featcache.data": str(base.data)},
        {
            "backbones": ",".join(backbones),
            "sizes": ",".join(str(c.size) for c in cfgs),
            "weights": base.weights,
            "seed": base.seed,
            "sweep_file": str(sweep_cfg.sweep_file),
        },
        rows,
        "name",
        artifacts=["compare.csv", "compare.png", "report.html"],
    )


def _table(rows: list[dict[str, Any]], best: int) -> str:
    """The rows as text, and a line naming the winner and the unit of ``passes``."""
    table = text_table(rows, [c for c in COLUMNS if c not in ("run_dir", "winner")], mark="winner")
    w = rows[best]
    note = (
        f"winner ({w['selected_on']} only): {w['backbone']} {w['size']} px; passes in seed-recipe "
        f"180 px equivalents, against its {accounting.RECIPE_PASSES:,}"
    )
    return f"{table}\n{note}"


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    names = [f"{r['backbone']} {r['size']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4))
    val = [r["val_accuracy"] for r in rows]
    test = [r["test_accuracy"] if r["test_accuracy"] is not None else np.nan for r in rows]
    ax.bar(x - 0.2, val, 0.4, label=f"{rows[0]['selected_on']} accuracy (selection)")
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
