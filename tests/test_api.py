"""The README's Python example runs as written, from an empty folder, and writes its cache and
run folder there; the package's API names are the functions the stages use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"runs this very block\):\n\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its Python example (the block after 'runs this very block')"
    return m.group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs_from_an_empty_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRACK": "0"}
    env.pop("FEATCACHE_HOME", None)
    env.pop("FEATCACHE_CACHE_DIR", None)
    env.pop("FEATCACHE_RUNS_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    head, accuracy, run_dir = lines[0].split()
    assert head in ("logreg", "svm", "mlp") and 0.5 < float(accuracy) <= 1.0  # 10 digit classes: chance is 0.1
    assert Path(run_dir).parent == tmp_path / "runs" and (Path(run_dir) / "report.html").is_file()
    assert list((tmp_path / "cache").rglob("*.h5")), "the cache goes under the working folder"
    assert "('0', '1', '2', '3', '4', '5', '6', '7', '8', '9') vgg16 block5_pool 32" in lines[1]


def test_the_package_exports_the_stage_functions_lazily():
    code = (
        "import sys, pipeline as fc\n"
        "heavy = [m for m in ('sklearn', 'h5py', 'tensorflow', 'keras') if m in sys.modules]\n"
        "from pipeline.features.extract import extract\n"
        "from pipeline.cache.store import load_split, read_meta\n"
        "from pipeline.app import api\n"
        "assert fc.read_meta is read_meta and fc.load_split is load_split and fc.classify is api.classify\n"
        "assert fc.extract is api.extract and fc.predict is api.predict\n"
        "print(heavy, 'tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "False"]  # import pipeline loads nothing heavy; the API no TensorFlow


def test_unknown_api_options_are_named(tmp_path):
    import pipeline as fc
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['sise'\] for ExtractConfig"):
        fc.extract(data="digits", sise=32)
    with pytest.raises(ConfigError, match="classify needs a cache"):
        fc.classify()
