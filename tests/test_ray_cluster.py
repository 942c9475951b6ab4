"""``RAY_ADDRESS``: ``featcache extract --engine ray`` joins a running Ray cluster (here a
head node started with ``ray start`` on this machine, as a cluster's head would be) instead
of starting its own, runs its slices there, and leaves the cluster running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.core.config import ExtractConfig
from pipeline.features.extract import extract

from conftest import assert_same_cache, make_folder

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_in_cluster(code: str, address: str, env: dict) -> subprocess.CompletedProcess:
    """``python -c code`` as a client of the cluster at ``address``."""
    return subprocess.run(
        [sys.executable, "-c", code], env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head node in its own processes, as ``ray start --head`` makes on a cluster."""
    if not RAY.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    base = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths have a length limit
    temp = os.path.join(base, "ray")  # Ray's default temp dir for RAY_TMPDIR=base: where ray.init() looks
    port = _free_port()
    # token authentication, Ray's default for `ray start`: the head and every client share the token
    token = os.urandom(16).hex()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env["RAY_TMPDIR"] = base  # clients on this machine see this head as "the running cluster"
    start = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    start += [f"--temp-dir={temp}", "--object-store-memory=200000000", "--disable-usage-stats"]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_extract_joins_the_cluster_named_by_ray_address(tmp_path, ray_head):
    address, env = ray_head
    root = make_folder(tmp_path / "imgs", {"train": 4, "test": 2}, size=32)
    args = ["extract", "--data", str(root), "--size", "32", "--weights", "random", "--engine", "ray"]
    args += ["--shards", "2", "--cache-dir", str(tmp_path / "c")]
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env={**env, "RAY_ADDRESS": address, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    (path,) = [p for p in (tmp_path / "c").rglob("*.h5") if ".shard-" not in p.name]  # the merged cache
    single = extract(ExtractConfig(data=str(root), cache_dir=tmp_path / "s", size=32, weights="random", quiet=True))
    assert_same_cache(path, single.path)
    # the run joined that cluster and left it up: the head still answers, and it ran a job
    status = _python_in_cluster("import ray; ray.init(); print(len(ray.nodes())); ray.shutdown()", address, env)
    assert status.returncode == 0 and status.stdout.strip().splitlines()[-1] == "1", status.stderr
    jobs = _python_in_cluster("from ray.util.state import list_jobs; print(len(list_jobs()))", address, env)
    if jobs.returncode == 0:  # the state API needs the dashboard's agent; without it, the node check above stands
        assert int(jobs.stdout.strip().splitlines()[-1]) >= 1


def test_without_ray_address_a_ray_of_its_own_is_started_even_beside_a_running_cluster(tmp_path, ray_head):
    """Ray's ``ray.init()`` joins any cluster it finds on the machine (and refuses ``num_cpus``
    then): with RAY_ADDRESS unset, extract must start its own local Ray, as the README says."""
    root = make_folder(tmp_path / "imgs", {"train": 2}, size=32)
    args = ["extract", "--data", str(root), "--size", "32", "--weights", "random", "--engine", "ray", "--shards", "1"]
    _, head_env = ray_head
    env = {k: v for k, v in head_env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(tmp_path / "c")],
        cwd=REPO,
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert [p for p in (tmp_path / "c").rglob("*.h5") if ".shard-" not in p.name]


def test_a_cluster_that_refuses_the_client_is_a_clear_error(tmp_path, ray_head):
    """The head wants a token this client lacks: exit 2 naming RAY_ADDRESS and what to set."""
    address, env = ray_head
    root = make_folder(tmp_path / "imgs", {"train": 2}, size=32)
    args = ["extract", "--data", str(root), "--size", "32", "--weights", "random", "--engine", "ray"]
    client = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(tmp_path / "c")],
        cwd=REPO,
        env={**client, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": address, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"RAY_ADDRESS={address!r}" in run.stderr and "RAY_AUTH_MODE=token" in run.stderr
    assert not list((tmp_path / "c").rglob("*.h5"))
