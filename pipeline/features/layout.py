"""Where caches live and what they are called: the one module that turns extract options
into a cache file, and finds that file again for stage two, predict, finetune and compare.

``plan`` resolves the backbone's default size and layer once, checks every option and
input, and pins the weights, all before any model is built.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import store
from pipeline.cache.store import CacheKey
from pipeline.core.config import ExtractConfig
from pipeline.core.errors import CacheError
from pipeline.core.vocab import is_view
from pipeline.features import gpu_decode, precision, registry, sources, weights
from pipeline.features.images import printable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything decided before any work: options resolved, inputs listed, weights pinned."""

    cfg: ExtractConfig  # size and layer filled in
    source: sources.Source
    weights: weights.Weights
    key: CacheKey
    path: Path


def resolve_options(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with the backbone's default size and layer filled in, both checked, and
    ``precision="auto"`` resolved to what this machine runs (remembered per machine)."""
    family = registry.spec(cfg.backbone)
    size = registry.check_size(family.size if cfg.size is None else cfg.size, cfg.backbone)
    layer = family.layer if cfg.layer is None else cfg.layer
    registry.check_layer(layer, cfg.backbone)
    chosen = cfg.precision
    if chosen == "auto":
        choice = precision.resolve("auto")
        log.info("precision %s (%s)", choice.precision, choice.reason)
        chosen = choice.precision
    return dataclasses.replace(cfg, size=size, layer=layer, precision=chosen)


def resolve_decoder(cfg: ExtractConfig, source: sources.Source) -> ExtractConfig:
    """``cfg`` with ``decoder="auto"`` resolved to cpu or gpu (``gpu_decode.resolve``)."""
    chosen = gpu_decode.resolve(cfg.decoder, has_files=source.root is not None, precision=cfg.precision)
    if chosen == "gpu" and cfg.decoder == "auto":  # CPU runs print nothing new
        log.info("decoder gpu (a CUDA device and torchvision are usable; --decoder cpu to decode with Pillow)")
    return dataclasses.replace(cfg, decoder=chosen)


def cache_key(cfg: ExtractConfig, source: sources.Source, weights_id: str) -> CacheKey:
    """A GPU-decoded cache says so in its preprocessing (and file name): it never answers a
    request for CPU-decoded features, nor takes rows from one (CPU caches are unchanged)."""
    assert cfg.size is not None and cfg.layer is not None, "resolve_options first"
    preprocessing = registry.spec(cfg.backbone).preprocessing
    if cfg.decoder == "gpu":
        preprocessing += f"; {gpu_decode.GPU_IDENTITY}"
    return CacheKey(
        backbone=cfg.backbone,
        weights=weights_id,
        layer=cfg.layer,
        size=cfg.size,
        dtype=cfg.dtype,
        precision=cfg.precision,
        preprocessing=preprocessing,
        fingerprint=source.fingerprint,
    )


def cache_path(cache_dir: Path, source: sources.Source, key: CacheKey) -> Path:
    """One file per (data source, backbone, weights, layer, size, dtype, precision)."""
    name = f"{key.backbone}-{key.weights}-{key.layer}-{key.size}{precision.cache_suffix(key.precision)}"
    name += "-float16" if key.dtype == "float16" else ""
    name += gpu_decode.CACHE_SUFFIX if key.preprocessing.endswith(gpu_decode.GPU_IDENTITY) else ""
    return Path(cache_dir) / source.key / f"{name}.h5"


def plan(cfg: ExtractConfig) -> Plan:
    """Check every option and input before any work; no model is built."""
    cfg = resolve_options(cfg)
    source = sources.resolve(cfg)
    cfg = resolve_decoder(cfg, source)
    pinned = weights.resolve(cfg.weights, cfg.backbone, cfg.seed)
    key = cache_key(cfg, source, pinned.id)
    return Plan(cfg, source, pinned, key, cache_path(cfg.cache_dir, source, key))


def extract_command(cfg: ExtractConfig) -> str:
    """The make command that builds the cache ``cfg`` names (for messages)."""
    parts = [
        f"DATA={shlex.quote(str(cfg.data))}",
        f"BACKBONE={cfg.backbone}",
        f"SIZE={cfg.size}",
        f"WEIGHTS={shlex.quote(str(cfg.weights))}",
        f"LAYER={cfg.layer}",
    ]
    parts += [
        f"{name.upper()}={getattr(cfg, name)}" for name in ("dtype", "precision") if getattr(cfg, name) != "float32"
    ]
    parts += ["DECODER=gpu"] if cfg.decoder == "gpu" else []
    return "make extract " + " ".join(parts)


def locate(cfg: ExtractConfig) -> Path:
    """The complete cache that ``cfg`` names, checked against the current inputs; no model,
    no download. Stage two uses it to find what stage one made."""
    cfg = resolve_options(cfg)
    source = sources.resolve(cfg)
    cfg = resolve_decoder(cfg, source)
    key = cache_key(cfg, source, weights.weights_id(cfg.weights, cfg.seed))
    path = cache_path(cfg.cache_dir, source, key)
    if not path.exists():
        raise CacheError(f"no cache at {path}; make it with `{extract_command(cfg)}`")
    meta = store.read_meta(path)
    diffs = meta.key().identity_diff(key)
    if diffs:
        raise CacheError(
            f"{path} was made differently ({'; '.join(diffs)}); rebuild it with `{extract_command(cfg)} FORCE=1`"
        )
    if meta.fingerprint != key.fingerprint:
        raise CacheError(
            f"{path} no longer matches its inputs ({stale_files(path, source)}; fingerprint differs); bring it "
            f"up to date with `{extract_command(cfg)}` (only new and changed images are computed)"
        )
    return path


def stale_files(path: Path, source: sources.Source, show: int = 3) -> str:
    """What changed under DATA since the cache was made, by file: counts and the first few names."""
    index = store.read_index(path)
    cached = {(split, p): k for split in index.rows for p, (_, k) in index.rows[split].items()} | {
        (split, p): k for split in index.skipped for p, (_, k) in index.skipped[split].items()
    }
    now = {(split, p): k for split, s in source.splits.items() for p, k in zip(s.paths, s.keys, strict=True)}
    groups = {
        "new": sorted(p for sp, p in now.keys() - cached.keys()),
        "changed": sorted(p for sp, p in now.keys() & cached.keys() if now[sp, p] != cached[sp, p]),
        "removed": sorted(p for sp, p in cached.keys() - now.keys() if not is_view(sp)),
    }
    parts = [
        f"{len(names)} {what} ({', '.join(printable(n) for n in names[:show])}{', ...' if len(names) > show else ''})"
        for what, names in groups.items()
        if names
    ]
    return "; ".join(parts) or "the files are the same, their order or split changed"
