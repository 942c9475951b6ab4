"""The one run-folder writer used by classify, finetune and compare: a fresh folder that is
never an existing one, run.json with versions and the command line, a results CSV written
with the csv module, the terminal table, and the one scorer every stage reports with.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.provenance import versions
from pipeline.core.paths import check_writable


def fmt(value: Any) -> str:
    """A cell: floats to 4 decimals, None and NaN empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], mark: str | None = None) -> str:
    """Plain-text table, one line per row; rows whose ``mark`` field is true get a '*'."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    prefix = (lambda r: "* " if r.get(mark) else "  ") if mark else (lambda r: "")
    lines = [prefix({}) + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r, row in zip(rows, cells, strict=True):
        lines.append(prefix(r) + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def score(proba: np.ndarray, y: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """(accuracy, log-loss) of probabilities whose columns follow ``classes``.

    Rows are renormalised in float64 first: probabilities computed in float32 (a Keras head,
    an average of views) sum to 1 only within float32 rounding, which scikit-learn's
    ``log_loss`` reports as "y_prob values do not sum to one" on every call."""
    from sklearn.metrics import accuracy_score, log_loss

    proba = np.asarray(proba, np.float64)
    proba = proba / proba.sum(axis=1, keepdims=True)
    return (
        float(accuracy_score(y, np.asarray(classes)[np.argmax(proba, axis=1)])),
        float(log_loss(y, proba, labels=classes)),
    )


class RunFolder:
    """``<runs_dir>/<YYYYmmdd-HHMMSS>-<name>``, created at once (so a run that cannot write
    its results fails before any compute) and never an existing folder."""

    def __init__(self, runs_dir: str | Path, name: str):

        check_writable(Path(runs_dir), "runs folder")
        base = Path(runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        path, k = base, 1
        while True:
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                k += 1
                path = base.with_name(f"{base.name}-{k}")
            except OSError as e:
                raise ConfigError(f"runs folder {runs_dir}: cannot create {path} ({e.strerror})") from e
        self.path = path

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """A run that fails before writing anything leaves no empty folder behind."""
        if exc_type is not None:
            try:
                self.path.rmdir()  # only an empty folder: a run that wrote something keeps it
            except OSError:
                pass

    def write_results(self, rows: Sequence[dict[str, Any]], columns: Sequence[str], name: str = "results.csv") -> Path:
        out = self.path / name
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows({c: fmt(r.get(c)) for c in columns} for r in rows)
        return out

    def write_json(self, info: dict[str, Any], name: str = "run.json") -> Path:
        """``info`` plus versions, the command line and the time: every run.json says the same."""
        out = self.path / name
        full = {**info, "versions": versions(), "argv": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out.write_text(json.dumps(full, indent=2, default=str))
        return out


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's run.json; a folder that is not a run is a ConfigError naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"run folder {str(run_dir)!r} does not exist; give a folder made by `make classify` or "
            "`make finetune` (under runs/)"
        )
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise ConfigError(f"{run_dir} has no run.json; give a run folder made by `make classify` or `make finetune`")
    try:
        info = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{run_file} is not readable JSON ({e}); the run folder is damaged") from e
    if not isinstance(info, dict) or "cache_meta" not in info:
        raise CacheError(f"{run_file} does not describe a featcache run (no cache_meta)")
    return info
