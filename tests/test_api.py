"""The README's Python example runs as written, from an empty folder, and writes its cache and
run folder there; the package's API names are the functions the stages use."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"runs this very block\):\n\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its Python example (the block after 'runs this very block')"
    return m.group(1)


_README_RUN: dict[str, tuple[subprocess.Popen, Path]] = {}


def start_readme_example() -> None:
    """Start the README's block in a fresh Python, in an empty folder, in the background (once).
    It shares nothing with the other tests and runs for about a minute, so conftest starts it
    when the session starts and runs its test last: the two cores overlap it with the rest."""
    if "run" in _README_RUN:
        return
    base = Path(tempfile.mkdtemp(prefix="featcache-readme-"))
    work = base / "work"
    work.mkdir()  # the working folder: empty
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRACK": "0"}
    env.pop("FEATCACHE_HOME", None)
    env.pop("FEATCACHE_CACHE_DIR", None)
    env.pop("FEATCACHE_RUNS_DIR", None)
    with open(base / "stdout", "w") as out, open(base / "stderr", "w") as err:  # files: no pipe to fill up
        proc = subprocess.Popen(
            [sys.executable, "-c", readme_example()],
            cwd=work,
            env=env,
            stdout=out,
            stderr=err,
            preexec_fn=lambda: os.nice(5),  # the foreground tests keep their pace
        )
    _README_RUN["run"] = (proc, base)


def stop_readme_example() -> None:
    """Kill a README run that no test waited for (a session stopped early) and remove its folder."""
    proc, base = _README_RUN.pop("run", (None, None))
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_the_readme_python_example_runs_from_an_empty_folder():
    start_readme_example()  # a no-op when conftest started it with the session
    proc, base = _README_RUN["run"]
    try:
        proc.wait(timeout=600)
        stdout, stderr = (base / "stdout").read_text(), (base / "stderr").read_text()
        work = base / "work"
        assert proc.returncode == 0, stderr[-3000:]
        lines = stdout.strip().splitlines()
        head, accuracy, run_dir = lines[0].split()
        assert head in ("logreg", "svm", "mlp") and 0.5 < float(accuracy) <= 1.0  # 10 digit classes: chance is 0.1
        assert Path(run_dir).parent == work / "runs" and (Path(run_dir) / "report.html").is_file()
        assert list((work / "cache").rglob("*.h5")), "the cache goes under the working folder"
        assert "('0', '1', '2', '3', '4', '5', '6', '7', '8', '9') vgg16 block5_pool 32" in lines[1]
    finally:
        stop_readme_example()


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
