"""Import Keras without the optional libraries it loads at import time and featcache never uses.

``import keras`` (TensorFlow backend) also imports, when they are installed: scikit-learn
(Keras's scikit-learn wrappers), pandas (DataFrame inputs to ``fit``), matplotlib (Keras's
plotting utilities), through ``tensorflow.lite``, JAX, and through TensorFlow's legacy
``tf.keras`` v1 training code, SciPy (``scipy.sparse.issparse``, numpy.f2py behind it).
featcache installs all of them for stage two and the JAX backend, and on 2 cores they are a
large share of the import (start-up rows of BENCHMARKS.md section 1b, issue 31). Stage one
imports Keras this way, and so does stage two wherever it first needs Keras: each sweep
worker that fits an MLP, and a process loading a saved Keras head (issue 29: the import
paid twice per sweep, by both workers).
Every one of those imports is guarded by ``try: ... except ImportError`` in Keras and
TensorFlow, so ``import_keras`` makes them fail for the duration of the import (a ``None``
entry in ``sys.modules``) and removes the block afterwards: a later ``import sklearn`` in
the same process works as usual. What is lost in this process is only what featcache never
uses: Keras's scikit-learn wrappers, pandas inputs to Keras, Keras's plotting helpers,
TFLite's JAX converter and sparse inputs to TensorFlow's legacy Keras v1 training. What a
backend imports itself is left alone under it (``NEEDED_BY_BACKEND``: JAX, and the SciPy that
JAX imports, when JAX is the Keras backend).

The import also creates hundreds of thousands of long-lived objects (TensorFlow's and
Keras's modules). The cyclic garbage collector finds nothing to free among them, yet walks
them all each time it runs: during the import, and once more while the interpreter exits.
So the collector is paused for the import, and what the import made is then moved out of
its reach (``gc.freeze``; the CLI freezes again at the end of a command).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

SKIPPED = ("sklearn", "pandas", "matplotlib", "jax", "scipy")
NEEDED_BY_BACKEND = {"jax": ("jax", "scipy")}
"""What a Keras backend imports itself, so never blocked under it: JAX needs SciPy (``jax.scipy``)."""


def keras_backend() -> str:
    """The backend ``import keras`` will choose: $KERAS_BACKEND, else keras.json, else tensorflow."""
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return str(json.loads((home / "keras.json").read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def import_keras() -> Any:
    """``keras``, imported without SKIPPED libraries the first time (a no-op after)."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    backend = keras_backend()
    needed = NEEDED_BY_BACKEND.get(backend, (backend,))
    blocked = [m for m in SKIPPED if m not in sys.modules and m not in needed]
    collecting = gc.isenabled()
    gc.disable()
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import keras
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        gc.freeze()
        if collecting:
            gc.enable()
    return keras
