"""Compute precision of stage one: which one this machine runs fastest without losing accuracy.

float32 is not a modern CPU's limit: CPUs with AVX512-BF16 or AMX run Keras's
``mixed_bfloat16`` policy much faster (BENCHMARKS.md, "Precision"), GPUs run
``mixed_float16`` faster, and a CPU without those instructions may run either one no
faster, or slower, than float32. ``resolve("auto")`` decides from the CPU's flags and, the
first time on a machine, a short timed probe whose result is remembered in a small JSON
memo (keyed by CPU, flags and library versions) so later runs don't repeat it.

The precision changes the features (bfloat16 keeps 8 bits of mantissa), so it belongs to
the cache's identity: ``cache_suffix`` and the ``precision`` identity field. ``int8`` is
never chosen by ``auto`` (it costs accuracy); asked for, it runs on OpenVINO
(``pipeline.features.quantize``). Nothing here imports Keras at import time; options are checked
before any model is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import lean
from pipeline.core.vocab import PRECISIONS, check_choice
from pipeline.features import machine

log = logging.getLogger(__name__)

# int8 runs the float32 Keras model converted by OpenVINO and quantised by NNCF (optional extra)
_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16", "int8": "float32"}
_SUFFIXES = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16", "int8": "-int8"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either one: the CPU has bfloat16 dot products
ENV = "FEATCACHE_PRECISION"  # pins what ``auto`` resolves to on a machine (CI, reproducible benchmarks)
MARGIN = 1.15  # auto keeps bfloat16 only when the probe finds it at least this much faster
MEMO_VERSION = 1
Probe = Callable[[], "tuple[float, float]"]  # () -> (float32 img/s, bfloat16 img/s)


@dataclass(frozen=True)
class Choice:
    """The precision a run uses, and why (printed, and stored in the cache's metadata)."""

    precision: str  # "float32" | "bfloat16" | "float16" | "int8"
    reason: str
    probed: bool = False  # True when a timing probe ran in this call (not read from the memo)
    requested: str = "auto"

    @property
    def policy(self) -> str:
        return keras_policy(self.precision)

    def as_meta(self) -> dict[str, Any]:
        """What to store in the cache's metadata (not its identity: only ``precision`` is)."""
        return {
            "precision": self.precision,
            "requested": self.requested,
            "reason": self.reason,
            "keras_policy": self.policy,
            "cpu": machine.cpu_name(),
        }


def check(precision: str) -> str:
    """``precision`` if it is one of PRECISIONS, else a ConfigError naming it and the choices."""
    return check_choice("precision", precision, PRECISIONS)


def keras_policy(precision: str) -> str:
    """The Keras dtype policy of a resolved precision ("auto" must be resolved first)."""
    check(precision)
    if precision == "auto":
        raise ValueError("resolve('auto') before asking for its Keras policy")
    return _POLICIES[precision]


def cache_suffix(precision: str) -> str:
    """Appended to the cache file name: "" for float32 (existing caches keep their names),
    "-bf16", "-fp16" for the mixed policies, "-int8" for OpenVINO int8."""
    keras_policy(precision)
    return _SUFFIXES[precision]


@contextlib.contextmanager
def policy_scope(precision: str) -> Iterator[str]:
    """Build layers under ``precision``'s Keras policy; the global policy is restored after
    (layers keep the policy they were built with)."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(keras_policy(precision))
    try:
        yield keras_policy(precision)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _versions() -> str:
    """Library versions a probe depends on, read without importing them (fast)."""
    from importlib import metadata

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    out = []
    for package in ("keras", {"tensorflow": "tensorflow", "jax": "jaxlib", "torch": "torch"}.get(backend, backend)):
        try:
            out.append(f"{package}{metadata.version(package)}")
        except metadata.PackageNotFoundError:
            out.append(f"{package}?")
    return "-".join(out)


def memo_key(name: str, flags: set[str], versions: str) -> str:
    """What a probe result depends on: the CPU, its bfloat16/AVX-512 flags, the libraries, the cores."""
    relevant = sorted(f for f in flags if f.startswith(("amx", "avx512")) or f in ("avx2", "fma"))
    return f"{name}|{','.join(relevant)}|{versions}|{os.cpu_count()}cores"


def default_memo() -> Path:
    """Per machine, not per cache: ``$XDG_CACHE_HOME/featcache/precision.json``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "featcache" / "precision.json"


def _read_memo(memo: Path) -> dict[str, Any]:
    try:
        data = json.loads(memo.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged memo only costs a new probe
        log.warning("ignoring unreadable precision memo %s (%s); probing again", memo, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != MEMO_VERSION or not isinstance(data.get("machines"), dict):
        return {}
    return data


def _write_memo(memo: Path, key: str, entry: dict[str, Any]) -> None:
    data = _read_memo(memo) or {"version": MEMO_VERSION, "machines": {}}
    data["machines"][key] = entry
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, memo)
    except OSError as e:  # a read-only home: the choice still holds for this run
        log.warning("could not remember the precision probe in %s (%s)", memo, e)


# --------------------------------------------------------------------------- the probe


def _probe_model(size: int) -> Any:
    """VGG16's first three blocks: the conv shapes that dominate the real forward pass."""
    import keras

    x = inp = keras.Input((size, size, 3))
    for _block, (convs, channels) in enumerate(zip((2, 2, 3), (64, 128, 256), strict=True), 1):
        for _ in range(convs):
            x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inp, keras.ops.cast(x, "float32"))


def timed_probe(size: int = 64, batch: int = 16, seconds: float = 0.6, rounds: int = 2) -> tuple[float, float]:
    """(float32 img/s, bfloat16 img/s) of a small VGG-like stack, interleaved, best of ``rounds``.

    About 3-5 s on 2 cores, most of it the two warm-ups; run once per machine (memo).
    """
    import keras

    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 100, (batch, size, size, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    models = {}
    for p in ("float32", "bfloat16"):
        with policy_scope(p):
            models[p] = _probe_model(size)
        models[p].predict_on_batch(x)  # trace and set up kernels outside the timing
    best = {"float32": 0.0, "bfloat16": 0.0}
    for _ in range(rounds):
        for p, model in models.items():
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
                model.predict_on_batch(x)
                n += 1
            best[p] = max(best[p], n * batch / elapsed)
    return best["float32"], best["bfloat16"]


# --------------------------------------------------------------------------- the decision


def resolve(
    requested: str,
    *,
    gpu: bool | None = None,
    probe: Probe | None = None,
    memo: Path | None = None,
    flags: set[str] | None = None,
    name: str | None = None,
    versions: str | None = None,
) -> Choice:
    """The precision to run, and why.

    Explicit values pass through (with a warning in ``reason`` where they are slow here).
    ``auto``: GPU -> float16 (mixed); CPU with amx_bf16 under TensorFlow's oneDNN -> bfloat16
    without a probe (AMX: several times float32, issue 31); other CPUs with amx_bf16 or
    avx512_bf16 -> bfloat16 if a short timed probe (remembered in ``memo``) finds it at least
    MARGIN faster than float32; otherwise float32. ``flags``, ``name``, ``versions`` and
    ``probe`` are injectable for tests.
    """
    check(requested)
    pinned = os.environ.get(ENV, "")
    if requested == "auto" and pinned and pinned != "auto":
        check(pinned)
        return Choice(pinned, f"auto pinned by {ENV}={pinned}", False, "auto")
    flags = machine.cpu_flags() if flags is None else flags
    bf16_cpu = [f for f in BF16_FLAGS if f in flags]
    if requested != "auto":
        if gpu is None and requested != "float32":
            gpu = machine.has_gpu()
        return Choice(requested, _explicit_reason(requested, gpu, bf16_cpu), False, requested)
    if gpu is None:
        gpu = machine.has_gpu()
    if gpu:
        return Choice("float16", "auto: a GPU is present; mixed float16 runs on its tensor cores", False, "auto")
    if not bf16_cpu:
        return Choice(
            "float32",
            "auto: this CPU has neither amx_bf16 nor avx512_bf16, so bfloat16 would be "
            "emulated (no faster than float32)",
            False,
            "auto",
        )
    if "amx_bf16" in flags and _onednn_tensorflow():
        return Choice(
            "bfloat16",
            "auto: amx_bf16 present and TensorFlow runs oneDNN, whose AMX kernels run bfloat16 convolutions "
            "several times faster than float32 (no probe needed)",
            False,
            "auto",
        )
    name = machine.cpu_name() if name is None else name
    key = memo_key(name, flags, _versions() if versions is None else versions)
    memo = default_memo() if memo is None else memo
    entry = _read_memo(memo).get("machines", {}).get(key)
    probed = False
    if not _valid_entry(entry):
        try:
            entry = _probe_entry(probe or timed_probe)
        except Exception as e:  # bfloat16 kernels missing or broken here: float32 is always safe
            return Choice(
                "float32",
                f"auto: the bfloat16 probe failed ({type(e).__name__}: {str(e)[:160]}); using float32",
                True,
                "auto",
            )
        _write_memo(memo, key, entry)
        probed = True
    return _choose_from_probe(entry, bf16_cpu, "probed now" if probed else f"probe remembered in {memo}", probed)


def _onednn_tensorflow() -> bool:
    """True when the Keras backend is TensorFlow with oneDNN on (its default on x86): the
    stack whose AMX speed is known. JAX's XLA, or TF_ENABLE_ONEDNN_OPTS=0, are probed instead."""
    return lean.keras_backend() == "tensorflow" and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"


def _probe_entry(probe: Probe) -> dict[str, Any]:
    """Run the timed probe once: what the memo keeps for this machine."""
    t0 = time.perf_counter()
    fp32, bf16 = probe()
    return {
        "float32_img_s": round(float(fp32), 2),
        "bfloat16_img_s": round(float(bf16), 2),
        "probe_seconds": round(time.perf_counter() - t0, 2),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _choose_from_probe(entry: dict[str, Any], bf16_cpu: list[str], how: str, probed: bool) -> Choice:
    """bfloat16 when the probe found it at least MARGIN faster than float32, else float32."""
    fp32, bf16 = entry["float32_img_s"], entry["bfloat16_img_s"]
    speedup = bf16 / fp32 if fp32 > 0 else 0.0
    measured = (
        f"{', '.join(bf16_cpu)} present; bfloat16 {speedup:.2f}x float32 "
        f"({bf16:.1f} vs {fp32:.1f} img/s, small VGG-like stack, {how})"
    )
    if speedup >= MARGIN:
        return Choice("bfloat16", f"auto: {measured}", probed, "auto")
    return Choice("float32", f"auto: {measured}, below the {MARGIN:.2f}x needed to switch", probed, "auto")


def _valid_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), (int, float)) for k in ("float32_img_s", "bfloat16_img_s")
    )


def _explicit_reason(precision: str, gpu: bool | None, bf16_cpu: list[str]) -> str:
    if precision == "float32":
        return "requested float32"
    if gpu and precision != "int8":
        return f"requested {precision} (GPU present)"
    if precision == "int8":
        return (
            "requested int8 (OpenVINO + NNCF post-training quantisation, calibrated on train images; "
            "features differ from float32 by a few percent)"
        )
    if precision == "float16":
        return (
            "requested float16; note: CPUs have no fast float16 convolutions, so on this CPU it is "
            "usually slower than float32 (worth it on GPUs)"
        )
    if bf16_cpu:
        return f"requested bfloat16 ({', '.join(bf16_cpu)} present)"
    return (
        "requested bfloat16; note: this CPU has neither amx_bf16 nor avx512_bf16, so bfloat16 may run "
        "no faster, or slower, than float32"
    )


def relative_error(a: Any, b: Any) -> float:
    """||a - b|| / ||b||, in float64: how far features ``a`` are from reference ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    ref = float(np.linalg.norm(b))
    diff = float(np.linalg.norm(a - b))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
