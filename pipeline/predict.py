"""New images -> the same frozen backbone the head was trained on -> saved head -> CSV.

The run folder pins everything: the cache's backbone, weights (and their SHA-256),
layer, input size and preprocessing. A request that differs, or weights whose bytes
changed since, is refused with the field that differs.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import backbone, images
from .config import RUNS_DIR, ConfigError, ExtractConfig
from .store import CacheError

log = logging.getLogger(__name__)


def latest_run(runs_dir: Path) -> Path:
    runs = sorted((p.parent for p in Path(runs_dir).glob("*/run.json")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CacheError(f"no run folder with a run.json under {runs_dir}; run `make classify` first")
    return runs[-1]


def _image_files(target: Path) -> tuple[Path, list[Path]]:
    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise ConfigError(f"images {str(target)!r}: no such file or folder")
    files = sorted(p for p in target.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"images folder {target} is empty")
    return target, files


def check_request(meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse options that differ from the head's cache; name each difference."""
    diffs = []
    if "size" in expected and int(expected["size"]) != meta["image_size"]:
        diffs.append(f"size: head was trained on {meta['image_size']}px features, asked for {expected['size']}")
    if "layer" in expected and expected["layer"] != meta["layer"]:
        diffs.append(f"layer: head was trained on {meta['layer']}, asked for {expected['layer']}")
    if "backbone" in expected and expected["backbone"] != meta.get("backbone", "vgg16"):
        diffs.append(f"backbone: head was trained on {meta.get('backbone')} features, asked for {expected['backbone']}")
    if "weights" in expected:
        seed = meta.get("config", {}).get("seed", 0)
        wanted = backbone.weights_id(ExtractConfig(weights=str(expected["weights"]), seed=seed,
                                                   backbone=meta.get("backbone", "vgg16")))
        if wanted != meta["weights"]:
            diffs.append(f"weights: head was trained on {meta['weights']} features, asked for {wanted}")
    if diffs:
        raise ConfigError("the head does not match the requested backbone options: " + "; ".join(diffs))


def predict(target: str | Path, run_dir: str | Path | None = None, runs_dir: Path = RUNS_DIR,
            out: str | Path | None = None, expected: dict[str, Any] | None = None, batch_size: int = 32) -> Path:
    """Classify ``target`` (an image or a folder, recursive); returns the CSV written.

    Columns: path, class, probability (of that class), then one probability per class;
    files that cannot be decoded get an ``error`` instead.
    """
    import joblib

    run_dir = Path(run_dir) if run_dir else latest_run(runs_dir)
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise CacheError(f"{run_dir} has no run.json; give a run folder made by `make classify`")
    run_info = json.loads(run_file.read_text())
    meta = run_info["cache_meta"]
    check_request(meta, expected or {})
    head = joblib.load(run_dir / "winner.joblib")
    root, files = _image_files(Path(target))
    if run_info.get("model_input") == "images":  # an end-to-end fine-tuned model: no separate backbone
        return _write(_classify(files, lambda batch: head.predict_proba(batch), head, meta, batch_size), root,
                      meta["class_names"], out or run_dir / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv")

    source = meta.get("weights_source", "random")
    seed = meta.get("config", {}).get("seed", 0)
    cfg = ExtractConfig(backbone=meta.get("backbone", "vgg16"), size=meta["image_size"], layer=meta["layer"],
                        weights="none" if source == "random" else source, seed=seed, batch_size=batch_size)
    weights = backbone.Weights(meta["weights"], None if source == "random" else source, "")
    if weights.source and weights.source != "imagenet" and not Path(weights.source).is_file():
        raise ConfigError(f"the head's weights file {weights.source} is gone; put it back to predict with this head")
    model = backbone.build(cfg, weights)
    from_file = weights.source not in (None, "imagenet")
    sha = backbone.file_sha256(weights.source) if from_file else model.base_weights_sha256
    if sha != meta["weights_sha256"]:
        raise ConfigError(f"weights_sha256: the head's cache was made with weights {meta['weights_sha256'][:12]}..., "
                          f"these are {sha[:12]}...; the weights changed since the cache was made")

    rows = _classify(files, lambda batch: head.predict_proba(backbone.forward(model, batch, cfg.batch_size)), head,
                     meta, cfg.batch_size, cfg.decode_threads, cfg.decode_processes)
    return _write(rows, root, meta["class_names"], out or run_dir / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv")


def _classify(files: list[Path], proba_fn: Any, head: Any, meta: dict[str, Any], batch_size: int, threads: int = 2,
              processes: int = 0) -> list[dict[str, Any]]:
    """Rows of path, class, probability (+ one per class) or the decoding error."""
    class_names = meta["class_names"]
    rows: list[dict[str, Any]] = []
    paths = [str(f) for f in files]
    for batch in images.batches(paths, range(len(paths)), meta["image_size"], batch_size, threads, processes):
        if len(batch.rows):
            for i, p in zip(batch.rows, proba_fn(batch.images)):
                k = int(np.argmax(p))
                rows.append({"path": paths[i], "class": class_names[head.classes_[k]], "probability": f"{p[k]:.6f}",
                             "error": "", **{f"p_{class_names[c]}": f"{v:.6f}" for c, v in zip(head.classes_, p)}})
        rows += [{"path": paths[i], "class": "", "probability": "", "error": reason} for i, reason in batch.failed]
    return rows


def _write(rows: list[dict[str, Any]], root: Path, class_names: list[str], out: str | Path) -> Path:
    for r in rows:
        r["path"] = os.path.relpath(r["path"], root)
    out = Path(out)
    fields = ["path", "class", "probability"] + [f"p_{c}" for c in class_names] + ["error"]
    with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # file names as on disk
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))
    n_bad = sum(1 for r in rows if r["error"])
    log.info("predicted %d image(s)%s", len(rows) - n_bad, f"; {n_bad} could not be decoded" if n_bad else "")
    return out
