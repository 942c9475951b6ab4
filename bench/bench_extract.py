"""Stage one's throughput per precision on the real cats-vs-dogs JPEGs, side by side in one run.

Per precision (float32, bfloat16, int8 when OpenVINO is installed), each repeat measures:

  compiled   the product's model through its compiled call (``pipeline.features.compiled``), in-memory
             uint8 batches: the ceiling the extraction is held to (int8: the kept OpenVINO model)
  pob        the same model through Keras's ``predict_on_batch``, in memory (issue 31's baseline)
  steady     ``featcache extract`` after its warm-up, as the command records it in the cache
  whole      ``featcache extract --force`` as a subprocess: images / wall seconds of the command
             (steady and whole are also given as a share of the mean of the compiled runs measured
             just before and just after that extract: the machine's neighbours move both alike)
  start-up   a subprocess: Keras import, model build (int8: + loading the kept model), first call

``--baseline DIR`` runs the steady, whole and start-up rows again with the ``pipeline`` package
of another checkout (e.g. ``git archive <commit> pipeline | tar -x -C DIR``), interleaved with this
one's, the trees' order alternating between repeats.
Before every repeat the 1-minute load average is checked; above ``--max-load`` the run waits
(up to 10 minutes) and the load it ran under is printed. Medians of the repeats. Usage:
    python bench/bench_extract.py [--size 150] [--per-class 1000] [--repeats 3] [--batch 32]
        [--precisions float32 bfloat16 int8] [--baseline DIR] [--seeds-loop]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import HED_WEIGHTS, REPO, Timer, machine, median, require_data, subset

STARTUP = """
import json, os, sys, time
t0 = time.perf_counter()
try:
    from pipeline.core import lean
    keras = lean.import_keras()
except ImportError:  # a checkout before issue 31
    import keras
t1 = time.perf_counter()
import numpy as np
from pipeline.features import backbone, weights
prec, size, batch, w, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
base = "float32" if prec == "int8" else prec
model = backbone.build(size=size, layer="block5_pool", weights=weights.resolve(w), precision=base)
if prec == "int8":
    from pipeline.features import quantize
    from pathlib import Path
    model = quantize.load(Path(folder))
try:
    from pipeline.features.compiled import CompiledForward
    call = CompiledForward(model, batch)
except ImportError:
    call = model.predict_on_batch
t2 = time.perf_counter()
call(np.zeros((batch, size, size, 3), np.uint8))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "build": t2 - t1, "first_call": t3 - t2}))
"""


def wait_for_quiet(max_load: float, patience: float = 600.0) -> float:
    """Wait (up to ``patience`` seconds) for the 1-minute load average to drop to ``max_load``."""
    start = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - start < patience:
        time.sleep(20)
    return os.getloadavg()[0]


def run_extract(tree: Path, folder: Path, cache_dir: Path, prec: str, args: argparse.Namespace) -> tuple[float, float]:
    """(steady img/s as the command recorded it, images / wall seconds) of one forced extraction."""
    argv = [sys.executable, "-m", "pipeline", "extract", "--data", str(folder), "--size", str(args.size)]
    argv += ["--weights", args.weights, "--precision", prec, "--batch-size", str(args.batch)]
    argv += ["--decode-threads", str(args.decode_threads), "--cache-dir", str(cache_dir), "--force", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with Timer() as t:
        out = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"extract failed ({tree}, {prec}):\n{out.stderr[-3000:]}")
    from pipeline.cache import store

    [path] = [p for p in cache_dir.rglob("*.h5") if not p.name.startswith(".")]
    meta = store.read_meta(path)
    return float(meta.info["extract_images_per_second"]), sum(meta.split_sizes.values()) / t.seconds


def run_startup(tree: Path, prec: str, int8_folder: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, "-c", STARTUP, prec, str(args.size), str(args.batch), args.weights, int8_folder]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"start-up probe failed ({tree}, {prec}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_memory(call: Any, x: Any, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 3:
        call(x)
        n += 1
    return n * len(x) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--per-class", type=int, default=1000, help="train images per class (2 classes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0, help="per in-memory measurement")
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--weights", default=str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random")
    default_precisions = ["float32", "bfloat16"] + (["int8"] if importlib.util.find_spec("openvino") else [])
    p.add_argument(
        "--precisions", nargs="+", default=default_precisions, choices=["float32", "bfloat16", "float16", "int8"]
    )
    p.add_argument("--baseline", type=Path, default=None, help="checkout whose pipeline/ is the 'before' code")
    p.add_argument("--max-load", type=float, default=1.5, help="wait before a repeat while the load is above this")
    p.add_argument("--seeds-loop", action="store_true", help="also the seeds' generator + predict loop (float32)")
    args = p.parse_args()
    require_data()

    import numpy as np

    from pipeline.core import lean
    from pipeline.features import backbone, quantize, registry, weights
    from pipeline.features.compiled import CompiledForward

    lean.import_keras()
    print(machine())
    trees = {"new": REPO} | ({"old": args.baseline.resolve()} if args.baseline else {})
    n = 2 * args.per_class
    print(
        f"{n} train JPEGs at {args.size} px, batch {args.batch}, weights {args.weights}, decode threads "
        f"{args.decode_threads}, {args.repeats} repeats (medians); trees: "
        + ", ".join(f"{k}={v}" for k, v in trees.items())
    )
    folder = subset(args.per_class)
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    gflop = registry.flops_per_image(args.size, "block5_pool") / 1e9
    try:
        models: dict[str, tuple[Any, Any]] = {}
        int8_folder = ""
        for prec in args.precisions:
            if prec == "int8":  # calibrate once per tree (untimed); the timed runs reuse the kept model
                for name, tree in trees.items():
                    with Timer() as t:
                        run_extract(tree, folder, work / f"{name}-int8", "int8", args)
                    print(f"int8 calibration + first extract ({name}): {t.seconds:.1f} s")
                [kept] = list((work / "new-int8").rglob("calibration.json"))
                int8_folder = str(kept.parent)
                engine = quantize.load(kept.parent)
                models[prec] = (CompiledForward(engine, args.batch), engine.predict_on_batch)
            else:
                model = backbone.build(
                    size=args.size, layer="block5_pool", weights=weights.resolve(args.weights), precision=prec
                )
                models[prec] = (CompiledForward(model, args.batch), model.predict_on_batch)
        x = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
        for compiled_call, pob in models.values():
            compiled_call(x), pob(x)  # trace and set up kernels outside the timings
        rows: dict[tuple[str, str], list[float]] = {}
        starts: dict[tuple[str, str], list[dict[str, float]]] = {}
        flank: dict[tuple[str, str], list[float]] = {}  # extract / mean of the compiled runs just before and after
        loads = []
        for r in range(args.repeats):
            before = os.getloadavg()[0]
            load = wait_for_quiet(args.max_load)
            loads.append((before, load))
            print(f"repeat {r + 1}: load average {before:.2f} before waiting, {load:.2f} at start", flush=True)
            for prec in args.precisions:
                compiled_call, pob = models[prec]
                ref = in_memory(compiled_call, x, args.seconds)
                rows.setdefault((prec, "compiled"), []).append(ref)
                rows.setdefault((prec, "pob"), []).append(in_memory(pob, x, args.seconds))
                order = list(trees.items())
                for name, tree in order if r % 2 == 0 else order[::-1]:  # new first, then old first: no order bias
                    steady, whole = run_extract(tree, folder, work / f"{name}-{prec}", prec, args)
                    after = in_memory(compiled_call, x, args.seconds)  # the reference again, right after
                    rows.setdefault((prec, f"steady {name}"), []).append(steady)
                    rows.setdefault((prec, f"whole {name}"), []).append(whole)
                    for what, v in (("steady", steady), ("whole", whole)):
                        flank.setdefault((prec, f"{what} {name}"), []).append(2 * v / (ref + after))
                    rows.setdefault((prec, "compiled, after each extract"), []).append(after)
                    ref = after
                for name, tree in trees.items():
                    starts.setdefault((prec, name), []).append(run_startup(tree, prec, int8_folder, args))
                print(
                    f"  {prec}: "
                    + ", ".join(f"{k} {v[-1]:.1f}" for (pp, k), v in rows.items() if pp == prec)
                    + " img/s",
                    flush=True,
                )
        print(f"\nload average (1 min) at the start of each repeat: {[round(b, 2) for _, b in loads]}")
        print(f"after the run: {os.getloadavg()[0]:.2f}")
        for prec in args.precisions:
            c = median(rows[(prec, "compiled")])
            print(f"\n{args.size} px, {prec} ({gflop:.1f} GFLOP/img): img/s, median of {args.repeats}")
            print(f"  compiled forward, in memory    {c:7.1f}   100.0%   runs {fmt(rows[(prec, 'compiled')])}")
            for key, label in [("pob", "predict_on_batch, in memory")] + [
                (f"{what} {name}", f"extract {what} ({name})") for name in trees for what in ("steady", "whole")
            ]:
                v = median(rows[(prec, key)])
                line = f"  {label:<30} {v:7.1f}   {100 * v / c:5.1f}%   runs {fmt(rows[(prec, key)])}"
                if (prec, key) in flank:
                    ratios = [100 * r for r in flank[(prec, key)]]
                    line += f"; of the compiled runs flanking it: {median(ratios):.1f}% (runs {fmt(ratios)})"
                print(line)
            after = rows[(prec, "compiled, after each extract")]
            print(f"  compiled forward, after each extract: runs {fmt(after)}")
            if "old" in trees:
                print(f"  features new vs old: {feature_difference(work / f'new-{prec}', work / f'old-{prec}')}")
            for name in trees:
                s = starts[(prec, name)]
                parts = {k: median([d[k] for d in s]) for k in ("import", "build", "first_call")}
                print(
                    f"  start-up ({name}): import {parts['import']:.2f} s, build {parts['build']:.2f} s, "
                    f"first call {parts['first_call']:.2f} s (medians)"
                )
        if args.seeds_loop:
            seeds_loop(folder, args, n)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def feature_difference(new: Path, old: Path) -> str:
    """The largest per-image relative difference between the two trees' caches (same files, same order)."""
    import numpy as np

    from pipeline.cache import store

    [a], [b] = ([p for p in d.rglob("*.h5") if not p.name.startswith(".")] for d in (new, old))
    xa, _, pa = store.load_split(a, "train")
    xb, _, pb = store.load_split(b, "train")
    if pa != pb:
        return "different files or order (not comparable)"
    fa, fb = xa.reshape(len(xa), -1).astype(np.float64), xb.reshape(len(xb), -1).astype(np.float64)
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fb, axis=1), 1e-12)
    return f"max relative error per image {rel.max():.2e} (median {np.median(rel):.2e}, {len(rel)} images)"


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def seeds_loop(folder: Path, args: argparse.Namespace, n: int) -> None:
    """The seeds' ImageDataGenerator.flow_from_directory + model.predict per batch of 20 (float32)."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from pipeline.features import backbone, weights

    model = backbone.build(size=args.size, layer="block5_pool", weights=weights.resolve(args.weights))
    gen = ImageDataGenerator().flow_from_directory(
        str(folder / "train"), target_size=(args.size, args.size), batch_size=20, class_mode="binary"
    )
    rates = []
    for _ in range(args.repeats):
        with Timer() as t:
            seen = 0
            for xb, _ in gen:
                model.predict(xb.astype("uint8"), verbose=0)
                seen += len(xb)
                if seen >= n:
                    break
        rates.append(seen / t.seconds)
    print(f"\nseeds' generator + predict (float32): {median(rates):.1f} img/s, runs {fmt(rates)}")


if __name__ == "__main__":
    main()
