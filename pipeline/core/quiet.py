"""TensorFlow's start-up lines (oneDNN, CUDA stubs, cuInit) kept off the terminal.

TensorFlow 2.16+ logs them through absl before its log level is read, so
``TF_CPP_MIN_LOG_LEVEL`` cannot hide them. A one-shot import hook runs the first
``import tensorflow`` (and its device discovery) with file descriptor 2 pointed at
/dev/null; Python exceptions still propagate, and everything after the import prints as
usual. The CLI installs it unless ``-v``; it sets ``FEATCACHE_QUIET_TF=1`` so that worker
processes, which import ``pipeline``, install it too.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

ENV = "FEATCACHE_QUIET_TF"


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null (C libraries write there, not to sys.stderr)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one shot: later imports are ordinary
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            with stderr_silenced():
                original(module)
                with contextlib.suppress(Exception):  # device discovery prints its own lines (cuInit)
                    module.config.list_physical_devices()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Silence the next first import of TensorFlow in this process and its workers."""
    os.environ[ENV] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())
