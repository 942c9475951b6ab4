"""Saving and loading heads in formats that load without running code.

A run folder is something people send each other, so opening one must not execute
anything it contains. A pickle (``winner.joblib``, the old format) can run arbitrary code
on load and is tied to the library versions that wrote it, so heads are stored as:

``<stem>.skops``  the estimator (settings, ``classes_``, scikit-learn parts), written by
                  ``skops.io``; loading audits every type named in the file against
                  ``TRUSTED_TYPES`` plus skops' own vetted defaults (scikit-learn
                  estimators, numpy arrays and dtypes, builtin containers) *before*
                  anything is built, and refuses the file if any other type appears.
``<stem>.keras``  for Keras heads only: the model, loaded with ``safe_mode=True`` (no
                  Lambda bytecode), then attached to the estimator as ``model_``.

Old folders holding only ``<stem>.joblib`` load only with ``trust_pickle=True``
(``--trust-pickle``), meant for folders the user made themselves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.core import layers
from pipeline.core.errors import CacheError
from pipeline.core.provenance import versions
from pipeline.train import ensemble
from pipeline.train.heads import KerasModelHead, LogRegHead, MLPHead, SVMHead, _KerasHead

log = logging.getLogger(__name__)

HEAD_TYPES: tuple[type, ...] = (LogRegHead, SVMHead, MLPHead, KerasModelHead)

# The types our heads need beyond skops' defaults. skops rebuilds them with __new__ and
# __setstate__/__dict__, never __reduce__; the only __setstate__ with side effects is
# _KerasHead's (a model given as bytes), which loads in Keras safe mode.
TRUSTED_TYPES: list[str] = sorted(
    [
        *(f"{t.__module__}.{t.__qualname__}" for t in HEAD_TYPES),
        "sklearn.calibration._CalibratedClassifier",  # SVMHead's CalibratedClassifierCV internals
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.model_selection._split.StratifiedShuffleSplit",  # SVMHead's one calibration split (issue 29)
    ]
)

# Keras releases before this let a crafted .keras file run code even in safe mode
# (CVE-2025-1550, CVE-2025-8747/9906, CVE-2026-1462 via TFSMLayer, fixed in 3.14).

CHECKED_LIBRARIES = ("numpy", "scikit-learn", "keras")

PICKLE_HELP = (
    "pickle files can run arbitrary code when loaded; pass --trust-pickle only for a folder you made "
    "yourself (or fully trust), and re-save it in the safe format by re-running the sweep"
)


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def check_versions(saved: dict[str, Any] | None, where: str | Path = "the run folder") -> list[str]:
    """Warn (never fail) when ``saved`` (run.json ``versions``) has a different MAJOR
    version of numpy, scikit-learn or Keras than is installed; returns the differences."""
    now = versions()
    diffs = [
        f"{lib} {saved[lib]} (saved) vs {now[lib]} (installed)"
        for lib in CHECKED_LIBRARIES
        if saved and saved.get(lib) and now.get(lib) and _major(saved[lib]) != _major(now[lib])
    ]
    if diffs:
        log.warning(
            "%s was saved under other major library versions: %s; predictions may differ or loading may fail",
            where,
            "; ".join(diffs),
        )
    return diffs


# --------------------------------------------------------------------------- saving


def _tmp_for(path: Path) -> Path:
    """Same folder (so the rename is atomic), same suffix (Keras insists on .keras)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def save_head(head: Any, folder: str | Path, stem: str = "winner") -> list[Path]:
    """Write ``<stem>.skops`` (and ``<stem>.keras`` for a Keras head) into ``folder``.

    Each file is written to a temporary name and renamed, the ``.keras`` first, so a
    crash never leaves a ``.skops`` pointing at a half-written model. Returns the paths."""
    import skops.io as sio

    if not isinstance(head, HEAD_TYPES):
        raise TypeError(
            f"save_head saves featcache heads ({', '.join(t.__name__ for t in HEAD_TYPES)}); "
            f"received {type(head).__name__}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bare = head
    if isinstance(head, _KerasHead) and "model_" in head.__dict__:
        keras_path = folder / f"{stem}.keras"
        tmp = _tmp_for(keras_path)
        try:
            head.model_.save(tmp)
            os.replace(tmp, keras_path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(keras_path)
        # skops gets the estimator without its model (_KerasHead.__getstate__ would embed
        # it as .keras bytes); a shallow attribute copy leaves ``head`` untouched.
        bare = object.__new__(type(head))
        bare.__dict__.update({k: v for k, v in head.__dict__.items() if k != "model_"})
    skops_path = folder / f"{stem}.skops"
    tmp = _tmp_for(skops_path)
    try:
        sio.dump(bare, tmp)
        os.replace(tmp, skops_path)
    finally:
        tmp.unlink(missing_ok=True)
    written.append(skops_path)
    return written


# --------------------------------------------------------------------------- loading


def _load_skops(path: Path) -> Any:
    import skops.io as sio

    try:
        untrusted = sorted(set(sio.get_untrusted_types(file=path)) - set(TRUSTED_TYPES))
    except Exception as e:  # not a zip, no schema.json, unknown protocol: nothing was built yet
        raise CacheError(
            f"{path} is not a readable skops file ({type(e).__name__}: {e}); "
            "the run folder is damaged or was not made by featcache"
        ) from e
    if untrusted:
        raise CacheError(
            f"{path} names type(s) outside featcache's trusted list: {', '.join(untrusted)}; refusing "
            "to load it (a head saved by featcache never holds these: the file was altered or made "
            "elsewhere)"
        )
    try:
        head = sio.load(path, trusted=TRUSTED_TYPES)
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(
            f"cannot load {path} ({type(e).__name__}: {e}); the run folder is damaged or was made "
            "by another featcache version"
        ) from e
    if not isinstance(head, HEAD_TYPES):
        raise CacheError(
            f"{path} holds a {type(head).__module__}.{type(head).__qualname__}, not a featcache head "
            f"({', '.join(t.__name__ for t in HEAD_TYPES)})"
        )
    return head


def load_head(
    folder: str | Path, stem: str = "winner", trust_pickle: bool = False, versions: dict[str, Any] | None = None
) -> Any:
    """The head saved in ``folder`` by :func:`save_head`, checked before anything is built.

    Raises CacheError (exit 3) naming any type outside the trusted list, a damaged file,
    or an old ``<stem>.joblib`` folder without ``trust_pickle``. ``versions`` (run.json's)
    only warns on a different major version."""
    folder = Path(folder)
    check_versions(versions, folder)
    skops_path, pickle_path = folder / f"{stem}.skops", folder / f"{stem}.joblib"
    if not skops_path.is_file():
        if not pickle_path.is_file():
            raise CacheError(
                f"{folder} has no {skops_path.name}; give a run folder made by `make classify` "
                "(or `featcache finetune`)"
            )
        if not trust_pickle:
            raise CacheError(
                f"{folder} is in the old format: its head is a pickle ({pickle_path.name}) and no "
                f"{skops_path.name}; {PICKLE_HELP}"
            )
        import joblib

        log.warning("loading the pickle %s because --trust-pickle was given: it can run code", pickle_path)
        return joblib.load(pickle_path)
    head = _load_skops(skops_path)
    if isinstance(head, _KerasHead) and hasattr(head, "classes_"):  # fitted: its model is beside it
        keras_path = folder / f"{stem}.keras"
        if not keras_path.is_file():
            raise CacheError(
                f"{skops_path} is a Keras head ({type(head).__name__}) but {keras_path.name} is "
                "missing from the folder; copy the whole run folder"
            )
        head.model_ = layers.load_model_safely(keras_path)
    return head


def load_winner(folder: str | Path, info: dict[str, Any], trust_pickle: bool = False) -> Any:
    """The head a run folder's predictions come from: its winner, or, when run.json says the
    ensemble won, an ``Ensemble`` of the members saved under their config names (in order)."""
    recorded = info.get("ensemble") or {}
    if not recorded.get("won"):
        return load_head(folder, trust_pickle=trust_pickle, versions=info.get("versions"))
    names = list(recorded.get("members") or [])
    members = [
        load_head(folder, stem=ensemble.stem(n), trust_pickle=trust_pickle, versions=info.get("versions"))
        for n in names
    ]
    return ensemble.Ensemble(members, names)
