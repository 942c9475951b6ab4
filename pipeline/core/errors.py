"""The two kinds of error a user can cause, and the exit codes the CLI maps them to.

A leaf module: every other module may import it, it imports nothing of the project.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A value the user gave is not usable; the message names it and what to do (exit 2)."""


class CacheError(RuntimeError):
    """A cache or run folder is missing, incomplete, locked, corrupt, or does not match what
    was asked for (exit 3)."""


__all__ = ["CacheError", "ConfigError"]
