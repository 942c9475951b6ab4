"""featcache's version: one home, read by the package, provenance records and ``--version``."""

__version__ = "0.1.0"
