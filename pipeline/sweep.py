"""Stage two: expand a TOML grid of heads, fit every config on train in parallel, pick
the winner on validation alone, and only then score it once on test.

The sweep file lists heads, each with a value or a list of values per parameter::

    [[head]]
    name = "logreg"
    pooling = ["flatten", "avg"]
    C = [0.01, 0.1]
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import report, store
from .config import TRAIN_ON, ConfigError, SweepConfig, as_dict, load_toml
from .heads import HEADS, make_head

log = logging.getLogger(__name__)


def expand_grid(spec: dict[str, Any], source: str = "sweep file") -> list[tuple[str, dict[str, Any]]]:
    """[(head name, params)] for every combination, each checked before anything is fitted."""
    from sklearn.model_selection import ParameterGrid

    unknown = sorted(set(spec) - {"head"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; allowed: ['head'] "
                          "(the seed comes from --seed / SEED=)")
    heads = spec.get("head")
    if not heads or not isinstance(heads, list):
        raise ConfigError(f"{source}: no [[head]] tables; add at least one, e.g. [[head]] name = \"logreg\"")
    configs = []
    for number, table in enumerate(heads, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: head #{number} must be a [[head]] table with a name; received {table!r}")
        table = dict(table)
        name = table.pop("name", None)
        if name not in HEADS:
            raise ConfigError(f"{source}: unknown head {name!r}; available: {sorted(HEADS)}")
        grid = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
        empty = sorted(k for k, v in grid.items() if not v)
        if empty:
            raise ConfigError(f"{source}: head #{number} ({name}) has an empty list for {empty}; give at least one value")
        for params in ParameterGrid(grid):
            params = dict(params)
            head_params = {k: v for k, v in params.items() if k != "train_on"}
            if params.get("train_on", "clean") not in TRAIN_ON:
                raise ConfigError(f"{source}: train_on must be one of {TRAIN_ON}; received {params['train_on']!r}")
            make_head(name, **head_params)  # raises ConfigError naming a bad parameter or value
            configs.append((name, params))
    return configs


@dataclass
class SweepResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    winner: dict[str, Any]
    table: str


def _limit_threads(n: int | None) -> None:
    """Give TensorFlow ``n`` threads in this worker: 2 workers x 1 thread on 2 cores (None: leave as is)."""
    if n is None:
        return
    for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"


def _fit_one(index: int, name: str, params: dict[str, Any], seed: int, threads: int | None, train: dict[str, Any],
             x_val: np.ndarray, y_val: np.ndarray) -> tuple[dict[str, Any], Any, bytes]:
    """Fit and score one config; the head comes back pickled, so the parent pays for
    unpickling (a Keras load for an MLP) only for the winner."""
    import io

    import joblib
    from sklearn.metrics import accuracy_score, log_loss

    _limit_threads(threads)
    params = dict(params)
    train_on = params.pop("train_on", train["default"])
    head = make_head(name, **{"random_state": seed, **params})
    x_fit, y_fit = training_rows(train, train_on)
    t0 = time.perf_counter()
    head.fit(x_fit, y_fit)
    seconds = time.perf_counter() - t0
    proba = head.predict_proba(x_val)
    row = {"index": index, "head": name, "pooling": head.pooling, "train_on": train_on, "train_rows": len(y_fit),
           "params": json.dumps({k: v for k, v in params.items() if k != "pooling"}, sort_keys=True),
           "val_accuracy": float(accuracy_score(y_val, head.classes_[proba.argmax(1)])),
           "val_log_loss": float(log_loss(y_val, proba, labels=head.classes_)), "fit_seconds": seconds,
           "epochs": len(head.history_["loss"]) if hasattr(head, "history_") else None,
           "full_params": head.get_params()}
    buffer = io.BytesIO()
    joblib.dump(head, buffer)
    return row, getattr(head, "history_", None), buffer.getvalue()


def training_rows(train: dict[str, Any], train_on: str) -> tuple[np.ndarray, np.ndarray]:
    """Clean train rows, the cached augmented views, or both stacked."""
    if train_on == "clean":
        return train["x"], train["y"]
    if train["views_x"] is None:
        raise ConfigError(f"train_on={train_on!r} needs augmented views in the cache; make them with "
                          "`make extract AUGMENT=K` (same options)")
    if train_on == "views":
        return train["views_x"], train["views_y"]
    return np.concatenate([train["x"], train["views_x"]]), np.concatenate([train["y"], train["views_y"]])


def load_views(cache: Path, meta: dict[str, Any], limit: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The cached augmented views of train, stacked (validation and test never have any)."""
    names = meta.get("augment", {}).get("splits", [])[:limit]
    if not names:
        return None, None
    parts = [store.load_split(cache, name)[:2] for name in names]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _splits(cfg: SweepConfig, cache: Path, meta: dict[str, Any]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    from sklearn.model_selection import train_test_split

    notes = []
    if "train" not in meta["splits"]:
        raise store.CacheError(f"{cache} has no train split (it has {meta['splits']}); nothing to train on")
    data = {s: store.load_split(cache, s)[:2] for s in ("train", "validation", "test") if s in meta["splits"]}
    if "validation" not in data:
        x, y = data["train"]
        try:
            xt, xv, yt, yv = train_test_split(x, y, test_size=cfg.validation_fraction, stratify=y, random_state=cfg.seed)
        except ValueError as e:
            raise ConfigError(f"{cache}: no validation split, and train is too small to carve a stratified "
                              f"{cfg.validation_fraction:.0%} from it ({e})") from e
        data["train"], data["validation"] = (xt, yt), (xv, yv)
        notes.append(f"no validation split in the cache: carved a stratified {cfg.validation_fraction:.0%} of train "
                     f"({len(yv)} rows, seed {cfg.seed}) for selection")
    if "test" not in data:
        notes.append("no test split in the cache: the winner is not tested")
    known = set(np.unique(data["train"][1]).tolist())
    for split, (_, y) in data.items():
        unseen = sorted(set(np.unique(y).tolist()) - known)
        if unseen:
            names = [meta.get("class_names", [])[c] if c < len(meta.get("class_names", [])) else c for c in unseen]
            raise ConfigError(f"{cache}: split {split!r} holds class(es) {names} that train lacks; "
                              "no head can predict them (re-split the data so train has every class)")
        if len(np.unique(y)) < 2:
            raise ConfigError(f"{cache}: split {split!r} holds a single class ({meta['class_names'][int(y[0])]!r}); "
                              "a classifier needs two or more")
    return data, notes


def run_sweep(cfg: SweepConfig, cache_path: str | Path) -> SweepResult:
    """Fit every config of ``cfg.sweep_file`` on ``cache_path``; write and return the run."""
    import io

    import joblib
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss

    cache = Path(cache_path)
    meta = store.read_meta(cache)
    spec = load_toml(cfg.sweep_file)
    configs = expand_grid(spec, str(cfg.sweep_file))
    data, notes = _splits(cfg, cache, meta)
    for note in notes:
        log.info(note)
    (x_train, y_train), (x_val, y_val) = data["train"], data["validation"]
    wants_views = any(p.get("train_on", cfg.train_on) != "clean" for _, p in configs)
    views_x, views_y = load_views(cache, meta, cfg.views) if wants_views else (None, None)
    if "validation" not in meta["splits"] and views_x is not None:
        raise ConfigError(f"{cache}: training on views needs a validation split in the cache (a validation set "
                          "carved from train would hold images whose views are trained on)")
    train = {"x": x_train, "y": y_train, "views_x": views_x, "views_y": views_y, "default": cfg.train_on}
    n_jobs = min(cfg.n_jobs if cfg.n_jobs > 0 else (os.cpu_count() or 1), len(configs))
    threads = max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else None
    log.info("sweeping %d configs on %s (train %d%s, validation %d) with %d worker(s)", len(configs), cache.name,
             len(y_train), f" + {len(views_y)} view rows" if views_y is not None else "", len(y_val), n_jobs)
    t0 = time.perf_counter()
    results = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_fit_one)(i, name, params, cfg.seed, threads, train, x_val, y_val)
        for i, (name, params) in enumerate(configs))
    rows = [r for r, _, _ in results]
    histories = [h for _, h, _ in results]
    full_params = [r.pop("full_params") for r in rows]
    _show_varying_params(rows)
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_log_loss"], i))
    rows[best]["winner"] = True
    winner_bytes = results[best][2]
    winner = joblib.load(io.BytesIO(winner_bytes))
    del results
    eval_split = "test" if "test" in data else "validation"
    x_eval, y_eval = data[eval_split]
    proba = winner.predict_proba(x_eval)
    if eval_split == "test":
        rows[best]["test_accuracy"] = float(accuracy_score(y_eval, winner.classes_[proba.argmax(1)]))
        rows[best]["test_log_loss"] = float(log_loss(y_eval, proba, labels=winner.classes_))
    sweep_seconds = time.perf_counter() - t0

    run_dir = new_run_dir(cfg)
    report.write_csv(rows, run_dir / "results.csv")
    (run_dir / "winner.joblib").write_bytes(winner_bytes)
    if hasattr(winner, "save_keras"):
        winner.save_keras(run_dir / "winner.keras")
    class_names = meta["class_names"]
    for row, history in zip(rows, histories):
        if history:
            (run_dir / "curves").mkdir(exist_ok=True)
            report.plot_learning_curves(history, run_dir / "curves" / f"{row['index']:02d}-{row['head']}.png",
                                        f"#{row['index']} {row['head']} {row['pooling']} {row['params']}")
    cm = confusion_matrix(y_eval, winner.classes_[proba.argmax(1)], labels=np.arange(len(class_names)))
    report.plot_confusion_matrix(cm, class_names, run_dir / "confusion.png",
                                 f"winner #{best} ({rows[best]['head']}) on {eval_split}")
    cache_meta = {k: v for k, v in meta.items() if k != "paths"}
    run_info = {"config": as_dict(cfg), "sweep": spec, "cache": str(cache.resolve()), "cache_meta": cache_meta,
                "argv": sys.argv, "seed": cfg.seed, "notes": notes, "sweep_seconds": sweep_seconds,
                "winner": {**rows[best], "params": full_params[best]}, "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    table = report.results_table(rows)
    summary = (f"{len(rows)} configs in {sweep_seconds:.1f} s; winner #{best} {rows[best]['head']} "
               f"({rows[best]['pooling']} {rows[best]['params']}): validation accuracy {rows[best]['val_accuracy']:.4f}"
               + (f", test accuracy {rows[best]['test_accuracy']:.4f}" if eval_split == "test" else ", no test split"))
    return SweepResult(run_dir, rows, rows[best], "\n".join([table, *notes, summary]))


def _show_varying_params(rows: list[dict[str, Any]]) -> None:
    """Keep in each row's ``params`` only what varies between configs of the same head
    (run.json has the full sweep), so the table stays readable."""
    for head in {r["head"] for r in rows}:
        mine = [r for r in rows if r["head"] == head]
        parsed = [{k: v for k, v in json.loads(r["params"]).items() if k != "train_on"} for r in mine]
        keys = {k for p in parsed for k in p}
        varying = sorted(k for k in keys if len({json.dumps(p.get(k)) for p in parsed}) > 1)
        for r, p in zip(mine, parsed):
            r["params"] = json.dumps({k: p[k] for k in varying if k in p})


def new_run_dir(cfg: SweepConfig) -> Path:
    """runs/<time>-<name>, never an existing folder."""
    base = Path(cfg.runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}"
    path, k = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            k += 1
            path = base.with_name(f"{base.name}-{k}")


def _versions() -> dict[str, str]:
    import joblib
    import sklearn

    from . import __version__

    out = {"featcache": __version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
           "joblib": joblib.__version__, "python": sys.version.split()[0]}
    if "keras" in sys.modules:
        out["keras"] = sys.modules["keras"].__version__
    return out
