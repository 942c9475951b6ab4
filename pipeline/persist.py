"""Saving and loading heads (placeholder until the safe format lands: joblib)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def save_head(head: Any, folder: Path, stem: str = "winner") -> list[Path]:
    import joblib

    out = Path(folder) / f"{stem}.joblib"
    joblib.dump(head, out)
    if hasattr(head, "save_keras"):
        head.save_keras(Path(folder) / f"{stem}.keras")
    return [out]


def load_head(folder: Path, stem: str = "winner", trust_pickle: bool = False, versions: dict | None = None) -> Any:
    import joblib

    return joblib.load(Path(folder) / f"{stem}.joblib")
