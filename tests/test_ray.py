"""``--engine ray`` on a local Ray with 2 CPUs: shards as Ray tasks, merged into the same
cache a single process makes; a slice that fails once is retried to a complete result."""

from __future__ import annotations

import h5py
import pytest

from pipeline.core.config import ExtractConfig
from pipeline.features.extract import extract

from conftest import assert_same_cache, make_folder

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg_for(data, cache_dir) -> ExtractConfig:
    return ExtractConfig(data=str(data), cache_dir=cache_dir, size=32, weights="random", chunk_size=4, quiet=True)


def test_ray_shards_equal_a_single_process_and_a_failed_slice_is_retried(tmp_path):
    from pipeline.features.ray_engine import extract_ray

    root = make_folder(tmp_path / "imgs", {"train": 6, "test": 3}, size=32)
    (root / "train" / "cats" / "bad.png").write_bytes(b"junk")
    markers = tmp_path / "markers"
    markers.mkdir()
    result = extract_ray(cfg_for(root, tmp_path / "c"), shards=2, fail_once=markers)
    assert sorted(m.name for m in markers.iterdir()) == ["shard-0", "shard-1"]  # both failed once, then retried
    with h5py.File(result.path) as f:
        assert f["train/features"].is_virtual
    single = extract(cfg_for(root, tmp_path / "single"))
    assert_same_cache(result.path, single.path)
    assert [p for p, _ in result.skipped["train"]] == ["train/cats/bad.png"]
    assert extract_ray(cfg_for(root, tmp_path / "c"), shards=2).hit  # nothing to do: no task runs


def test_without_retries_the_failure_is_reported_and_no_cache_appears(tmp_path):
    from pipeline.features.ray_engine import extract_ray

    root = make_folder(tmp_path / "imgs", {"train": 2}, size=32)
    markers = tmp_path / "markers"
    markers.mkdir()
    with pytest.raises(ray.exceptions.RayTaskError, match="injected failure"):
        extract_ray(cfg_for(root, tmp_path / "c"), shards=2, max_retries=0, fail_once=markers)
    assert not list((tmp_path / "c").rglob("*.h5"))
