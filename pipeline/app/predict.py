"""New images -> the same frozen backbone the head was trained on -> saved head -> CSV.

The run folder pins everything: the cache's backbone, weights (and their SHA-256),
layer, input size and preprocessing. A request that differs, or weights whose bytes
changed since, is refused with the field that differs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import models
from pipeline.cache.store import CacheKey, CacheMeta
from pipeline.core import paths
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.layers import load_model_safely
from pipeline.features import backbone, images, quantize, tta_views
from pipeline.features.precision import resolve
from pipeline.features.weights import Weights, check_file_unchanged, verify_weights, weights_id
from pipeline.runs import folder
from pipeline.train.persist import load_head, load_winner

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("backbone", "size", "layer", "weights", "precision")


def latest_run(runs_dir: Path) -> Path:
    """The newest run folder that holds a head (classify or finetune; not compare)."""
    runs_ = sorted(
        (p.parent for p in Path(runs_dir).glob("*/run.json") if '"cache_meta"' in p.read_text()),
        key=lambda p: p.stat().st_mtime,
    )
    if not runs_:
        raise CacheError(f"no run folder with a run.json under {runs_dir}; run `make classify` first")
    return runs_[-1]


def _image_files(target: Path) -> tuple[Path, list[Path]]:
    if target.is_file():
        return target.parent, [target]
    if not target.is_dir():
        raise ConfigError(f"images {str(target)!r}: no such file or folder")
    files = sorted(p for p in target.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"images folder {target} is empty")
    return target, files


def check_request(meta: CacheMeta, request: dict[str, Any]) -> None:
    """Refuse options that differ from the head's cache; name each field that differs."""
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for predict; known: {list(REQUEST_FIELDS)}")
    asked = {k: v for k, v in request.items() if v is not None}
    if "size" in asked:
        asked["size"] = int(asked["size"])
    if asked.get("precision") == "auto":
        asked["precision"] = resolve("auto").precision
    if "weights" in asked:
        asked["weights"] = weights_id(str(asked["weights"]), meta.seed)
    wanted = CacheKey(**{**dataclasses.asdict(meta.key()), **asked})
    diffs = meta.key().diff(wanted, fields=sorted(asked))
    if diffs:
        raise ConfigError(
            "the head does not match the requested backbone options (the head's cache vs the request): "
            + "; ".join(diffs)
        )


def predict(
    target: str | Path,
    run_dir: str | Path | None = None,
    runs_dir: Path | None = None,
    out: str | Path | None = None,
    request: dict[str, Any] | None = None,
    batch_size: int = 32,
    trust_pickle: bool = False,
    model_dir: str | Path | None = None,
) -> Path:
    """Classify ``target`` (an image or a folder, recursive); returns the CSV written.

    Columns: path, class, probability (of that class), then one probability per class;
    files that cannot be decoded get an ``error`` instead (and are listed in the log).
    ``model_dir``: a folder written by ``featcache export``, run alone (no cache, no weights
    file, no run folder).

    A run scored with test-time views (run.json ``tta``) predicts the mean over each image and
    the same views; augmented views are seeded by the image's path relative to ``target``, so
    predicting on the data root reproduces the sweep's figures on its images exactly. A run
    whose ensemble won averages its members (``persist.load_winner``).
    """
    if model_dir is not None:
        if run_dir is not None:
            raise ConfigError("give either --run or --model (an export folder), not both")
        return _predict_export(Path(model_dir), Path(target), out, request or {}, batch_size)
    run_dir = Path(run_dir) if run_dir else latest_run(runs_dir or paths.runs_dir())
    info = folder.read_run(run_dir)
    meta = CacheMeta.from_dict(info["cache_meta"])
    check_request(meta, request or {})
    root, files = _image_files(Path(target))
    out = Path(out) if out else run_dir / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    proba_fn, head = reference(run_dir, info, meta, batch_size, trust_pickle)
    labels = [meta.class_names[c] for c in head.classes_]
    decode = ExtractConfig()
    rows = _classify(
        files, proba_fn, labels, meta.size, batch_size, decode.decode_threads, decode.decode_processes, root=root
    )
    return _write(rows, root, meta.class_names, out)


def reference(
    run_dir: Path,
    info: dict[str, Any],
    meta: CacheMeta,
    batch_size: int = 32,
    trust_pickle: bool = False,
    model: Any = None,
) -> tuple[Callable[[np.ndarray, Sequence[str] | None], np.ndarray], Any]:
    """predict's own way from a batch of uint8 images to probabilities (columns in the head's
    ``classes_`` order), and the head: the pinned backbone (weights checked) and the saved
    head (an ensemble's members averaged). With test-time views (run.json ``tta``) the batch's
    paths relative to the data root seed the views; the mirror needs none. ``featcache export``
    checks its model against this very function (passing the backbone ``model`` it built and
    checked from the same pins, to build it once)."""
    if info.get("model_input") == "images":  # an end-to-end fine-tuned model: no separate backbone
        head = load_head(run_dir, trust_pickle=trust_pickle, versions=info.get("versions"))
        return (lambda batch, _=None: head.predict_proba(batch)), head
    source = meta.weights_source
    check_file_unchanged(source, meta.weights_file_sha256, f"the head in {run_dir}")
    head = load_winner(run_dir, info, trust_pickle=trust_pickle)
    pinned = Weights(meta.weights, None if source == "random" else source, meta.weights_file_sha256, meta.seed)
    if meta.precision == "int8":  # the quantised model the features came from, kept in the run folder
        model = _int8_model(run_dir, meta)
    elif model is None:
        model = backbone.build(
            meta.backbone, size=meta.size, layer=meta.layer, weights=pinned, precision=meta.precision
        )
        verify_weights(model.base_weights_sha256, meta.weights_sha256, f"the head in {run_dir}")
    tta = info.get("tta") or {}

    def proba(batch: np.ndarray, rel_paths: Sequence[str] | None = None) -> np.ndarray:
        views = (
            tta_views.of_images(batch, _seeds(rel_paths, len(batch), tta), int(tta["views"]), int(tta["seed"]))
            if tta
            else []
        )
        return np.mean([head.predict_proba(backbone.forward(model, b, batch_size)) for b in (batch, *views)], axis=0)

    return proba, head


def _seeds(rel_paths: Sequence[str] | None, n: int, tta: dict[str, Any]) -> Sequence[str]:
    """The relative paths that seed an image's policy views; only the mirror (view 1) needs none."""
    if rel_paths is not None:
        return rel_paths
    if int(tta.get("views", 0)) > 1:
        raise ValueError("test-time views beyond the mirror are seeded by each image's path: pass the paths")
    return [""] * n


def _predict_export(
    model_dir: Path, target: Path, out: str | Path | None, request: dict[str, Any], batch_size: int
) -> Path:
    """``predict --model EXPORT``: the exported model.keras alone (loaded in safe mode)."""
    record = read_export(model_dir)
    asked = {k: v for k, v in request.items() if v is not None}
    if asked:
        raise ConfigError(
            f"--model {model_dir} runs the exported model as it is; leave out {sorted(asked)} "
            "(the export pins backbone, size, layer, weights and precision)"
        )
    root, files = _image_files(target)
    out = (
        Path(out) if out else Path.cwd() / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    )  # never into the export
    model = load_model_safely(model_dir / record["files"]["keras"])

    def proba(batch: np.ndarray, _: Sequence[str] | None = None) -> np.ndarray:
        return np.asarray(model.predict_on_batch(batch), np.float64)

    rows = _classify(files, proba, record["labels"], int(record["input_size"]), batch_size)
    return _write(rows, root, record["class_names"], out)


EXPORT_RECORD = "export.json"


def read_export(model_dir: Path) -> dict[str, Any]:
    """An export folder's export.json, checked for the fields predict needs."""
    model_dir = Path(model_dir)
    record_file = model_dir / EXPORT_RECORD
    if not model_dir.is_dir() or not record_file.is_file():
        raise ConfigError(
            f"--model {str(model_dir)!r} is not an export folder (no {EXPORT_RECORD}); give a folder made by "
            "`featcache export` (make export RUN=...)"
        )
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{record_file} is not readable JSON ({e}); the export folder is damaged") from e
    needed = ("labels", "class_names", "input_size", "files", "precision")
    missing = [k for k in needed if not isinstance(record, dict) or k not in record]
    if missing or "keras" not in record.get("files", {}):
        raise CacheError(f"{record_file} lacks {missing or ['files.keras']}; export the run again")
    if record["precision"] == "int8":
        raise ConfigError(
            f"{model_dir} is an int8 export (OpenVINO model + head); predict --model runs Keras exports: "
            "use --run with the run folder, or load int8/model.xml with OpenVINO"
        )
    return record


def _int8_model(run_dir: Path, meta: CacheMeta) -> quantize.OpenVINOEngine:
    recorded = meta.info.get("int8") or {}
    folder = run_dir / "int8-model"
    if not (folder / models.MODEL_FILES[1]).exists() or "model_sha256" not in recorded:
        raise CacheError(
            f"{run_dir} holds a head trained on int8 features but not the quantised model that made them "
            f"({folder} is missing); run `make classify` again on the int8 cache"
        )
    return quantize.load(folder, recorded["model_sha256"])


def _classify(
    files: list[Path],
    proba_fn: Callable[[np.ndarray, Sequence[str] | None], np.ndarray],
    labels: Sequence[str],
    size: int,
    batch_size: int,
    threads: int = 2,
    processes: int = 0,
    root: Path | None = None,
) -> list[dict[str, Any]]:
    """Rows of path, class, probability (+ one per class) or the decoding error; ``labels``
    names the columns ``proba_fn(images, paths relative to root)`` returns."""
    rows: list[dict[str, Any]] = []
    paths = [str(f) for f in files]
    for batch in images.batches(paths, range(len(paths)), size, batch_size, threads, processes):
        if len(batch.rows):
            rel = [os.path.relpath(paths[i], root) if root is not None else paths[i] for i in batch.rows]
            for i, p in zip(batch.rows, proba_fn(batch.images, rel), strict=True):
                k = int(np.argmax(p))
                rows.append(
                    {
                        "path": paths[i],
                        "class": labels[k],
                        "probability": f"{p[k]:.6f}",
                        "error": "",
                        **{f"p_{name}": f"{v:.6f}" for name, v in zip(labels, p, strict=True)},
                    }
                )
        rows += [{"path": paths[i], "class": "", "probability": "", "error": reason} for i, reason in batch.failed]
    return rows


def _write(rows: list[dict[str, Any]], root: Path, class_names: Sequence[str], out: Path) -> Path:
    for r in rows:
        r["path"] = os.path.relpath(r["path"], root)
    fields = ["path", "class", "probability"] + [f"p_{c}" for c in class_names] + ["error"]
    with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # names need not be UTF-8
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))
    bad = [r for r in rows if r["error"]]
    for r in bad:
        log.warning("could not decode %s: %s", r["path"], r["error"])
    n_bad = len(bad)
    log.info("predicted %d image(s)%s", len(rows) - n_bad, f"; {n_bad} could not be decoded" if n_bad else "")
    return out
