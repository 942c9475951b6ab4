"""compare with sizes as an axis: two sizes make two caches (hits the second time) and one
table; each row carries its winner's backbone passes in seed-recipe units, and the overall
winner is picked on validation alone."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from pipeline.app.compare import compare
from pipeline.core import accounting
from pipeline.core.config import ExtractConfig, SweepConfig
from pipeline.core.errors import ConfigError
from pipeline.features.registry import flops_per_image

from conftest import make_folder


def test_compare_two_sizes_makes_two_caches_and_one_table(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 5, "validation": 3, "test": 3}, size=48)
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = "avg"\nC = [0.01, 1.0]\n')
    base = ExtractConfig(data=str(root), weights="random", cache_dir=tmp_path / "cache", quiet=True)
    cfg = SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1)
    result = compare(["vgg16"], base, cfg, sizes=[32, 64])
    caches = sorted(p.name for p in (tmp_path / "cache").rglob("*.h5"))
    assert len(caches) == 2 and "-32" in caches[0] + caches[1] and "-64" in caches[0] + caches[1]
    rows = list(csv.DictReader(open(result.csv)))
    assert [(r["backbone"], r["size"]) for r in rows] == [("vgg16", "32"), ("vgg16", "64")]
    for r, size in zip(result.rows, (32, 64), strict=True):
        # the winner scored 10 train + 6 validation + 6 test images at this size's FLOPs
        expected = accounting.recipe_passes(22, flops_per_image(size, "block5_pool"))
        assert r["passes"] == pytest.approx(expected) and r["recipe_share"] == pytest.approx(expected / 150_000)
    winners = [r for r in result.rows if r["winner"]]
    assert len(winners) == 1 and winners[0]["val_accuracy"] == max(r["val_accuracy"] for r in result.rows)
    assert result.table.count("\n* ") + result.table.startswith("* ") == 1 and "64" in result.table
    assert {r["selected_on"] for r in result.rows} == {"validation"} and "winner (validation only)" in result.table
    again = compare(["vgg16"], base, dataclasses.replace(cfg, cv=2), sizes=[32, 64])  # sizes picked out of fold
    assert [r["extract_seconds"] for r in again.rows] == [0.0, 0.0]  # cache hits
    assert {r["selected_on"] for r in again.rows} == {"out of fold"} and "winner (out of fold only)" in again.table
    assert len(list((tmp_path / "cache").rglob("*.h5"))) == 2
    with pytest.raises(ConfigError, match="distinct sizes"):
        compare(["vgg16"], base, cfg, sizes=[32, 32])
