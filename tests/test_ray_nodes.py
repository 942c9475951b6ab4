"""``--engine ray`` on a cluster of several nodes (``ray.cluster_utils.Cluster``: a head and
worker nodes as separate Ray processes on this machine) that loses a worker node while every
shard is mid-run: the shards are retried on a node that joins afterwards, each retry is logged
naming both nodes, and the merged cache equals a single-process run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.config import ExtractConfig
from pipeline.features.extract import extract

from conftest import assert_same_cache, make_folder

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper has exited
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster():
    """A head with no CPUs (it holds the driver and the progress actor only) and quicker
    node-death detection: a killed node is noticed in about 3 s rather than Ray's default 30 s."""
    head = {
        "num_cpus": 0,
        "include_dashboard": False,
        "object_store_memory": 100_000_000,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 5},
    }
    c = cluster_utils.Cluster(initialize_head=True, head_node_args=head)
    ray.init(
        address=c.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}},
    )
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_a_worker_node_killed_mid_run_is_survived_and_a_node_that_joins_is_used(tmp_path, cluster, caplog):
    from pipeline.features.ray_engine import extract_ray

    root = make_folder(tmp_path / "imgs", {"train": 4, "test": 2}, size=32)
    cfg = ExtractConfig(
        data=str(root), cache_dir=tmp_path / "c", size=32, weights="random", chunk_size=2, batch_size=2, quiet=True
    )
    doomed = cluster.add_node(num_cpus=2, object_store_memory=100_000_000)
    hold = tmp_path / "hold"
    hold.mkdir()
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = extract_ray(cfg, shards=2, hold=hold)
        except BaseException as e:  # reported by the assertion below
            out["error"] = e

    with caplog.at_level(logging.WARNING, logger="pipeline.features.ray_engine"):
        driver = threading.Thread(target=run, daemon=True)
        driver.start()
        try:  # while the workers start: the single-process cache to compare with
            single = extract(
                ExtractConfig(data=str(root), cache_dir=tmp_path / "single", size=32, weights="random", quiet=True)
            )
            running = {"running-0", "running-1"}
            _wait_for(lambda: {p.name for p in hold.iterdir()} >= running, 150, "both shards to run")
            joined = cluster.add_node(num_cpus=2, object_store_memory=100_000_000)  # joins after the shards began
            cluster.remove_node(doomed, allow_graceful=False)  # SIGKILL of the node's Ray processes
            # a lost machine takes its processes with it: the shards' workers outlive their raylet for a
            # moment here (and, released by `go`, would finish and report back as if nothing happened)
            workers = [int((hold / name).read_text()) for name in sorted(running)]
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, "the killed workers to exit")
        finally:
            (hold / "go").touch()  # the retries run through; the killed attempts are gone already
        driver.join(timeout=240)
    assert not driver.is_alive(), "the extraction did not finish after the node loss"
    assert "error" not in out, out.get("error")
    result = out["result"]

    retries = [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()]
    for shard in (0, 1):  # each shard: its second attempt on the node that joined, the first on the dead one
        assert any(
            m.startswith(f"shard {shard} of 2: attempt 2 started on node {joined.node_id}; ")
            and f"attempt 1 on node {doomed.node_id} was lost" in m
            for m in retries
        ), retries
    assert result.resumed_chunks >= 1  # the retries reused chunks their killed attempts had finished
    assert_same_cache(result.path, single.path)
    assert not [p.name for p in result.path.parent.iterdir() if p.name.endswith(".lock")]  # no lock file left
