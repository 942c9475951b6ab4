"""MLflow tracking: every sweep an MLflow parent run, every config a nested child run.

Tracking is a record, never a requirement: MLflow is imported only when a run is logged,
and every call goes through ``Tracker._call``, so a store that cannot be written (or an
MLflow that is not installed) turns into one warning and a note in run.json while the
sweep finishes as usual.

Where runs go: ``$MLFLOW_TRACKING_URI`` when set, else a SQLite database in the project
(``mlflow.db``, MLflow's current default kind of store; artifacts in ``mlartifacts/`` next
to it). ``--no-track`` or ``TRACK=0`` turns tracking off. ``make ui`` browses the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.core import paths


log = logging.getLogger(__name__)

EXPERIMENT = "featcache"  # one experiment; the ``featcache.kind`` tag says classify, finetune or compare
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (8000 in current releases); longer values are cut


def default_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<home>/mlflow.db`` (``paths.home``: the working
    folder or ``$FEATCACHE_HOME``)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.home().resolve() / 'mlflow.db'}"


def enabled(track: bool = True) -> bool:
    """False when the caller says so (``--no-track``) or ``TRACK`` is 0/false/no/off."""
    return track and os.environ.get("TRACK", "1").strip().lower() not in ("0", "false", "no", "off", "")


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, ``mlartifacts/`` beside the database (MLflow would otherwise
    put artifacts under the current directory); None lets the server decide."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(unquote(uri[len("sqlite:///") :]))
    return (db.parent / "mlartifacts").resolve().as_uri()


def cache_tags(meta: Any, run_dir: Path) -> dict[str, str]:
    """What identifies the features a run trained on, as MLflow tags."""
    return {
        "featcache.fingerprint": str(meta.fingerprint),
        "featcache.backbone": str(meta.backbone),
        "featcache.weights": str(meta.weights),
        "featcache.weights_sha256": str(meta.weights_sha256),
        "featcache.layer": str(meta.layer),
        "featcache.size": str(meta.size),
        "featcache.precision": str(meta.precision),
        "featcache.cache": str(getattr(meta, "path", "")),
        "featcache.run_dir": str(Path(run_dir).resolve()),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_CHARS]


def preload(track: bool = True) -> None:
    """Import MLflow's client, and its SQL store for a database URI, ahead of the first log
    call: about 3.5 s of imports that ``classify`` pays in a thread while its workers fit
    (issue 29). Imports only, nothing is connected; a failure is left to the real import,
    which turns it into the usual note."""
    if not enabled(track):
        return
    with contextlib.suppress(Exception):  # reported, if it matters, when the run is logged
        import mlflow.tracking
        from mlflow.store.db.db_types import DATABASE_ENGINES  # the schemes MLflow sends to its SQL store

        if urlparse(default_uri()).scheme.split("+")[0] in DATABASE_ENGINES:
            import mlflow.store.tracking.sqlalchemy_store


class Tracker:
    """One MLflow parent run and its children, through ``MlflowClient`` (no global active
    run). After the first failure every later call is skipped; ``note`` says what happened."""

    def __init__(self, uri: str | None = None, experiment: str | None = None, track: bool = True):
        self.uri = uri or default_uri()
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        self.on = enabled(track)
        self.note: str | None = None if self.on else "tracking off (--no-track or TRACK=0)"
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.on and self.note is None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; any failure is logged once as a warning and recorded in ``note``."""
        if not self.ok:
            return None
        try:
            return fn()
        except Exception as e:  # tracking must never fail a run: MLflow raises many kinds of errors
            self.note = (
                f"MLflow tracking to {self.uri} failed while {what} ({type(e).__name__}: {e}); "
                "the run itself is complete"
            )
            log.warning(self.note)
            return None

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (database set-up) are not ours to show
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = client.create_experiment(self.experiment, artifact_location=artifact_root(self.uri))
        self.client = client

    def start(self, name: str, kind: str, tags: Mapping[str, str], params: Mapping[str, Any] | None = None) -> None:
        """The parent run: ``tags`` (see ``cache_tags``) plus ``featcache.kind``."""

        def go() -> None:
            self._connect()
            run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, "featcache.kind": kind})
            self.parent_id = run.info.run_id
            self._log(self.parent_id, params or {}, {}, {})

        self._call("starting the parent run", go)

    def _log(
        self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any], history: Mapping[str, Sequence[float]]
    ) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)]
        ms += [Metric(k, float(v), now, step) for k, vs in history.items() for step, v in enumerate(vs) if _finite(v)]
        ps = [Param(k, _param(v)) for k, v in params.items() if v is not None]
        for i in range(0, len(ps), 100):  # log_batch takes at most 100 params and 1000 metrics per call
            self.client.log_batch(run_id, params=ps[i : i + 100])
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i : i + 1000])

    def child(
        self,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        history: Mapping[str, Sequence[float]] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """A nested run under the parent: params, final metrics, per-epoch metric history."""

        def go() -> None:
            run = self.client.create_run(
                self.experiment_id, run_name=name, tags={**(tags or {}), "mlflow.parentRunId": self.parent_id}
            )
            self._log(run.info.run_id, params, metrics, history or {})
            self.client.set_terminated(run.info.run_id, "FINISHED")

        self._call(f"logging child run {name!r}", go)

    def log_parent(
        self,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        history: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        self._call(
            "logging the parent's metrics",
            lambda: self._log(self.parent_id or "", params or {}, metrics or {}, history or {}),
        )

    def artifacts(self, paths: Iterable[Path], subdir: str | None = None) -> None:
        """Files (and folders) of the run folder, copied to the parent run's artifacts."""

        def go() -> None:
            for path in paths:
                if path.is_dir():
                    self.client.log_artifacts(self.parent_id, str(path), path.name if subdir is None else subdir)
                elif path.is_file():
                    self.client.log_artifact(self.parent_id, str(path), subdir)

        self._call("copying artifacts", go)

    def finish(self, status: str = "FINISHED") -> str | None:
        """End the parent run; the note (None when all went well) for run.json."""
        if self.parent_id is not None:
            self._call("ending the parent run", lambda: self.client.set_terminated(self.parent_id, status))
        if self.ok:
            log.info(
                "tracked in MLflow: %s (experiment %r, run %s); `make ui` to browse",
                self.uri,
                self.experiment,
                self.parent_id,
            )
        return self.note

    def summary(self) -> dict[str, Any]:
        """What run.json records about tracking."""
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.parent_id, "note": self.note}


# --------------------------------------------------------------------------- one call per kind of run


def log_sweep(
    tracker: Tracker,
    run_dir: Path,
    meta: Any,
    rows: Sequence[Mapping[str, Any]],
    histories: Sequence[Mapping[str, Sequence[float]] | None],
    full_params: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """A classify run: the parent (sweep settings, the winner's metrics, artifacts) and one
    child per config (head, pooling, train_on and every parameter; validation scores, fit
    seconds, epochs; the MLP's per-epoch curves as metric history). Returns ``summary()``."""
    best = next((i for i, r in enumerate(rows) if r.get("winner")), None)
    tracker.start(
        run_dir.name,
        "classify",
        cache_tags(meta, run_dir),
        {
            "sweep_file": config.get("sweep_file"),
            "seed": config.get("seed"),
            "configs": len(rows),
            "train_on": config.get("train_on"),
            "search": config.get("search", "grid"),
        },
    )
    for i, (row, history) in enumerate(zip(rows, histories, strict=True)):
        params = {
            "head": row["head"],
            "pooling": row["pooling"],
            "train_on": row.get("train_on"),
            **{k: v for k, v in full_params[i].items() if k not in ("pooling", "random_state")},
        }
        metrics = {k: row.get(k) for k in ("val_accuracy", "val_log_loss", "fit_seconds", "epochs", "train_rows")}
        if i == best:
            metrics.update({k: row.get(k) for k in ("test_accuracy", "test_log_loss")})
        curves = {f"epoch_{k}": v for k, v in (history or {}).items()}
        tracker.child(
            f"#{row['index']:02d} {row['head']} {row['pooling']}",
            params,
            metrics,
            curves,
            {"featcache.winner": str(i == best).lower()},
        )
    if best is not None:
        w = rows[best]
        tracker.log_parent(
            {
                "winner_index": w["index"],
                "winner_head": w["head"],
                "winner_pooling": w["pooling"],
                "winner_params": w.get("params"),
            },
            {k: w.get(k) for k in ("val_accuracy", "val_log_loss", "test_accuracy", "test_log_loss")},
        )
    tracker.artifacts(
        [run_dir / n for n in ("results.csv", "confusion.png", "winner.skops", "winner.keras", "curves", "report.html")]
    )
    tracker.finish()
    return tracker.summary()


def log_table_run(
    tracker: Tracker,
    run_dir: Path,
    kind: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    name_key: str,
    history: Mapping[str, Sequence[float]] | None = None,
    artifacts: Sequence[str] = (),
) -> dict[str, Any]:
    """finetune (one child per stage, the curves as history) and compare (one child per
    backbone): the same shape as a sweep. Returns ``summary()``."""
    tracker.start(run_dir.name, kind, {**tags, "featcache.run_dir": str(run_dir.resolve())}, params)
    for row in rows:
        metrics = {k: v for k, v in row.items() if _finite(v)}
        child_params = {k: v for k, v in row.items() if not _finite(v) and v is not None}
        tracker.child(str(row[name_key]), child_params, metrics)
    if history:
        tracker.log_parent(history={f"epoch_{k}": v for k, v in history.items()})
    tracker.artifacts([run_dir / n for n in artifacts])
    tracker.finish()
    return tracker.summary()


# --------------------------------------------------------------------------- the UI (`make ui`)


def ui_command(port: int = 5000, host: str = "127.0.0.1", uri: str | None = None) -> list[str]:
    """``mlflow ui`` on ``host:port`` for the project's store (full ``mlflow`` needed: the
    skinny package has no server)."""
    import shutil
    import sys

    uri = uri or default_uri()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow") or "mlflow"
    cmd = [exe, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.runs.tracking ui [--port N]``: print the address, then run the UI."""
    import argparse
    import subprocess
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline.runs.tracking")
    parser.add_argument("command", choices=["ui"])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    cmd = ui_command(args.port, args.host)
    print(f"MLflow UI for {default_uri()} at http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        print(
            "mlflow is not installed in this environment; `make install` brings it (the `track` extra)", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
