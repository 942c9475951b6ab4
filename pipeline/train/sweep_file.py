"""The sweep file's heads: ``[[head]]`` tables read and checked, heads built by name.

One home for the names a sweep file (configs/sweep.toml) may use and the parameters each
head takes, shared by the grid (``sweep``) and the Optuna search (``search``); every mistake
is a ConfigError naming the file, the head and the value.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.train.heads import HEADS, _PooledHead


def make_head(name: str, **params: Any) -> _PooledHead:
    """A head by name; unknown names, parameters and out-of-range values are ConfigErrors."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; available: {sorted(HEADS)}")
    head = HEADS[name]()
    allowed = sorted(head.get_params())
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"head {name!r} has no parameter(s) {unknown}; allowed: {allowed}")
    head.set_params(**params)
    try:
        head._validate_params()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"head {name!r}: {e}") from e
    return head


def head_tables(spec: dict[str, Any], source: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The sweep file's ``[[head]]`` tables as (number, head name, the other keys), checked:
    shared by the grid and by the Optuna search."""
    heads = spec.get("head")
    if not heads or not isinstance(heads, list):
        raise ConfigError(f'{source}: no [[head]] tables; add at least one, e.g. [[head]] name = "logreg"')
    out = []
    for number, table in enumerate(heads, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: head #{number} must be a [[head]] table with a name; received {table!r}")
        rest = dict(table)
        name = rest.pop("name", None)
        if name not in HEADS:
            raise ConfigError(f"{source}: unknown head {name!r}; available: {sorted(HEADS)}")
        out.append((number, name, rest))
    return out
