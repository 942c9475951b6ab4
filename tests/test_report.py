"""report.html: one self-contained page per run (no server, nothing fetched), escaped, sortable."""

from __future__ import annotations

import base64
import re

import numpy as np

from pipeline.core.config import SweepConfig
from pipeline.runs import report
from pipeline.runs.plots import plot_confusion_matrix
from pipeline.train.sweep import run_sweep

from conftest import cache_from, separable


def _sources(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', page)


def test_a_sweep_writes_a_self_contained_report(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('[[head]]\nname = "logreg"\npooling = ["flatten", "avg"]\n')
    cache = cache_from(
        tmp_path / "c.h5", {"train": separable(10), "validation": separable(5, seed=1), "test": separable(5, seed=2)}
    )
    result = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp_path / "runs", n_jobs=1), cache)
    page = (result.run_dir / "report.html").read_text()
    assert page.count('<tr class="winner">') == 1
    winner_row = re.search(r'<tr class="winner">(.*?)</tr>', page).group(1)
    assert f"<td>{result.winner['index']}</td>" in winner_row
    assert f"<td>{result.winner['pooling']}</td>" in winner_row
    assert len(re.findall(r"<tbody>.*?</tbody>", page, re.S)[0].split("<tr")) - 1 == len(result.rows)
    for column in ("val_accuracy", "val_log_loss", "test_accuracy", "fit_seconds"):
        assert f"<th>{column}</th>" in page
    sources = _sources(page)
    assert sources
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    png = base64.b64decode(sources[0].split(",", 1)[1])
    assert png == (result.run_dir / "confusion.png").read_bytes()
    assert "&quot;fingerprint&quot;: &quot;synthetic&quot;" in page  # the cache's metadata
    assert 'addEventListener("click"' in page


def test_values_from_users_are_escaped(tmp_path):
    rows = [{"index": 0, "head": "<script>alert(1)</script>", "winner": True}]
    page = report.write_report(
        tmp_path / "report.html",
        "a & b",
        [("t", report.table(rows, ["head"]))],
        notes=["<b>note</b>"],
        meta={"class_names": ["<img src=x>"]},
    ).read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x>" not in page
    assert "<b>note</b>" not in page
    assert "<title>a &amp; b</title>" in page


def test_compare_and_finetune_pages_inline_their_charts(tmp_path):
    plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], tmp_path / "compare.png", "chart")
    rows = [{"backbone": "vgg16", "val_accuracy": 0.9}, {"backbone": "resnet50", "val_accuracy": 0.95}]
    page = report.table_report(
        tmp_path, "compare", rows, ["backbone", "val_accuracy"], ["compare.png", "missing.png"]
    ).read_text()
    assert [s[:22] for s in _sources(page)] == ["data:image/png;base64,"]
    assert "<td>resnet50</td><td>0.9500</td>" in page
    assert "compare.png" in page
    assert "missing.png" not in page
