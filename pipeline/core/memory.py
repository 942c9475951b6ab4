"""Memory budgets: "4GB" to bytes, and this machine's RAM.

Stage two decides between in-memory and streaming training from a budget; the config checks
the budget's text when it is made, so this lives in ``core``.
"""

from __future__ import annotations

import os
import re

from pipeline.core.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "T": 2**40,
    "TB": 2**40,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_budget(text: str | int | None) -> int | None:
    """Bytes from "4GB", "512MB", "1.5G" or a plain number; None for "auto"/None (see ``auto_budget``)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"memory budget {text!r} is not a size; give e.g. 4GB, 512MB or auto")
        value, unit = float(m.group(1)), m.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory budget must be positive; received {text!r}")
    return size


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 when the OS will not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def auto_budget() -> int:
    """Half the machine's RAM: stable between runs (unlike free memory), and room for the rest."""
    return physical_memory() // 2 or 4 * 2**30


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


__all__ = ["auto_budget", "gb", "parse_budget", "physical_memory"]
