"""Search beyond the grid: random or TPE (Optuna) over ranges of head parameters.

A sweep file asks for it at the top::

    search = "tpe"        # or "random"; without it the file is a grid (sweep.expand_grid)
    trials = 20

    [[head]]
    name = "logreg"
    pooling = ["flatten", "avg"]             # a list: one of these
    C = {low = 1e-4, high = 10, log = true}  # a range: floats, or integers when low and high are
    max_iter = 500                           # a value: fixed

With several [[head]] tables the head is itself a choice. Trials are asked in batches of
``n_jobs`` and fitted in parallel by the sweep's own fitter; Optuna is told each trial's
validation accuracy (TPE learns from them). Selection is unchanged: the sweep picks the
winner among all trials on validation, and test is scored once, on the winner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.core.vocab import TRAIN_ON, check_choice
from pipeline.train.sweep_file import head_tables, make_head

log = logging.getLogger(__name__)

SAMPLERS = ("random", "tpe")
RANGE_KEYS = {"low", "high", "log", "step"}
Config = tuple[str, dict[str, Any]]
Fitted = tuple[dict[str, Any], Any, bytes]  # sweep.fit_one's (row, history, head bytes)


def is_search(spec: dict[str, Any]) -> bool:
    """True when the sweep file asks for random or TPE search instead of a grid."""
    return "search" in spec or "trials" in spec


def _is_range(value: Any) -> bool:
    return isinstance(value, dict)


def _check_range(value: dict[str, Any], where: str) -> None:
    unknown = sorted(set(value) - RANGE_KEYS)
    if unknown or "low" not in value or "high" not in value:
        raise ConfigError(
            f"{where}: a range is {{low = ..., high = ...}} with optional log = true or step = ...; received {value!r}"
        )
    low, high = value["low"], value["high"]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)):
        raise ConfigError(f"{where}: low and high must be numbers; received {value!r}")
    if not low < high:
        raise ConfigError(f"{where}: low must be below high; received low={low!r}, high={high!r}")
    if value.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0; received low={low!r}")
    if value.get("log") and "step" in value:
        raise ConfigError(f"{where}: give either log = true or step, not both")


def check(spec: dict[str, Any], source: str = "sweep file") -> tuple[str, int, list[tuple[str, dict[str, Any]]]]:
    """(sampler, trials, [(head name, its table)]) with every value checked before any fit."""
    try:
        import optuna  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"{source}: search = {spec.get('search')!r} needs Optuna, which is not installed; "
            "`make install` brings it (pip install -e '.[track]'), or remove search/trials for a "
            "grid"
        ) from e
    unknown = sorted(set(spec) - {"head", "search", "trials"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {unknown}; allowed with a search: "
            "['head', 'search', 'trials'] (the seed comes from --seed / SEED=)"
        )
    sampler = spec.get("search", "random")
    if sampler not in SAMPLERS:
        raise ConfigError(
            f"{source}: search must be one of {SAMPLERS} (or leave it out for a grid); received {sampler!r}"
        )
    trials = spec.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"{source}: search = {sampler!r} needs trials = N (a positive integer); received {trials!r}")
    tables = []
    for number, name, table in head_tables(spec, source):
        where = f"{source}: head #{number} ({name})"
        for key, value in table.items():
            if _is_range(value):
                if key in ("pooling", "train_on"):
                    raise ConfigError(f"{where}: {key} is a choice, give a list, not a range")
                _check_range(value, f"{where} {key}")
            elif isinstance(value, list) and not value:
                raise ConfigError(f"{where} has an empty list for {key!r}; give at least one value")
        for train_on in _choices(table.get("train_on", "clean")):
            check_choice("train_on", train_on, TRAIN_ON, where)
        for corner in ("low", "high"):  # the ends of every range and each listed value must make a head
            fixed = {
                k: (v[corner] if _is_range(v) else v[0] if isinstance(v, list) else v)
                for k, v in table.items()
                if k != "train_on"
            }
            make_head(name, **fixed)
        for key, value in table.items():
            if isinstance(value, list) and key != "train_on":
                for choice in value:
                    make_head(name, **{key: choice})
        tables.append((name, table))
    return sampler, trials, tables


def _choices(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def wants_views(spec: dict[str, Any], default_train_on: str) -> bool:
    """True when some trial may train on the cached augmented views."""
    tables = spec.get("head") or []
    return any(
        t != "clean"
        for table in tables
        if isinstance(table, dict)
        for t in _choices(table.get("train_on", default_train_on))
    )


def _suggest(trial: Any, tables: list[tuple[str, dict[str, Any]]]) -> Config:
    """One config from a trial. Parameter names carry the head table's number, so each
    head's ranges are their own Optuna distributions."""
    pick = trial.suggest_categorical("head", list(range(len(tables)))) if len(tables) > 1 else 0
    name, table = tables[pick]
    params: dict[str, Any] = {}
    for key, value in table.items():
        label = f"{pick}.{key}"
        if _is_range(value):
            low, high, step = value["low"], value["high"], value.get("step")
            if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
                params[key] = trial.suggest_int(label, low, high, step=step or 1, log=bool(value.get("log")))
            else:
                params[key] = trial.suggest_float(label, float(low), float(high), step=step, log=bool(value.get("log")))
        elif isinstance(value, list):
            # Optuna's categorical choices must be None/bool/int/float/str: others travel as JSON
            plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in value)
            chosen = trial.suggest_categorical(label, value if plain else [json.dumps(v) for v in value])
            params[key] = chosen if plain else json.loads(chosen)
        else:
            params[key] = value
    return name, params


def run_search(
    spec: dict[str, Any], source: str, fit: Callable[[list[Config]], Sequence[Fitted]], seed: int, batch: int
) -> tuple[list[Config], list[Fitted]]:
    """Ask ``trials`` configs of Optuna in batches of ``batch``, fit each batch with ``fit``
    (the sweep's parallel fitter), tell Optuna their validation accuracy. Returns every
    config and its result, renumbered 0..trials-1 in the order asked."""
    import optuna

    sampler_name, trials, tables = check(spec, source)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.RandomSampler(seed=seed) if sampler_name == "random" else optuna.samplers.TPESampler(seed=seed)
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    configs: list[Config] = []
    results: list[Fitted] = []
    step = max(1, batch if sampler_name == "tpe" else trials)  # random needs no feedback: one batch
    while len(configs) < trials:
        asked = [study.ask() for _ in range(min(step, trials - len(configs)))]
        batch_configs = [_suggest(t, tables) for t in asked]
        fitted = list(fit(batch_configs))
        for trial, (row, history, blob) in zip(asked, fitted, strict=True):
            row["index"] = len(results)
            results.append((row, history, blob))
            study.tell(trial, row["val_accuracy"])
        configs += batch_configs
        log.info(
            "%s search: %d/%d trials, best validation accuracy so far %.4f",
            sampler_name,
            len(configs),
            trials,
            study.best_value,
        )
    return configs, results
