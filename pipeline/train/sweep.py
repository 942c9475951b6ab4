"""Stage two: expand a TOML grid of heads, fit every config on train in parallel, pick
the winner on validation alone, and only then score it once on test.

The sweep file lists heads, each with a value or a list of values per parameter::

    tta = true        # optional: score every head on the mean over each image's cached test-time views
    ensemble = 3      # optional: the mean of the top-3 configs by validation is one more row
    cv = 5            # optional: select on 5-fold out-of-fold predictions over train + validation (crossval.py)

    [[head]]
    name = "logreg"
    pooling = ["flatten", "avg"]
    C = [0.01, 0.1]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import models, store
from pipeline.core import accounting, lean
from pipeline.core.config import SweepConfig, as_dict, load_toml
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.memory import parse_budget
from pipeline.core.vocab import SPLITS, TRAIN_ON, check_choice
from pipeline.runs import plots, report, tracking
from pipeline.runs.folder import RunFolder, score, text_table
from pipeline.train import crossval, ensemble, exclude, regpath, search, stream
from pipeline.train.heads import HEADS, _KerasHead
from pipeline.train.persist import save_head
from pipeline.train.splits import load_splits, load_views, training_rows, without
from pipeline.train.sweep_file import head_tables, make_head

log = logging.getLogger(__name__)

OPTION_KEYS = ("tta", "ensemble", "cv")  # top-level sweep-file keys beside [[head]] (and search/trials)


def sweep_options(spec: dict[str, Any], source: str = "sweep file") -> tuple[dict[str, Any], bool, int]:
    """(the spec without ``OPTION_KEYS``, tta, ensemble k), both checked: ``tta = true|false``,
    ``ensemble = k`` (an integer >= 0; 0 or 1 is no ensemble)."""
    tta, k = spec.get("tta", False), spec.get("ensemble", 0)
    if not isinstance(tta, bool):
        raise ConfigError(f"{source}: tta must be true or false; received tta = {tta!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(
            f"{source}: ensemble must be an integer >= 0 (the top-k configs averaged; 0 or 1 is none); "
            f"received ensemble = {k!r}"
        )
    return {key: v for key, v in spec.items() if key not in OPTION_KEYS}, tta, k


def expand_grid(spec: dict[str, Any], source: str = "sweep file") -> list[tuple[str, dict[str, Any]]]:
    """[(head name, params)] for every combination, each checked before anything is fitted."""
    from sklearn.model_selection import ParameterGrid

    unknown = sorted(set(spec) - {"head"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {unknown}; allowed: ['head', 'tta', 'ensemble', 'cv'] "
            "(the seed comes from --seed / SEED=)"
        )
    configs = []
    for number, name, table in head_tables(spec, source):
        grid = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
        empty = sorted(k for k, v in grid.items() if not v)
        if empty:
            raise ConfigError(
                f"{source}: head #{number} ({name}) has an empty list for {empty}; give at least one value"
            )
        for params in ParameterGrid(grid):
            params = dict(params)
            head_params = {k: v for k, v in params.items() if k != "train_on"}
            check_choice("train_on", params.get("train_on", "clean"), TRAIN_ON, str(source))
            try:
                make_head(name, **head_params)  # raises ConfigError naming a bad parameter or value
            except ConfigError as e:
                raise ConfigError(f"{source}: head #{number}: {e}") from e
            configs.append((name, params))
    return configs


@dataclass
class SweepResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    winner: dict[str, Any]
    table: str
    selected_on: str = "validation"  # or "out of fold" (cv): what the winner's val_accuracy is


@dataclass
class SweepData:
    """What the heads see: train (clean and views), validation for selection, test once."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    views: tuple[np.ndarray, np.ndarray] | None
    default_train_on: str
    notes: list[str]
    streams: dict[str, Any] | None = None  # train_on -> stream.StreamSource when train is read in chunks
    excluded: dict[str, Any] | None = None  # --exclude: the file and the train rows it dropped (run.json)
    tta: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # split -> its views, row-aligned
    train_tta: tuple[np.ndarray, np.ndarray] | None = None  # train's test-time views, stacked (train_on="tta")
    flops_per_image: float = 0.0  # of the cache's backbone (0: not tabulated), for compute accounting

    def training_rows(self, train_on: str) -> tuple[np.ndarray, np.ndarray]:
        return training_rows(self.train, self.views, train_on, self.train_tta)

    def proba(self, head: Any, split: str) -> np.ndarray:
        """``head``'s probabilities on validation or test: with test-time views, the mean over
        each image's clean row and its views (one image, one prediction)."""
        x = self.validation[0] if split == "validation" else self.test[0]  # type: ignore[index]
        views = self.tta.get(split, [])
        if not views:
            return np.asarray(head.predict_proba(x))
        return np.mean([head.predict_proba(x), *(head.predict_proba(v) for v in views)], axis=0)

    def passes(self, train_rows: int) -> float | None:
        """Backbone passes a config used, views included, in seed-recipe 180 px equivalents:
        its training rows plus every validation and test image it scored (times its views)."""
        scored = len(self.validation[1]) * (1 + len(self.tta.get("validation", [])))
        if self.test is not None:
            scored += len(self.test[1]) * (1 + len(self.tta.get("test", [])))
        return accounting.recipe_passes(train_rows + scored, self.flops_per_image)


COLUMNS = (
    "index",
    "head",
    "pooling",
    "params",
    "train_on",
    "train_rows",
    "passes",
    "val_accuracy",
    "val_log_loss",
    "fit_seconds",
    "epochs",
    "test_accuracy",
    "test_log_loss",
    "winner",
)


def check_classes(cache: Path, meta: store.CacheMeta, labels: dict[str, np.ndarray]) -> None:
    """Every split holds two or more classes, and none that train lacks (``labels["train"]``)."""
    known = set(np.unique(labels["train"]).tolist())
    for split, y in labels.items():
        unseen = sorted(set(np.unique(y).tolist()) - known)
        if unseen:
            raise ConfigError(
                f"{cache}: split {split!r} holds class(es) {[meta.class_names[c] for c in unseen]} that "
                "train lacks; no head can predict them (re-split the data so train has every class)"
            )
        if len(np.unique(y)) < 2:
            raise ConfigError(
                f"{cache}: split {split!r} holds a single class ({meta.class_names[int(y[0])]!r}); "
                "a classifier needs two or more"
            )


def load_data(
    cfg: SweepConfig, cache: Path, meta: store.CacheMeta, wants_views: bool, tta: bool = False, train_tta: bool = False
) -> SweepData:
    """Read the splits; carve validation from train when the cache has none; check classes.
    ``tta``: load validation's and test's test-time views; ``train_tta``: train's (train_on="tta")."""
    data = _load_data(cfg, cache, meta, wants_views, train_tta)
    data.flops_per_image = float(meta.info.get("flops_per_image") or 0.0)
    if tta:
        data.tta = {s: _tta_views(cache, meta, s) for s in ("validation", "test") if s in meta.splits}
        data.notes.append(
            f"tta: validation and test scored on the mean over each image and its {len(data.tta['validation'])} "
            "cached test-time view(s)"
        )
    return data


def _tta_views(cache: Path, meta: store.CacheMeta, split: str, paths: list[str] | None = None) -> list[np.ndarray]:
    """The cached test-time views of ``split``, each row-aligned by path with the clean split (or ``paths``)."""
    names = meta.tta_splits(split)
    if not names:
        raise ConfigError(
            f"--tta (or tta = true, or train_on = 'tta' with cv) needs test-time views of {split} in {cache}, "
            "which has none; make them with `make extract TTA_VIEWS=N` (same options; 1 is the mirror)"
        )
    if paths is None:
        _, _, paths = store.load_split(cache, split)
    out = []
    for name in names:
        x, _, view_paths = store.load_split(cache, name)
        row = {p: i for i, p in enumerate(view_paths)}
        missing = [p for p in paths if p not in row]
        if missing:
            raise CacheError(
                f"{cache}: view split {name!r} lacks {len(missing)} image(s) of {split} ({missing[:3]}); "
                "rebuild the views with `make extract TTA_VIEWS=N FORCE=1`"
            )
        out.append(x[[row[p] for p in paths]])
    return out


def _load_data(cfg: SweepConfig, cache: Path, meta: store.CacheMeta, wants_views: bool, train_tta: bool) -> SweepData:
    """Streamed train when it would not fit the memory budget (or ``--stream on``), else in memory."""
    notes: list[str] = []
    if "train" not in meta.splits:
        raise store.CacheError(f"{cache} has no train split (it has {list(meta.splits)}); nothing to train on")
    views_used = meta.view_splits[: cfg.views] if wants_views else []
    tta_used = meta.tta_splits("train") if train_tta else []
    if train_tta and not tta_used:
        training_rows((np.empty(0), np.empty(0)), None, "tta")  # the ConfigError that says how to make them
    streaming, why = stream.plan_training(
        cache,
        ["train", *views_used, *tta_used],
        meta.split_sizes,
        meta.feature_shape,
        cfg.stream,
        parse_budget(cfg.memory_budget),
    )
    notes.append(why)
    if streaming:
        if cfg.exclude is not None:
            raise ConfigError(
                f"--exclude needs train in memory, and {cache} would be streamed: pass --stream off "
                "(or a larger --memory-budget)"
            )
        return _streaming_data(cfg, cache, meta, views_used, notes, tta_used)
    return _in_memory_data(cfg, cache, meta, wants_views, notes, tta_used)


def _in_memory_data(
    cfg: SweepConfig, cache: Path, meta: store.CacheMeta, wants_views: bool, notes: list[str], tta_used: list[str]
) -> SweepData:
    """Every split in memory: train less ``--exclude``'s rows, validation carved from it when the
    cache has none, then the views (clean or test-time) that training asks for."""
    data = load_splits(cache, meta, [s for s in SPLITS if s != "train"])
    listed, excluded, _ = _train_without_excluded(cfg, cache, data, notes)
    if "validation" not in data:
        _carve_validation(cfg, cache, data, notes)
    if "test" not in data:
        notes.append("no test split in the cache: the winner is not tested")
    check_classes(cache, meta, {s: y for s, (_, y) in data.items()})
    views = load_views(cache, meta, cfg.views, listed) if wants_views else None
    if (views is not None or tta_used) and "validation" not in meta.splits:
        raise ConfigError(
            f"{cache}: training on views needs a validation split in the cache (a validation set "
            "carved from train would hold images whose views are trained on)"
        )
    train_views = None
    if tta_used:
        parts = [without(store.load_split(cache, name), listed)[0] for name in tta_used]
        train_views = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    return SweepData(
        data["train"],
        data["validation"],
        data.get("test"),
        views,
        cfg.train_on,
        notes,
        excluded=excluded,
        train_tta=train_views,
    )


def _train_without_excluded(
    cfg: SweepConfig, cache: Path, data: dict[str, Any], notes: list[str]
) -> tuple[frozenset[str], dict[str, Any] | None, list[str]]:
    """Put train into ``data`` less the rows ``--exclude`` lists; (the listed paths, run.json's record,
    the paths of the train rows kept)."""
    listed = exclude.read_exclude(cfg.exclude) if cfg.exclude is not None else frozenset()
    split = store.load_split(cache, "train")
    data["train"], dropped = without(split, listed)
    gone = set(dropped)
    kept = [p for p in split[2] if p not in gone]
    excluded = exclude.record(cfg.exclude, listed, dropped) if cfg.exclude is not None else None
    if excluded is not None:
        notes.append(
            f"--exclude {cfg.exclude}: {len(dropped)} of its {len(listed)} listed path(s) were train rows, "
            f"left out of training ({len(data['train'][1])} train rows remain); validation and test keep every row"
        )
    return listed, excluded, kept


def _carve_validation(cfg: SweepConfig, cache: Path, data: dict[str, Any], notes: list[str]) -> None:
    """The cache has no validation split: a stratified ``cfg.carve_fraction`` of train becomes it."""
    from sklearn.model_selection import train_test_split

    x, y = data["train"]
    try:
        xt, xv, yt, yv = train_test_split(x, y, test_size=cfg.carve_fraction, stratify=y, random_state=cfg.seed)
    except ValueError as e:
        raise ConfigError(
            f"{cache}: no validation split, and train is too small to carve a stratified "
            f"{cfg.carve_fraction:.0%} from it ({e})"
        ) from e
    data["train"], data["validation"] = (xt, yt), (xv, yv)
    notes.append(
        f"no validation split in the cache: carved a stratified {cfg.carve_fraction:.0%} of train "
        f"({len(yv)} rows, seed {cfg.seed}) for selection"
    )


def _streaming_data(
    cfg: SweepConfig,
    cache: Path,
    meta: store.CacheMeta,
    views_used: list[str],
    notes: list[str],
    tta_used: list[str] | None = None,
) -> SweepData:
    """Train stays in the file (labels only in memory); validation and test are loaded."""

    if "validation" not in meta.splits:
        raise ConfigError(
            f"{cache}: streaming needs a validation split in the cache (a carved one would need train "
            "in memory); re-extract with a validation fraction, or pass --stream off"
        )
    sources = {"clean": stream.source_for(cache, ["train"], meta.feature_shape)}
    if views_used:
        sources["views"] = stream.source_for(cache, views_used, meta.feature_shape)
        sources["both"] = stream.source_for(cache, ["train", *views_used], meta.feature_shape)
    if tta_used:
        sources["tta"] = stream.source_for(cache, ["train", *tta_used], meta.feature_shape)
    train = (np.empty((0, *meta.feature_shape), np.float32), sources["clean"].labels)
    views = (np.empty((0, *meta.feature_shape), np.float32), sources["views"].labels) if views_used else None
    data = load_splits(cache, meta, ("validation", "test"))
    check_classes(cache, meta, {"train": train[1], **{s: y for s, (_, y) in data.items()}})
    if "test" not in data:
        notes.append("no test split in the cache: the winner is not tested")
    return SweepData(train, data["validation"], data.get("test"), views, cfg.train_on, notes, streams=sources)


def _tf_threads(n: int | None) -> None:
    """TensorFlow reads its thread counts when it starts: set them in a worker before it
    does (BLAS pools are limited by joblib's ``inner_max_num_threads``)."""
    if n is None or "tensorflow" in sys.modules:
        return
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(n)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"


def fit_one(
    index: int, name: str, params: dict[str, Any], seed: int, threads: int | None, data: SweepData
) -> tuple[dict[str, Any], Any, bytes]:
    """Fit and score one config on validation. The head comes back as bytes, so the parent
    pays for loading (a Keras load for an MLP) only for the winner; these bytes never leave
    the process tree (the run folder holds a safe format)."""
    _tf_threads(threads)
    params = dict(params)
    train_on = params.pop("train_on", data.default_train_on)
    head = make_head(name, **{"random_state": seed, **params})
    t0 = time.perf_counter()
    if data.streams is not None:
        if train_on not in data.streams:
            training_rows(data.train, None, train_on)  # the ConfigError that says how to make views
        y_fit = data.streams[train_on].labels
        stream.fit_streaming(head, data.streams[train_on])
    else:
        x_fit, y_fit = data.training_rows(train_on)
        head.fit(x_fit, y_fit)
    seconds = time.perf_counter() - t0
    return _scored(index, name, params, train_on, head, y_fit, seconds, data)


def _scored(
    index: int,
    name: str,
    params: dict[str, Any],
    train_on: str,
    head: Any,
    y_fit: np.ndarray,
    seconds: float,
    data: SweepData,
) -> tuple[dict[str, Any], Any, bytes]:
    """The row, the curves and the head as bytes for one fitted config."""
    import io

    import joblib

    val_proba = data.proba(head, "validation")
    val_accuracy, val_log_loss = score(val_proba, data.validation[1], head.classes_)
    row = {
        "index": index,
        "head": name,
        "pooling": head.pooling,
        "train_on": train_on,
        "train_rows": len(y_fit),
        "passes": data.passes(len(y_fit)),
        "n_features": int(head.n_features_in_),
        "params": json.dumps({k: v for k, v in params.items() if k != "pooling"}, sort_keys=True),
        "val_accuracy": val_accuracy,
        "val_log_loss": val_log_loss,
        "fit_seconds": seconds,
        "epochs": len(head.history_["loss"]) if hasattr(head, "history_") else None,
        "full_params": head.get_params(),
        "val_proba": val_proba,  # popped by the parent: cross-validation's out-of-fold rows
    }
    buffer = io.BytesIO()
    joblib.dump(head, buffer)
    return row, getattr(head, "history_", None), buffer.getvalue()


def _keras_first(keras: bool) -> None:
    """Import Keras at the start of every task of a sweep that has a Keras head, so that a
    worker's first task already holds TensorFlow. loky measures a worker's memory after its
    first task and replaces the worker once it grows 300 MB past that, warning "A worker
    stopped while some jobs were given to the executor ... memory leak". Importing TensorFlow
    (about 800 MB) in a worker whose first task was a scikit-learn head tripped it: not a leak
    (a Keras fit adds about 10 MB), but the worker was killed and the next MLP paid the
    import again in a fresh one. A no-op once imported. Through ``lean``: both workers pay
    this import in a sweep with MLPs, and the lean one costs about half (BENCHMARKS.md section 8)."""
    if keras:
        lean.import_keras()


def fit_path(
    indices: list[int],
    configs: list[tuple[str, dict[str, Any]]],
    seed: int,
    threads: int | None,
    data: SweepData,
    keras: bool = False,
) -> list[tuple[dict[str, Any], Any, bytes]]:
    """Logistic regressions that differ only in C, fitted as one warm-started path on data
    pooled and standardised once (``regpath.fit_logreg_path``); each keeps its own row and head,
    and its ``fit_seconds`` is its own warm-started fit (the shared standardisation is
    counted in the first one)."""

    _tf_threads(threads)
    _keras_first(keras)
    if len(indices) == 1 or data.streams is not None:
        return [fit_one(i, *configs[i], seed, threads, data) for i in indices]
    entries = []
    for i in indices:
        params = dict(configs[i][1])
        train_on = params.pop("train_on", data.default_train_on)
        entries.append((i, params, train_on, make_head(configs[i][0], **{"random_state": seed, **params})))
    x_fit, y_fit = data.training_rows(entries[0][2])
    times: dict[int, float] = {}
    regpath.fit_logreg_path([h for *_, h in entries], x_fit, y_fit, times=times)
    return [
        _scored(i, configs[i][0], params, train_on, head, y_fit, times[id(head)], data)
        for i, params, train_on, head in entries
    ]


def _tasks(configs: list[tuple[str, dict[str, Any]]], data: SweepData, warm_path: bool) -> list[list[int]]:
    """Configs grouped into warm-startable C paths (one task each), longest tasks first so
    the last worker to finish is not the one that started a flatten fit late."""

    groups: dict[str, list[int]] = {}
    tasks: list[list[int]] = []
    for i, (name, params) in enumerate(configs):
        key = regpath.path_key(name, {"train_on": data.default_train_on, **params}) if warm_path else None
        if key is None:
            tasks.append([i])
        else:
            groups.setdefault(key, []).append(i)
    tasks += list(groups.values())

    def cost(task: list[int]) -> float:
        name, params = configs[task[0]]
        width = 16.0 if params.get("pooling", make_head(name).pooling) == "flatten" else 1.0
        return width * len(task) * (2.0 if name == "mlp" else 1.0)

    return sorted(tasks, key=lambda t: (-cost(t), t[0]))


def fit_all(
    configs: list[tuple[str, dict[str, Any]]],
    data: SweepData,
    seed: int,
    n_jobs: int,
    warm_path: bool | None = None,
    keras: bool | None = None,
) -> list[tuple[dict[str, Any], Any, bytes]]:
    """Every config in parallel, each worker with its share of the cores; logistic
    regressions differing only in C go as one warm-started path (``warm_path``; default on,
    FEATCACHE_WARM_PATH=0 turns it off for comparisons). Workers import Keras first when
    ``keras`` (default: when a config is a Keras head; ``_keras_first`` says why). Results
    come back in config order."""
    import joblib

    if warm_path is None:
        warm_path = os.environ.get("FEATCACHE_WARM_PATH", "1") != "0"
    if keras is None:
        keras = uses_keras(name for name, _ in configs)
    tasks = _tasks(configs, data, warm_path)
    n_jobs = min(n_jobs if n_jobs > 0 else (os.cpu_count() or 1), len(tasks))
    threads = max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else None
    with joblib.parallel_config(backend="loky", inner_max_num_threads=threads):
        done = joblib.Parallel(n_jobs=n_jobs)(
            joblib.delayed(fit_path)(task, configs, seed, threads, data, keras) for task in tasks
        )
    by_index = {r[0]["index"]: r for results in done for r in results}
    return [by_index[i] for i in range(len(configs))]


def uses_keras(names: Any) -> bool:
    """Whether any of these head names is fitted by Keras."""
    return any(issubclass(HEADS[name], _KerasHead) for name in names)


def select(rows: list[dict[str, Any]]) -> int:
    """The winner: best validation accuracy; ties go to the lower log-loss, then the earlier config."""
    return min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"], rows[i]["val_log_loss"], i))


def run_sweep(cfg: SweepConfig, cache_path: str | Path) -> SweepResult:
    """Fit every config of ``cfg.sweep_file`` on ``cache_path``; write and return the run."""
    cache = Path(cache_path)
    meta = store.read_meta(cache)
    plan = _plan(cfg)
    run = RunFolder(cfg.runs_dir, cfg.name)  # before any compute: an unwritable runs folder fails now
    with run:
        if plan.cv:
            data, views = _cv_data(cfg, cache, meta, plan)
        else:
            data = load_data(cfg, cache, meta, plan.wants_views, tta=plan.tta, train_tta="tta" in plan.train_ons)
        _log_start(cfg, cache, plan, data)
        t0 = time.perf_counter()
        preloading = _preload_writers(cfg.track)
        held_out = None
        if plan.cv:
            rows, full_params, histories, chosen, oof = _cross_validated(cfg, plan, data, views)
            best, won, winner = _pick(rows, None, chosen)
            winner = _refit(cfg, plan, data, rows, histories, chosen if won and chosen else [best])
            held_out = ("validation (out of fold)", data.train[1], oof[best])
            names = None if chosen is None else [ensemble.config_name(rows[i]) for i in chosen]
        else:
            results = _fit(cfg, plan, data)
            rows, full_params, histories, members = _candidates(results, plan.k, data)
            best, won, winner = _pick(rows, results, members)
            names = None if members is None else members.names
        preloading.join()
        evaluation = _test(rows, best, winner, data, held_out)
        seconds = time.perf_counter() - t0
        outcome = SweepOutcome(
            rows,
            histories,
            winner,
            full_params,
            evaluation,
            data.notes,
            seconds,
            data.excluded,
            tta={k_: v for k_, v in (meta.info.get("tta") or {}).items() if k_ != "splits"} if plan.tta else None,
            ensemble={
                "k": plan.k,
                "members": names,
                "combine": ensemble.COMBINE,
                "won": won,
            }
            if names is not None
            else None,
            cv=_cv_record(cfg, plan, data, meta) if plan.cv else None,
        )
        _write_run(run, cfg, plan.spec, cache, meta, outcome)
    selected_on = "out of fold" if plan.cv else "validation"
    return SweepResult(run.path, rows, rows[best], _summary(outcome, best, names is not None), selected_on)


@dataclass(frozen=True)
class _Plan:
    """What the sweep file and the options ask for, all checked before any data is read."""

    spec: dict[str, Any]  # the sweep file as written (run.json keeps it)
    heads: dict[str, Any]  # the file less ``OPTION_KEYS``: the grid or the search
    tta: bool
    k: int  # ensemble of the top k (0 or 1: none)
    cv: int  # folds of train + validation to select on (0: select on validation)
    searching: bool
    configs: list[tuple[str, dict[str, Any]]]  # the grid (empty for a search: its trials pick them)
    train_ons: set[str]

    @property
    def wants_views(self) -> bool:
        return bool(self.train_ons & {"views", "both"})


def _plan(cfg: SweepConfig) -> _Plan:
    """Read and check the sweep file; ``--tta``/``--ensemble``/``--cv`` override its ``tta``/``ensemble``/``cv``.
    A search (issue 15: random/TPE trials through Optuna) when the file asks; else the grid."""
    full_spec = load_toml(cfg.sweep_file)
    spec, file_tta, file_k = sweep_options(full_spec, str(cfg.sweep_file))
    tta, k = cfg.tta or file_tta, file_k if cfg.ensemble is None else cfg.ensemble
    cv = crossval.check_folds(full_spec.get("cv", 0), str(cfg.sweep_file)) if cfg.cv is None else cfg.cv
    searching = search.is_search(spec)
    if searching:
        search.check(spec, str(cfg.sweep_file))
        configs: list[tuple[str, dict[str, Any]]] = []
        train_ons = {
            t for table in spec.get("head") or [] for t in search._choices(table.get("train_on", cfg.train_on))
        }
    else:
        configs = expand_grid(spec, str(cfg.sweep_file))
        train_ons = {p.get("train_on", cfg.train_on) for _, p in configs}
    if cv and searching:
        raise ConfigError(
            f"{cfg.sweep_file}: cv = {cv} works with a grid of heads, not a search (a search picks its next trials "
            "from validation scores); remove `search`/`trials` or set cv = 0"
        )
    if cv and train_ons & {"views", "both"}:
        raise ConfigError(
            f"cv = {cv} selects on folds of train + validation, and cached augmented views exist for train "
            f"images only; train on 'clean' or 'tta' (test-time views exist for every split), or set cv = 0 "
            f"(received train_on {sorted(train_ons & {'views', 'both'})})"
        )
    return _Plan(full_spec, spec, tta, k, cv, searching, configs, train_ons)


def _log_start(cfg: SweepConfig, cache: Path, plan: _Plan, data: SweepData) -> None:
    """The data's notes, then what is about to be fitted on what."""
    for note in data.notes:
        log.info(note)
    if plan.cv:
        log.info(
            "cross-validating %d configs on %s: %d folds of %d labelled images, with %s worker(s)",
            len(plan.configs),
            cache.name,
            plan.cv,
            len(data.train[1]),
            cfg.n_jobs,
        )
        return
    log.info(
        "sweeping %s on %s (train %d%s, validation %d) with %s worker(s)",
        f"{plan.heads['trials']} {plan.heads.get('search', 'random')} trials"
        if plan.searching
        else f"{len(plan.configs)} configs",
        cache.name,
        len(data.train[1]),
        f" + {len(data.views[1])} view rows" if data.views else "",
        len(data.validation[1]),
        cfg.n_jobs,
    )


def _preload_writers(track: bool) -> threading.Thread:
    """Import what writing the run needs (matplotlib, and MLflow when tracking) in a thread of
    the parent while the workers fit. Issue 29: after the last fit these imports took about
    4.5 s of a 12,000-row sweep's wall time with one core idle; during the fit the parent
    only waits. Imports only: nothing is written before the fit ends, and a failure is left
    to the real import (``_write_run``), which reports it as before."""

    def load() -> None:
        with contextlib.suppress(Exception):  # the real import, later, says what is wrong
            plots.pyplot()
        tracking.preload(track)

    thread = threading.Thread(target=load, name="featcache-preload", daemon=True)
    thread.start()
    return thread


def _fit(cfg: SweepConfig, plan: _Plan, data: SweepData) -> list[tuple[dict[str, Any], Any, bytes]]:
    """Every config fitted and scored on validation: the grid, or the search's trials."""
    if not plan.searching:
        return fit_all(plan.configs, data, cfg.seed, cfg.n_jobs)
    spec = plan.heads
    _, results = search.run_search(
        spec,
        str(cfg.sweep_file),
        lambda batch: fit_all(
            batch, data, cfg.seed, cfg.n_jobs, keras=uses_keras(n for _, n, _ in head_tables(spec, ""))
        ),
        cfg.seed,
        cfg.n_jobs if cfg.n_jobs > 0 else (os.cpu_count() or 1),
    )
    return results


def _candidates(
    results: list[tuple[dict[str, Any], Any, bytes]], k: int, data: SweepData
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any], ensemble.Ensemble | None]:
    """(rows, full params, histories, the ensemble or None): one row per fitted config, plus the
    mean of the top-``k`` configs as one more candidate when ``k >= 2``."""
    rows = [r for r, _, _ in results]
    full_params = [r.pop("full_params") for r in rows]
    for r in rows:
        del r["val_proba"]
    _show_varying_params(rows)
    histories = [h for _, h, _ in results]
    members: ensemble.Ensemble | None = None
    if k >= 2 and len(rows) >= 2:  # one more candidate: the mean of the top-k configs
        members = _ensemble_row(rows, results, k, data)
        full_params.append({"members": members.names, "combine": ensemble.COMBINE})
        histories.append(None)
    return rows, full_params, histories, members


def _cv_data(cfg: SweepConfig, cache: Path, meta: store.CacheMeta, plan: _Plan) -> tuple[SweepData, list[np.ndarray]]:
    """Cross-validation's data: train (less ``--exclude``) and validation as one labelled set (as
    ``train``, and as ``validation`` for the refit's own scoring), test, and each labelled image's
    test-time views, row-aligned by path (when a config trains on them or ``tta`` scores them)."""
    if "train" not in meta.splits:
        raise store.CacheError(f"{cache} has no train split (it has {list(meta.splits)}); nothing to train on")
    labelled = [s for s in ("train", "validation") if s in meta.splits]
    budget = parse_budget(cfg.memory_budget)
    streaming, why = stream.plan_training(cache, labelled, meta.split_sizes, meta.feature_shape, cfg.stream, budget)
    if streaming:
        raise ConfigError(
            f"cv = {plan.cv} needs train + validation of {cache} in memory ({why}); pass --stream off, "
            "a larger --memory-budget, or cv = 0"
        )
    notes = [why]
    loaded: dict[str, Any] = {}
    _, excluded, train_paths = _train_without_excluded(cfg, cache, loaded, notes)
    parts = {"train": (*loaded["train"], train_paths)}
    if "validation" in meta.splits:
        parts["validation"] = store.load_split(cache, "validation")
    test_split = store.load_split(cache, "test") if "test" in meta.splits else None
    test = test_split[:2] if test_split is not None else None
    if test is None:
        notes.append("no test split in the cache: the winner is not tested")
    trval = np.concatenate([p[0] for p in parts.values()]), np.concatenate([p[1] for p in parts.values()])
    check_classes(cache, meta, {"train": trval[1], **({"test": test[1]} if test is not None else {})})
    views: list[np.ndarray] = []
    if plan.tta or "tta" in plan.train_ons:
        per_split = [_tta_views(cache, meta, s, p[2]) for s, p in parts.items()]
        if len({len(v) for v in per_split}) > 1:
            raise CacheError(
                f"{cache}: train and validation hold different numbers of test-time views "
                f"({[len(v) for v in per_split]}); rebuild them with `make extract TTA_VIEWS=N FORCE=1`"
            )
        views = [np.concatenate(v) for v in zip(*per_split, strict=True)]
    data = SweepData(
        trval,
        trval,
        test,
        None,
        cfg.train_on,
        notes,
        excluded=excluded,
        tta={"validation": views, **({"test": _tta_views(cache, meta, "test", test_split[2])} if test_split else {})}
        if plan.tta
        else {},
        train_tta=_stacked(views, trval[1]),
        flops_per_image=float(meta.info.get("flops_per_image") or 0.0),
    )
    data.notes.append(
        f"cv = {plan.cv}: selected on out-of-fold predictions over the {len(trval[1])} {' + '.join(parts)} images "
        f"(stratified folds, seed {cfg.seed}); the winner is refitted on all of them, then tested once"
    )
    return data, views


def _fold(data: SweepData, views: list[np.ndarray], fit: np.ndarray, held: np.ndarray) -> SweepData:
    """One fold: fit on ``fit`` rows (with their test-time views), score ``held`` (with theirs when tta)."""
    x, y = data.train
    return SweepData(
        (x[fit], y[fit]),
        (x[held], y[held]),
        None,
        None,
        data.default_train_on,
        [],
        tta={"validation": [v[held] for v in views]} if data.tta else {},
        train_tta=_stacked([v[fit] for v in views], y[fit]),
        flops_per_image=data.flops_per_image,
    )


def _stacked(views: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every view's rows one after another with their labels: training rows for train_on="tta"."""
    return (np.concatenate(views), np.tile(y, len(views))) if views else None


def _cross_validated(
    cfg: SweepConfig, plan: _Plan, data: SweepData, views: list[np.ndarray]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any], list[int] | None, list[np.ndarray]]:
    """(rows, full params, histories, the ensemble's members or None, out-of-fold probabilities per row):
    every config fitted on each fold and scored on its held-out images; a row's validation figures
    are its out-of-fold ones over train + validation, an ensemble's the mean of its members'."""
    y = data.train[1]
    splits = crossval.folds(y, plan.cv, cfg.seed)
    rows: list[dict[str, Any]] = []
    per_fold: list[list[np.ndarray]] = [[] for _ in plan.configs]
    for f, (fit, held) in enumerate(splits):
        log.info(
            "cv fold %d/%d: %d configs on %d images, %d held out",
            f + 1,
            plan.cv,
            len(plan.configs),
            len(fit),
            len(held),
        )
        for i, (row, _, _) in enumerate(fit_all(plan.configs, _fold(data, views, fit, held), cfg.seed, cfg.n_jobs)):
            per_fold[i].append(row.pop("val_proba"))
            if f == 0:
                rows.append(row)
            else:
                rows[i]["fit_seconds"] += row["fit_seconds"]
    oof = [crossval.out_of_fold(p, splits, len(y)) for p in per_fold]
    classes = np.unique(y)
    scored_views = len(data.tta.get("test", []))
    for row, proba in zip(rows, oof, strict=True):
        trained_views = len(views) if row["train_on"] == "tta" else 0
        row["val_accuracy"], row["val_log_loss"] = score(proba, y, classes)
        row["train_rows"] = len(y) * (1 + trained_views)
        embedded = len(y) * (1 + max(trained_views, len(data.tta.get("validation", []))))
        embedded += len(data.test[1]) * (1 + scored_views) if data.test is not None else 0
        row["passes"] = accounting.recipe_passes(embedded, data.flops_per_image)
        row["epochs"] = None  # one count per fold: the refit's is in its curves
    full_params = [r.pop("full_params") for r in rows]
    _show_varying_params(rows)
    histories: list[Any] = [None] * len(rows)
    chosen = None
    if plan.k >= 2 and len(rows) >= 2:
        chosen = ensemble.top_k(rows, plan.k)
        oof.append(np.mean([oof[i] for i in chosen], axis=0))
        pooling = "+".join(dict.fromkeys(rows[i]["pooling"] for i in chosen))
        _append_ensemble(rows, chosen, pooling, score(oof[-1], y, classes))
        full_params.append({"members": [ensemble.config_name(rows[i]) for i in chosen], "combine": ensemble.COMBINE})
        histories.append(None)
    return rows, full_params, histories, chosen, oof


def _refit(
    cfg: SweepConfig, plan: _Plan, data: SweepData, rows: list[dict[str, Any]], histories: list[Any], chosen: list[int]
) -> Any:
    """The winning config(s) refitted on every train + validation image: the head, or the ensemble of
    the members ``chosen``. Each refit's seconds join its row's, its curves go to ``histories``."""
    import io

    import joblib

    refits = fit_all([plan.configs[i] for i in chosen], data, cfg.seed, cfg.n_jobs)
    heads = []
    for i, (row, history, blob) in zip(chosen, refits, strict=True):
        rows[i]["fit_seconds"] += row["fit_seconds"]
        histories[i] = history
        heads.append(joblib.load(io.BytesIO(blob)))
    if len(heads) == 1:
        return heads[0]
    return ensemble.Ensemble(heads, [ensemble.config_name(rows[i]) for i in chosen])


def _cv_record(cfg: SweepConfig, plan: _Plan, data: SweepData, meta: store.CacheMeta) -> dict[str, Any]:
    """run.json's ``cv``: how the winner was selected and what it was refitted on."""
    return {
        "folds": plan.cv,
        "seed": cfg.seed,
        "images": len(data.train[1]),
        "splits": " + ".join(s for s in ("train", "validation") if s in meta.splits),
        "columns": crossval.COLUMN_MEANING,
        "refit": "the winner (each ensemble member) on every train + validation image",
    }


def _pick(
    rows: list[dict[str, Any]], results: list[tuple[dict[str, Any], Any, bytes]] | None, members: Any
) -> tuple[int, bool, Any]:
    """(best row, whether the ensemble (``members``, the last row) won, the winner): picked on validation
    (or out of fold) alone and marked in its row. Without ``results`` (cross-validation) no head is
    loaded: the winner is refitted afterwards (``_refit``)."""
    import io

    import joblib

    best = select(rows)
    rows[best]["winner"] = True
    won = members is not None and best == len(rows) - 1
    if results is None:
        return best, won, None
    return best, won, members if won else joblib.load(io.BytesIO(results[best][2]))


def _test(
    rows: list[dict[str, Any]],
    best: int,
    winner: Any,
    data: SweepData,
    held_out: tuple[str, np.ndarray, np.ndarray] | None = None,
) -> tuple[str, np.ndarray, np.ndarray]:
    """The winner's evaluation, scored once on test when there is one: (split, labels, probabilities);
    else ``held_out`` (cross-validation's out-of-fold figures), else validation."""
    if data.test is None:
        return held_out or ("validation", data.validation[1], data.proba(winner, "validation"))
    proba = data.proba(winner, "test")
    rows[best]["test_accuracy"], rows[best]["test_log_loss"] = score(proba, data.test[1], winner.classes_)
    return "test", data.test[1], proba


def _summary(outcome: SweepOutcome, best: int, with_ensemble: bool) -> str:
    """The results table, the notes (``_write_run``'s included) and one line on the winner."""
    rows, tested = outcome.rows, outcome.evaluation[0] == "test"
    summary = (
        f"{len(rows)} configs{' (with the ensemble)' if with_ensemble else ''} in {outcome.seconds:.1f} s; "
        f"winner #{best} {rows[best]['head']} "
        f"({rows[best]['pooling']} {rows[best]['params']}): "
        f"{'out-of-fold' if outcome.cv else 'validation'} accuracy {rows[best]['val_accuracy']:.4f}"
        + (f", test accuracy {rows[best]['test_accuracy']:.4f}" if tested else ", no test split")
    )
    table = text_table(rows, [c for c in COLUMNS if c != "winner"], mark="winner")
    return "\n".join([table, *outcome.notes, summary])


def _ensemble_row(
    rows: list[dict[str, Any]], results: list[tuple[dict[str, Any], Any, bytes]], k: int, data: SweepData
) -> ensemble.Ensemble:
    """Append the row of the mean of the top-``k`` configs (by validation) to ``rows``; return it."""
    import io

    import joblib

    chosen = ensemble.top_k(rows, k)
    built = ensemble.Ensemble(
        [joblib.load(io.BytesIO(results[i][2])) for i in chosen], [ensemble.config_name(rows[i]) for i in chosen]
    )
    _append_ensemble(
        rows, chosen, built.pooling, score(data.proba(built, "validation"), data.validation[1], built.classes_)
    )
    return built


def _append_ensemble(rows: list[dict[str, Any]], chosen: list[int], pooling: str, scores: tuple[float, float]) -> None:
    """Append the ensemble's row (its members ``chosen``, its validation ``scores``) to ``rows``."""
    val_accuracy, val_log_loss = scores
    passes = [rows[i]["passes"] for i in chosen]
    rows.append(
        {
            "index": len(rows),
            "head": "ensemble",
            "pooling": pooling,
            "train_on": "+".join(dict.fromkeys(rows[i]["train_on"] for i in chosen)),
            "train_rows": max(rows[i]["train_rows"] for i in chosen),
            "passes": None if None in passes else max(passes),  # one cache: the members share its rows
            "n_features": None,
            "params": json.dumps({"members": [int(rows[i]["index"]) for i in chosen]}),
            "val_accuracy": val_accuracy,
            "val_log_loss": val_log_loss,
            "fit_seconds": sum(rows[i]["fit_seconds"] for i in chosen),
            "epochs": None,
        }
    )


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep produced, as ``_write_run`` writes it."""

    rows: list[dict[str, Any]]  # one per candidate, the winner's marked ``winner``
    histories: list[Any]  # row-aligned: a Keras head's curves, else None
    winner: Any  # the fitted head (or ensemble.Ensemble)
    full_params: list[dict[str, Any]]  # row-aligned: every parameter of each head
    evaluation: tuple[str, np.ndarray, np.ndarray]  # (split, labels, the winner's probabilities) it was scored on
    notes: list[str]  # shared with the data: ``_write_run`` may add one, the summary shows them all
    seconds: float
    excluded: dict[str, Any] | None = None  # --exclude's record
    tta: dict[str, Any] | None = None  # the cache's test-time views, when scoring used them
    ensemble: dict[str, Any] | None = None  # k, members, combine, won: when an ensemble was a candidate
    cv: dict[str, Any] | None = None  # cross-validated selection (crossval.py): folds, seed, what was refitted

    @property
    def best(self) -> int:
        return next(i for i, r in enumerate(self.rows) if r.get("winner"))


def _write_run(
    run: Any, cfg: SweepConfig, spec: dict[str, Any], cache: Path, meta: store.CacheMeta, outcome: SweepOutcome
) -> None:
    """results.csv, run.json, the winner (an ensemble's members, each under its config name),
    its confusion matrix, every MLP's curves, report.html, and the MLflow runs (issue 15)."""
    run.write_results(outcome.rows, COLUMNS)
    _save_winner(run.path, outcome.winner)
    _plot_curves(run.path, outcome.rows, outcome.histories)
    _plot_confusion(run.path, meta, outcome)
    if meta.precision == "int8":  # predict runs the very model that made the features
        _keep_int8_model(cache, meta, run.path, outcome.notes)
    # --- issue 15: report.html, then MLflow (a failure there is a note, never an error)
    report.sweep_report(run.path, outcome.rows, [c for c in COLUMNS if c != "winner"], meta.to_dict(), outcome.notes)
    tracked = tracking.log_sweep(
        tracking.Tracker(track=cfg.track),
        run.path,
        meta,
        outcome.rows,
        outcome.histories,
        outcome.full_params,
        {**as_dict(cfg), "search": spec.get("search", "grid")},
    )
    run.write_json(_run_info(cfg, spec, cache, meta, outcome, tracked))


def _save_winner(path: Path, winner: Any) -> None:
    """The winner in the run folder; an ensemble's members each under its config name."""
    if isinstance(winner, ensemble.Ensemble):
        for member, name in zip(winner.members, winner.names, strict=True):
            save_head(member, path, stem=ensemble.stem(name))
    else:
        save_head(winner, path)


def _plot_curves(path: Path, rows: list[dict[str, Any]], histories: list[Any]) -> None:
    """curves/<index>-<head>.png for every row with a training history (the MLPs)."""
    for row, history in zip(rows, histories, strict=True):
        if history:
            (path / "curves").mkdir(exist_ok=True)
            plots.plot_learning_curves(
                history,
                path / "curves" / f"{row['index']:02d}-{row['head']}.png",
                f"#{row['index']} {row['head']} {row['pooling']} {row['params']}",
            )


def _plot_confusion(path: Path, meta: store.CacheMeta, outcome: SweepOutcome) -> None:
    """confusion.png: the winner on the split it was evaluated on (test, else validation)."""
    from sklearn.metrics import confusion_matrix

    best, rows, winner = outcome.best, outcome.rows, outcome.winner
    split, y_eval, proba = outcome.evaluation
    cm = confusion_matrix(y_eval, winner.classes_[proba.argmax(1)], labels=np.arange(len(meta.class_names)))
    plots.plot_confusion_matrix(
        cm, list(meta.class_names), path / "confusion.png", f"winner #{best} ({rows[best]['head']}) on {split}"
    )


def _keep_int8_model(cache: Path, meta: store.CacheMeta, path: Path, notes: list[str]) -> None:
    """Keep the cache's int8 model with the run (predict needs it); a failure is a note and a warning."""
    try:
        models.keep_with_run(cache, meta.info["int8"], path)
    except (OSError, KeyError, CacheError) as e:
        notes.append(f"predict cannot run this head: the cache's int8 model could not be kept ({e})")
        log.warning(notes[-1])


def _run_info(
    cfg: SweepConfig,
    spec: dict[str, Any],
    cache: Path,
    meta: store.CacheMeta,
    outcome: SweepOutcome,
    tracked: Any,
) -> dict[str, Any]:
    """run.json's content (``RunFolder.write_json`` adds versions, command line and time)."""
    best = outcome.best
    return {
        "kind": "classify",
        "config": as_dict(cfg),
        "sweep": spec,
        "cache": str(cache.resolve()),
        "cache_meta": meta.to_dict(),
        "seed": cfg.seed,
        "notes": outcome.notes,
        "sweep_seconds": outcome.seconds,
        "winner": {**outcome.rows[best], "params": outcome.full_params[best]},
        "tracking": tracked,
        "exclude": outcome.excluded,
        "tta": outcome.tta,
        "ensemble": outcome.ensemble,
        "cv": outcome.cv,
    }


def _show_varying_params(rows: list[dict[str, Any]]) -> None:
    """Keep in each row's ``params`` only what varies between configs of the same head
    (run.json has the full sweep), so the table stays readable."""
    for head in {r["head"] for r in rows}:
        mine = [r for r in rows if r["head"] == head]
        parsed = [{k: v for k, v in json.loads(r["params"]).items() if k != "train_on"} for r in mine]
        keys = {k for p in parsed for k in p}
        varying = sorted(k for k in keys if len({json.dumps(p.get(k)) for p in parsed}) > 1)
        for r, p in zip(mine, parsed, strict=True):
            r["params"] = json.dumps({k: p[k] for k in varying if k in p})
