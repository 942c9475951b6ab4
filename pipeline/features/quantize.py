"""int8 stage one: the frozen base quantised by OpenVINO + NNCF on the dataset's own images.

``--precision int8`` runs the float32 Keras base converted to OpenVINO and quantised by
NNCF's post-training quantisation, calibrated on a seeded sample of a few hundred train
images. A new calibration gives slightly different features, so the quantised model is part
of the cache's identity: it is made once, kept beside the cache as
``<cache stem>.openvino-<sha12>/`` (``model.xml``, ``model.bin``, ``calibration.json``), and its
SHA-256 is recorded in the cache's metadata. Incremental reruns, every shard of a sharded
run, and ``predict`` (which keeps a copy in the run folder) load that model instead of
recalibrating, and check its hash before use.

OpenVINO picks its int8 kernels for the CPU it runs on (AMX, AVX512-VNNI, AVX-VNNI or plain
AVX2), so the record names the CPU and its int8 flags. OpenVINO and NNCF are an optional
extra (``pip install 'featcache[openvino]'``); nothing here imports them at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.models import MODEL_FILES, RECORD, model_sha256
from pipeline.core.errors import CacheError, ConfigError
from pipeline.features.images import Decoder
from pipeline.features.machine import cpu_flags, cpu_name

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 300  # NNCF's default subset size; 288 in the measurement
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx2")  # what OpenVINO's kernels depend on
OPENVINO_MISSING = (
    "precision 'int8' runs on OpenVINO, which is not installed: "
    "`pip install 'featcache[openvino]'` (openvino + nncf), or use --precision bfloat16 / auto"
)


def require_openvino() -> tuple[Any, Any]:
    """(openvino, nncf), or a ConfigError saying how to install them."""
    try:
        import nncf
        import openvino
    except ImportError as e:
        raise ConfigError(f"{OPENVINO_MISSING} ({e})") from e
    return openvino, nncf


class OpenVINOEngine:
    """A compiled OpenVINO model with Keras's ``predict_on_batch`` and ``output_shape``, so
    ``backbone.forward`` and the extraction loop run it unchanged."""

    def __init__(self, compiled: Any, name: str, record: dict[str, Any] | None = None):
        self.compiled, self.name, self.record = compiled, name, record or {}
        self._request = compiled.create_infer_request()
        shape = compiled.outputs[0].get_partial_shape()
        self.output_shape = (None, *(int(d.get_length()) for d in list(shape)[1:]))

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._request.infer({0: x})[0], np.float32).copy()


def _quantize(model: Any, calibration: np.ndarray, batch_size: int, quiet: bool = False) -> Any:
    """NNCF post-training quantisation of a float32 Keras model (input as it takes it, e.g. uint8).
    ``quiet``: NNCF's progress bars (rich, on stdout) are swallowed, as ``--quiet`` promises."""
    ov, nncf = require_openvino()
    if calibration is None or len(calibration) == 0:
        raise ConfigError("precision 'int8' needs calibration images (a few train images); none were given")
    with warnings.catch_warnings():  # Keras warns about the input structure of the traced call
        warnings.simplefilter("ignore", UserWarning)
        converted = ov.convert_model(model, input=[[-1, *model.inputs[0].shape[1:]]])  # any batch size
    batches = [calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)]
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return nncf.quantize(converted, nncf.Dataset(batches), subset_size=len(batches))  # NNCF counts batches


def _compile(ov_model: Any, name: str, record: dict[str, Any] | None = None) -> OpenVINOEngine:
    ov, _ = require_openvino()
    # f32 for the layers left unquantised (OpenVINO would otherwise pick bf16 on CPUs that have it)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return OpenVINOEngine(compiled, name, record)


def openvino_engine(model: Any, calibration: np.ndarray, batch_size: int = 32) -> OpenVINOEngine:
    """int8 engine of a float32 Keras model, in memory (bench/; extraction keeps its model on disk).

    ``calibration``: a few hundred train images at most (64 take ~15 s on 2 cores at 150 px).
    """
    ov, nncf = require_openvino()
    return _compile(_quantize(model, calibration, batch_size), versions_label(ov, nncf))


def versions_label(ov: Any, nncf: Any) -> str:
    return f"openvino-int8 ({ov.__version__}, nncf {nncf.__version__})"


# --------------------------------------------------------------------------- kept beside the cache


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"int8 model {folder}: {RECORD} is missing or unreadable ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("model_sha256"), str):
        raise CacheError(f"int8 model {folder}: {RECORD} has no model_sha256")
    return record


def load(folder: Path, expect_sha256: str | None = None) -> OpenVINOEngine:
    """The int8 engine kept in ``folder``, after checking its files against its record (and
    against ``expect_sha256``, the hash the cache or run recorded)."""
    folder = Path(folder)
    ov, nncf = require_openvino()
    record = _read_record(folder)
    try:
        sha = model_sha256(folder)
    except OSError as e:
        raise CacheError(f"int8 model {folder}: {e}") from e
    for what, want in (("its calibration.json", record["model_sha256"]), ("the cache", expect_sha256)):
        if want is not None and sha != want:
            raise CacheError(
                f"int8 model {folder} has changed since {what} recorded it (SHA-256 {sha[:12]}, "
                f"expected {want[:12]}); its features would not match. Rebuild the cache with --force"
            )
    note = check_isa(record)
    if note:
        log.warning(note)
    ov_model = ov.Core().read_model(str(folder / MODEL_FILES[0]))
    return _compile(ov_model, versions_label(ov, nncf), record)


def folders(cache: Path) -> list[Path]:
    """The int8 models kept beside ``cache`` (finished ones; temporary folders start with a dot)."""
    return sorted(p for p in cache.parent.glob(f"{cache.stem}.openvino-*") if p.is_dir())


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the cache's metadata keeps of a record (the file list stays in calibration.json)."""
    cal = record["calibration"]
    return {
        "folder": record["folder"],
        "model_sha256": record["model_sha256"],
        "calibration": {k: cal[k] for k in ("split", "seed", "requested", "count", "files_sha256")},
        "engine": record["engine"],
        "cpu": record["cpu"],
        "int8_flags": record["int8_flags"],
    }


@dataclasses.dataclass(frozen=True)
class Sample:
    """Which train images calibrate the quantisation: seeded, recorded."""

    split: str
    rows: list[int]
    files: list[str]
    seed: int
    requested: int

    @property
    def files_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.files).encode()).hexdigest()


def plan_sample(source: Any, seed: int, count: int = CALIBRATION_IMAGES) -> Sample:
    """``count`` train images (all of them when fewer) drawn with ``seed``, in file order."""
    split = "train" if "train" in source.splits else next(iter(source.splits))
    n = len(source.splits[split].paths)
    if n == 0:
        raise ConfigError(f"precision 'int8' calibrates on the {split} images of {source.name}, and it has none")
    rows = sorted(np.random.default_rng(seed).choice(n, min(count, n), replace=False).tolist())
    return Sample(split, rows, [source.splits[split].paths[i] for i in rows], seed, count)


def _decode(source: Any, sample: Sample, size: int, decoder: Any) -> tuple[np.ndarray, list[str]]:
    got = list(decoder.batches(source.items(sample.split), sample.rows, size, 64))
    images = [b.images for b in got if len(b.rows)]
    if not images:
        raise ConfigError(
            f"precision 'int8': none of the {len(sample.rows)} calibration images of {source.name} could be decoded"
        )
    decoded = [int(i) for b in got for i in b.rows]
    paths = source.splits[sample.split].paths
    return np.concatenate(images), [paths[i] for i in decoded]


def _matches(record: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(record.get(k) == v for k, v in want.items())


def engine_for(
    cache: Path,
    model: Any,
    *,
    source: Any,
    size: int,
    seed: int,
    decode: tuple[int, int],
    recorded: dict[str, Any] | None,
    batch_size: int = 32,
    quiet: bool = False,
) -> OpenVINOEngine:
    """The int8 engine for ``cache``: the one its metadata names (``recorded``), else a kept
    one made from the same weights and calibration files (a resumed run, the other shards),
    else a new calibration. One process calibrates at a time (a lock beside the cache).
    ``decode``: (threads, processes) for decoding the calibration images."""
    from filelock import FileLock

    ov, nncf = require_openvino()
    if recorded is not None:  # rows we add must come from the model that made the rows we keep
        folder = cache.parent / recorded["folder"]
        if not (folder / MODEL_FILES[1]).exists():
            raise CacheError(
                f"{cache} holds int8 features from the quantised model {folder}, which is missing; new rows "
                "would not match them. Restore that folder, or rebuild with --force (calibrates again)"
            )
        return load(folder, recorded["model_sha256"])
    sample = plan_sample(source, seed)
    want = {
        "weights_sha256": model.base_weights_sha256,
        "size": size,
        "engine": versions_label(ov, nncf),
        "calibration_files_sha256": sample.files_sha256,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache.with_name(cache.name + ".int8.lock"))):
        for folder in folders(cache):
            try:
                if _matches(_read_record(folder), want):
                    log.info("int8: reusing the quantised model %s", folder.name)
                    return load(folder)
            except CacheError as e:
                log.warning("int8: ignoring %s (%s)", folder.name, e)
        return _calibrate(cache, model, source, size, sample, decode, want, batch_size, quiet)


def _calibrate(
    cache: Path,
    model: Any,
    source: Any,
    size: int,
    sample: Sample,
    decode: tuple[int, int],
    want: dict[str, Any],
    batch_size: int,
    quiet: bool,
) -> OpenVINOEngine:
    ov, _ = require_openvino()
    t0 = time.perf_counter()
    with Decoder(*decode) as decoder:
        pixels, files = _decode(source, sample, size, decoder)
    quantized = _quantize(model, pixels, batch_size, quiet)
    tmp = cache.parent / f".{cache.stem}.openvino-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # compress_to_fp16=False: the float constants left must stay what was calibrated
        ov.save_model(quantized, str(tmp / MODEL_FILES[0]), compress_to_fp16=False)
        sha = model_sha256(tmp)
        flags = cpu_flags()
        record = {
            **want,
            "folder": f"{cache.stem}.openvino-{sha[:12]}",
            "model_sha256": sha,
            "calibration": {
                "split": sample.split,
                "seed": sample.seed,
                "requested": sample.requested,
                "count": len(files),
                "files_sha256": sample.files_sha256,  # of the planned sample, what reuse is keyed on
                "files": files,  # those decoded (an unreadable file is left out)
            },
            "cpu": cpu_name(),
            "int8_flags": [f for f in INT8_FLAGS if f in flags],
            "seconds": round(time.perf_counter() - t0, 1),
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        final = cache.parent / record["folder"]
        if final.exists():  # the same model bytes kept already (a leftover with another record)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "int8: calibrated on %d %s images (seed %d) in %.1f s; kept in %s",
        len(files),
        sample.split,
        sample.seed,
        record["seconds"],
        final.name,
    )
    return load(final, sha)


def discard_unused(cache: Path, keep: str | None) -> None:
    """Remove int8 models beside ``cache`` other than ``keep`` (a folder name), once the
    cache that names ``keep`` is complete: rebuilt caches leave no stale models behind."""
    for folder in folders(cache):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def check_isa(record: dict[str, Any]) -> str | None:
    """A note when this CPU's int8 flags differ from the calibrating one's (features may differ slightly)."""
    flags = cpu_flags()
    here = [f for f in INT8_FLAGS if f in flags]
    there = record.get("int8_flags")
    if there is not None and list(there) != here:
        return (
            f"int8 model calibrated on a CPU with {there or 'no int8 flags'}, running here with "
            f"{here or 'none'}: OpenVINO picks other kernels, features may differ slightly"
        )
    return None
