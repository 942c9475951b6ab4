"""The package's layers (README "Layout"): imports only go down, stage one and stage two never
import each other, and the check sees imports written inside functions. Also: an installed
featcache finds its default grid inside the package and writes under the working folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts on the package copied under ``root``."""
    return subprocess.run(
        [str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path):
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_package_keeps_its_layers(copy):
    proc = _lint(copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("core/errors.py", "from pipeline.train import sweep"),  # up from the bottom
        ("cache/store.py", "from pipeline.features import backbone"),  # up from cache
        ("features/backbone.py", "from pipeline.train import heads"),  # stage one -> stage two
        ("train/heads.py", "from pipeline.features import backbone"),  # stage two -> stage one
        ("runs/folder.py", "from pipeline.cache import store"),  # two independent siblings
    ],
)
def test_an_upward_import_inside_a_function_breaks_the_lint(copy, module, imported):
    path = copy / "pipeline" / module
    path.write_text(path.read_text() + f"\n\ndef _deferred():\n    {imported}\n\n    return None\n")
    proc = _lint(copy)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout or "Broken contracts" in proc.stdout


def test_a_cycle_inside_a_layer_breaks_the_lint(copy):
    path = copy / "pipeline" / "core" / "errors.py"  # errors <- vocab already; vocab <- errors closes a loop
    path.write_text(path.read_text() + "\n\ndef _loop():\n    from pipeline.core import vocab\n\n    return vocab\n")
    proc = _lint(copy)
    assert proc.returncode != 0 and "cycles" in proc.stdout, proc.stdout
