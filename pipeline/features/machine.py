"""What this machine has: the CPU's name and feature flags, and whether a GPU is usable.

Read cheaply and without importing TensorFlow (``has_gpu`` imports the Keras backend only
where a GPU device file exists), for ``precision``'s choice and ``quantize``'s record of
the CPU an int8 model was calibrated on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo(path: str = "/proc/cpuinfo") -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:  # not Linux, or no /proc: nothing known
        return ""


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (first processor); empty when unreadable."""
    for line in _cpuinfo(path).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_name(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or platform's guess."""
    for line in _cpuinfo(path).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown CPU"


GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")  # NVIDIA, AMD ROCm


def gpu_possible() -> bool:
    """Cheap and import-free: False when no GPU device file exists, so ``auto`` on a CPU
    machine (and every cache hit) never imports TensorFlow just to ask."""
    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def has_gpu() -> bool:
    """True when the Keras backend sees a GPU (TensorFlow, JAX or torch)."""
    if not gpu_possible():
        return False
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # a broken driver is "no GPU" for this decision
        return False
    return False
