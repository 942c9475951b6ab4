"""Stage one on Ray: the slices of ``extract --shards N`` as Ray tasks, then one merge.

Each task is ``extract(cfg, shards=N, shard=I)`` in a Ray worker process: it builds its
own backbone, writes its own shard file (HDF5 allows one writer per file) under its own
lock, and resumes from its own chunks if a previous attempt died. A failed task is retried
by Ray (``max_retries``), on any live node, also when its node died (a node that joins
later is used like any other); each retry is logged as a warning naming the nodes. The
driver shows one progress bar fed by a small actor on its own node, and merges the shards
into the cache at the end (virtual datasets, no feature bytes copied).

Ray is an optional extra (``pip install 'featcache[ray]'``). A local Ray is started unless
``RAY_ADDRESS`` names a cluster; with GPUs, each task asks for one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.core.config import ExtractConfig
from pipeline.core.errors import ConfigError
from pipeline.core.quiet import install
from pipeline.features.extract import ExtractResult, extract, plan_work

log = logging.getLogger(__name__)

INSTALL = "pip install 'featcache[ray]' (or pip install ray)"


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from e
    return ray


def extract_ray(
    cfg: ExtractConfig,
    shards: int | None = None,
    max_retries: int = 2,
    fail_once: Path | None = None,
    hold: Path | None = None,
) -> ExtractResult:
    """Extract with ``shards`` Ray tasks (default: one per GPU Ray sees, else one per CPU)
    and merge. Joins ``RAY_ADDRESS`` when set, else starts a local Ray for this call.

    ``fail_once`` (tests): a folder; each task raises once, after its first batch, unless it
    finds its own marker file there, so the retry path is exercised. ``hold`` (tests): a
    folder; each task, once its first chunk is saved, writes ``running-<shard>`` (its pid) there
    and waits for ``go``, so a test can kill a node while every shard is mid-run."""
    ray = _ray()
    p, delta = plan_work(cfg)  # every option and input checked before Ray starts
    if delta is None or delta.n_todo == 0:  # a hit, or only removals: no backbone needed
        return extract(cfg)
    started = _init_ray(ray)
    try:
        n, gpus = _task_count(ray, shards, delta.n_todo)
        expect = delta.todo_hash
        progress = _progress_actor(ray)
        task = ray.remote(_shard_task).options(
            num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0, max_retries=max_retries, retry_exceptions=True
        )
        shard_cfg = dataclasses.replace(p.cfg, quiet=True)
        tests = (str(fail_once) if fail_once else None, str(hold) if hold else None)
        refs = [task.remote(shard_cfg, n, i, expect, progress, *tests) for i in range(n)]
        log.info("%s: %s; %d Ray task(s)", p.path.name, delta.describe(), n)
        _wait(ray, refs, progress, n, delta.n_todo, f"{p.source.name} (ray x{n})", cfg.quiet)
        parts = ray.get(refs)  # raises the task's error once its retries are spent
        return _merge(cfg, n, expect, parts)
    finally:
        if started:
            ray.shutdown()


def _init_ray(ray: Any) -> bool:
    """Start a local Ray, or join ``RAY_ADDRESS``'s cluster, unless Ray is already up; whether
    this call started it (and so shuts it down). A cluster that cannot be joined is a
    ConfigError saying what to do; a local Ray that fails to start raises Ray's own error."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "runtime_env": {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": _pythonpath()}},
    }
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # "local": a Ray of its own, even where another runs (ray.init() alone would join that one)
        kwargs.update(address="local", num_cpus=os.cpu_count() or 1)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if not address:
            raise
        raise ConfigError(
            f"RAY_ADDRESS={address!r}: could not join a Ray cluster there ({str(e).splitlines()[0]}); "
            "start one (`ray start --head` on its head node) or unset RAY_ADDRESS for a local Ray; a cluster "
            "with token authentication (Ray's default for `ray start`) also needs RAY_AUTH_MODE=token and "
            "its token (~/.ray/auth_token or RAY_AUTH_TOKEN)"
        ) from e
    return True


def _task_count(ray: Any, shards: int | None, n_todo: int) -> tuple[int, int]:
    """(tasks, GPUs Ray sees): ``shards``, else one per GPU, else one per CPU; never more than images to do."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n = shards or max(1, gpus or int(resources.get("CPU", 1)))
    return max(1, min(n, n_todo)), gpus


def _progress_actor(ray: Any) -> Any:
    """The ``_Progress`` actor, on the driver's node, strictly (soft affinity placed it on a worker
    node under load): the bar and the retry log survive the loss of any worker node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(_Progress).options(scheduling_strategy=here).remote()


def _wait(ray: Any, refs: list[Any], progress: Any, n: int, total: int, desc: str, quiet: bool) -> None:
    """Until every task is done (or failed for good): the progress bar, and a warning per retry."""
    from tqdm.auto import tqdm

    pending = list(refs)
    logged: dict[int, int] = {}
    with tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            bar.update(ray.get(progress.total.remote()) - bar.n)
            _log_retries(ray.get(progress.attempts.remote()), logged, n)
    _log_retries(ray.get(progress.attempts.remote()), logged, n)


def _merge(cfg: ExtractConfig, n: int, expect: str, parts: list[ExtractResult]) -> ExtractResult:
    """The ``n`` shards merged into the cache; images, seconds (the slowest shard's) and resumed
    chunks are the shards' own."""
    result = extract(cfg, shards=n, merge=True, expect_todo=expect)
    result.images = sum(r.images for r in parts)
    result.seconds = max((r.seconds for r in parts), default=0.0)
    result.resumed_chunks = sum(r.resumed_chunks for r in parts)
    return result


def _pythonpath() -> str:
    """Workers import ``pipeline`` from where the driver found it (a checkout or site-packages)."""
    here = str(Path(__file__).resolve().parents[2])  # the folder holding the package pipeline/
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([here, rest]) if rest else here


def _log_retries(attempts: dict[int, list[str]], logged: dict[int, int], shards: int) -> None:
    """A warning for each attempt of a shard after its first, once: where it runs now and where the
    attempt before it was lost (its node died, or the task failed and Ray retried it)."""
    for shard, nodes in sorted(attempts.items()):
        for k in range(max(1, logged.get(shard, 1)), len(nodes)):
            log.warning(
                "shard %d of %d: attempt %d started on node %s; attempt %d on node %s was lost (node died or task "
                "failed), Ray retried it (finished chunks are reused)",
                shard,
                shards,
                k + 1,
                nodes[k],
                k,
                nodes[k - 1],
            )
        logged[shard] = max(logged.get(shard, 1), len(nodes))


class _Progress:
    """Images done per shard (a retried shard starts its count again), and the node of each attempt."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.nodes: dict[int, list[str]] = {}

    def reset(self, shard: int, node: str = "?") -> None:
        self.done[shard] = 0
        self.nodes.setdefault(shard, []).append(node)

    def attempts(self) -> dict[int, list[str]]:
        return self.nodes

    def add(self, shard: int, n: int) -> None:
        self.done[shard] = self.done.get(shard, 0) + n

    def total(self) -> int:
        return sum(self.done.values())


def _shard_task(
    cfg: ExtractConfig,
    shards: int,
    shard: int,
    expect: str,
    progress: Any,
    fail_once: str | None,
    hold: str | None = None,
) -> ExtractResult:
    """One slice in a Ray worker: ``extract(cfg, shards=N, shard=I)``."""
    import ray

    install()
    progress.reset.remote(shard, ray.get_runtime_context().get_node_id())
    marker = Path(fail_once) / f"shard-{shard}" if fail_once else None

    def report(n: int) -> None:
        progress.add.remote(shard, n)
        if marker is not None and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure in shard {shard} (test)")
        if hold is not None:
            _hold(Path(hold), Path(cfg.cache_dir), f".*.shard-{expect[:12]}-{shard}-of-{shards}.partial/*.npz", shard)

    return extract(cfg, shards=shards, shard=shard, progress=report, expect_todo=expect)


def _hold(hold: Path, cache_dir: Path, chunk_glob: str, shard: int) -> None:
    """Test hook: once a chunk of this shard is on disk (chunks are saved on a background
    thread, after the progress call), write ``running-<shard>`` holding this worker's pid, so a
    test can kill the process with its node, then wait for ``go``."""
    while not any(cache_dir.rglob(chunk_glob)):
        time.sleep(0.05)
    (hold / f"running-{shard}").write_text(str(os.getpid()))
    while not (hold / "go").exists():
        time.sleep(0.05)
