"""MLflow tracking: a sweep is a parent run with one child per config, logged to a SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cache_from, separable

pytest.importorskip("mlflow", reason="MLflow is not installed (the `track` extra: pip install -e '.[track]')")

from pipeline.core.config import SweepConfig
from pipeline.runs import tracking
from pipeline.train.sweep import run_sweep

SWEEP = """
[[head]]
name = "logreg"
pooling = ["flatten", "avg"]
C = [0.1, 1.0]
"""


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tracked sweep (4 logreg configs) into a fresh SQLite store, shared by the module
    (an MLP's curves are tested through ``log_sweep`` directly: TensorFlow costs seconds)."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = tmp / "s.toml"
    sweep.write_text(SWEEP)
    cache = cache_from(
        tmp / "c.h5", {"train": separable(12), "validation": separable(6, seed=1), "test": separable(6, seed=2)}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACK", "1")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp / "runs", n_jobs=1), cache)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return result, client, runs, tmp


def test_a_sweep_is_one_parent_with_a_child_per_config(tracked):
    result, _, runs, _ = tracked
    info = json.loads((result.run_dir / "run.json").read_text())
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [info["tracking"]["run_id"]]
    assert info["tracking"]["note"] is None
    assert len(children) == len(result.rows) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    parent = parents[0]
    assert parent.info.run_name == result.run_dir.name
    assert parent.data.tags["featcache.run_dir"] == str(result.run_dir.resolve())
    assert parent.data.tags["featcache.fingerprint"] == "synthetic"
    assert parent.data.tags["featcache.backbone"] == "vgg16"
    assert parent.data.tags["featcache.weights"] == "random-seed0"
    assert parent.data.tags["featcache.layer"] == "block5_pool"
    assert parent.data.tags["featcache.size"] == "32"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(result.winner["test_accuracy"])


def test_children_carry_each_configs_params_and_validation_metrics(tracked):
    result, _, runs, _ = tracked
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    for row in result.rows:
        child = children[f"#{row['index']:02d} {row['head']} {row['pooling']}"]
        assert child.data.params["head"] == row["head"]
        assert child.data.params["pooling"] == row["pooling"]
        assert child.data.params["train_on"] == "clean"
        assert child.data.metrics["val_accuracy"] == pytest.approx(row["val_accuracy"])
        assert child.data.metrics["val_log_loss"] == pytest.approx(row["val_log_loss"])
        assert child.data.metrics["fit_seconds"] == pytest.approx(row["fit_seconds"])
        assert child.data.tags["featcache.winner"] == str(bool(row.get("winner"))).lower()
        if row["head"] == "logreg":
            assert float(child.data.params["C"]) in (0.1, 1.0)
            assert float(child.data.params["C"]) == json.loads(row["params"])["C"]
    assert sorted(float(c.data.params["C"]) for c in children.values() if c.data.params["head"] == "logreg") == [
        0.1,
        0.1,
        1.0,
        1.0,
    ]


def test_an_mlps_curves_are_metric_history(tracked, tmp_path, monkeypatch):
    _, client, _, _ = tracked
    monkeypatch.setenv("TRACK", "1")
    from conftest import synthetic_meta

    run_dir = tmp_path / "run"
    (run_dir / "curves").mkdir(parents=True)
    (run_dir / "curves" / "00-mlp.png").write_bytes(b"png")
    rows = [
        {
            "index": 0,
            "head": "mlp",
            "pooling": "avg",
            "params": "{}",
            "train_on": "clean",
            "val_accuracy": 0.5,
            "val_log_loss": 0.7,
            "fit_seconds": 1.0,
            "epochs": 3,
            "winner": True,
            "test_accuracy": 0.25,
        }
    ]
    history = {"loss": [0.9, 0.8, 0.7], "val_loss": [1.0, 0.95, float("nan")]}
    tracker = tracking.Tracker(uri=str(client.tracking_uri))
    summary = tracking.log_sweep(
        tracker,
        run_dir,
        synthetic_meta(separable(2)[0]),
        rows,
        [history],
        [{"units": 4, "pooling": "avg", "random_state": 0}],
        {"seed": 0},
    )
    assert summary["note"] is None
    child = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")[0]
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "epoch_loss")] == [
        (0, 0.9),
        (1, 0.8),
        (2, 0.7),
    ]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch_val_loss")] == [0, 1]  # NaN left out
    assert child.data.params == {"head": "mlp", "pooling": "avg", "train_on": "clean", "units": "4"}
    assert child.data.metrics["test_accuracy"] == 0.25
    assert [a.path for a in client.list_artifacts(summary["run_id"], "curves")] == ["curves/00-mlp.png"]


def test_the_winner_its_pictures_and_the_report_are_artifacts(tracked):
    _, client, runs, _ = tracked
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "confusion.png", "winner.skops", "report.html"} <= names


def test_a_store_that_cannot_be_written_leaves_a_finished_sweep_with_a_note(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("TRACK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\nC = [0.1, 1.0]\n')
    cache = cache_from(tmp_path / "c.h5", {"train": separable(10), "validation": separable(5, seed=1)})
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["tracking"]["run_id"] is None
    assert "MLflow tracking to sqlite:///" in info["tracking"]["note"]
    assert "the run itself is complete" in info["tracking"]["note"]
    assert (result.run_dir / "winner.skops").is_file()
    assert (result.run_dir / "report.html").is_file()


def test_track_off_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TRACK", "1")
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\n')
    cache = cache_from(tmp_path / "c.h5", {"train": separable(10), "validation": separable(5, seed=1)})
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1, track=False), cache)
    assert not (tmp_path / "mlflow.db").exists()
    assert json.loads((result.run_dir / "run.json").read_text())["tracking"]["note"].startswith("tracking off")


@pytest.mark.parametrize(
    ("env", "flag", "on"), [("1", True, True), ("0", True, False), ("off", True, False), ("1", False, False)]
)
def test_track_env_and_flag(monkeypatch, env, flag, on):
    monkeypatch.setenv("TRACK", env)
    assert tracking.enabled(flag) is on


def test_default_store_is_sqlite_in_the_working_folder_or_home_unless_the_uri_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FEATCACHE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.default_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_root(tracking.default_uri()) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "home"))
    assert tracking.default_uri() == f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


def test_no_track_reaches_the_sweep_config():
    from pipeline.app.cli import _sweep_config, build_parser

    args = build_parser().parse_args(["classify", "--no-track"])
    assert _sweep_config(args).track is False
    assert _sweep_config(build_parser().parse_args(["classify"])).track is True
    assert build_parser().parse_args(["finetune", "--no-track"]).track is False


def test_ui_command_serves_the_project_store_on_localhost():
    cmd = tracking.ui_command(5123, uri="sqlite:////x/mlflow.db")
    assert Path(cmd[0]).name == "mlflow"
    assert cmd[1:] == [
        "ui",
        "--backend-store-uri",
        "sqlite:////x/mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        "5123",
        "--workers",
        "1",
        "--default-artifact-root",
        "file:///x/mlartifacts",
    ]


def test_finetune_and_compare_runs_log_one_child_per_row(tracked, tmp_path, monkeypatch):
    _, client, _, _ = tracked
    monkeypatch.setenv("TRACK", "1")
    (tmp_path / "curves.png").write_bytes(b"png")
    rows = [
        {"stage": "frozen block5 + head", "validation_accuracy": 0.8, "seconds": 2.0, "cost": "once"},
        {
            "stage": "fine-tuned block5 + head",
            "validation_accuracy": 0.9,
            "test_accuracy": 0.85,
            "seconds": 9.0,
            "cost": "3 epochs",
        },
    ]
    tracker = tracking.Tracker(uri=str(client.tracking_uri))
    summary = tracking.log_table_run(
        tracker,
        tmp_path,
        "finetune",
        {"featcache.backbone": "vgg16"},
        {"epochs": 3},
        rows,
        "stage",
        {"loss": [0.5, 0.4, 0.3]},
        ["curves.png", "absent.png"],
    )
    assert summary["note"] is None
    parent = client.get_run(summary["run_id"])
    assert parent.data.tags["featcache.kind"] == "finetune"
    assert parent.data.params == {"epochs": "3"}
    assert [m.value for m in client.get_metric_history(summary["run_id"], "epoch_loss")] == [0.5, 0.4, 0.3]
    assert [a.path for a in client.list_artifacts(summary["run_id"])] == ["curves.png"]
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {r["stage"] for r in rows}
    tuned = by_name["fine-tuned block5 + head"]
    assert tuned.data.metrics == {"validation_accuracy": 0.9, "test_accuracy": 0.85, "seconds": 9.0}
    assert tuned.data.params == {"stage": "fine-tuned block5 + head", "cost": "3 epochs"}
