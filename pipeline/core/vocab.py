"""The allowed values of every option, and the names of splits: one home each.

Configs validate against these, the CLI offers them as choices, the cache format and the
sweep use the same split names. A leaf module: it imports only ``errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.core.errors import ConfigError

SPLITS = ("train", "validation", "test")  # in this order everywhere: files, tables, reports
DTYPES = ("float32", "float16")  # stored feature dtype
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")  # compute; int8: OpenVINO (the openvino extra)
COMPRESSIONS = ("none", "lzf", "gzip")  # HDF5 filter for features
TRAIN_ON = ("clean", "views", "both", "tta")  # stage two: clean, augmented views, both; tta: clean + test-time views
STREAM_MODES = ("auto", "on", "off")  # stage two: train from the HDF5 file in chunks
ENGINES = ("local", "ray")  # where extract runs: this process, or Ray tasks
RUNTIMES = ("keras", "openvino")  # what runs the forward pass; openvino runs int8 only (--precision int8)
DECODERS = ("auto", "cpu", "gpu")  # JPEG decoding; gpu: features.gpu_decode (torchvision + CUDA)
POOLINGS = ("flatten", "avg", "max")  # how a head turns (h, w, c) maps into a vector
MAPS = ("pca", "umap")  # inspect's 2-D map of the embedding; umap: the `inspect` extra
EXPORT_FORMATS = ("keras", "tf_saved_model", "onnx", "litert", "openvino")  # `featcache export`; keras always written
EXPORT_PRECISIONS = ("cache", "float32", "bfloat16")  # export compute; cache: the precision the features had

_VIEW = "@aug"  # train@aug3: the 3rd cached augmented view of every train image
_TTA = "@tta"  # test@tta1: the 1st cached test-time view (the mirror) of every test image


def check_choice(name: str, value: Any, allowed: Sequence[Any], where: str | None = None) -> Any:
    """``value`` when it is one of ``allowed``, else a ConfigError naming the option, the value
    received and the choices (prefixed by ``where``, e.g. a sweep file, when given)."""
    if value not in allowed:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{name} must be one of {tuple(allowed)}; received {name}={value!r}")
    return value


def view_split(k: int) -> str:
    """Name of the split holding the k-th (1-based) augmented view of every train image."""
    return f"train{_VIEW}{k}"


def tta_split(split: str, k: int) -> str:
    """Name of the split holding the k-th (1-based) test-time view of every image of ``split``
    (view 1 the mirror, then the augmentation policy's views: ``features.views``)."""
    return f"{split}{_TTA}{k}"


def is_view(split: str) -> bool:
    """True for a cached view (``train@aug<k>``, ``<split>@tta<k>``), False for train/validation/test."""
    return _VIEW in split or _TTA in split


__all__ = [
    "COMPRESSIONS",
    "DECODERS",
    "DTYPES",
    "ENGINES",
    "EXPORT_FORMATS",
    "EXPORT_PRECISIONS",
    "MAPS",
    "POOLINGS",
    "PRECISIONS",
    "RUNTIMES",
    "SPLITS",
    "STREAM_MODES",
    "TRAIN_ON",
    "check_choice",
    "is_view",
    "tta_split",
    "view_split",
]
