"""Stage two at scale: the default sweep on 12,000 x (4,4,512) rows, one flatten logistic
regression by each lever, and the peak RSS of classify in memory and streaming.

Feature files are built here, never extracted:
  * ``make-cache --source real.npz``: the real cached train rows (and their augmented views)
    of an .npz with ``train_x/train_y`` (optionally ``train@aug1_x`` ...), ``validation_*`` and
    ``test_*``, repeated with 2% multiplicative noise up to ``--rows`` train rows; validation
    and test stay the real rows.
  * ``make-cache`` without ``--source``: synthetic rows, a random projection of class centres
    plus noise through a ReLU (sparse, non-negative, like block5_pool), ``--classes`` classes.

Usage (always under the shared lock on a shared machine):
    flock /tmp/featcache-bench.lock python bench/bench_sweep_scale.py make-cache --rows 12000 --out c.h5 \
        [--source r.npz]
    flock /tmp/featcache-bench.lock python bench/bench_sweep_scale.py sweep --cache c.h5 [--jobs 2] [--path off]
    flock /tmp/featcache-bench.lock python bench/bench_sweep_scale.py levers --cache c.h5
    flock /tmp/featcache-bench.lock python bench/bench_sweep_scale.py rss --cache c.h5 --stream on|off
    flock /tmp/featcache-bench.lock python bench/bench_sweep_scale.py svm --cache c.h5  # 3 folds vs a third
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine

sys.path.insert(0, str(REPO))


def _meta(shape: tuple[int, ...], class_names: tuple[str, ...]):
    from pipeline.cache import store

    return store.CacheMeta(
        backbone="vgg16",
        weights="synthetic",
        layer="block5_pool",
        size=150,
        dtype="float32",
        precision="float32",
        preprocessing="synthetic",
        fingerprint="synthetic",
        class_names=class_names,
        feature_shape=shape,
    )


def _write_streaming(out: Path, splits: dict, shape: tuple[int, ...], class_names: tuple[str, ...]) -> None:
    """Write split by split, block by block, in the cache format, so a 200k-row file never sits
    in memory. A split is (x, y) or a callable returning (n, iterator of (x, y) blocks)."""
    import h5py

    from pipeline.cache import store

    tmp = out.with_name(out.name + ".build")
    with h5py.File(tmp, "w") as f:
        store._write_attrs(f, _meta(shape, class_names))
        for split, value in splits.items():
            n, blocks = value() if callable(value) else (len(value[1]), iter([value]))
            ds = store._create_features(f, split, n, shape, np.float32, "none")
            labels = np.empty(n, np.int64)
            start = 0
            for x, y in blocks:
                ds[start : start + len(y)] = x
                labels[start : start + len(y)] = y
                start += len(y)
            store._write_rows_meta(f[split], labels, [f"{split}/{i}" for i in range(n)], [])
        f.attrs["complete"] = True
    os.replace(tmp, out)


def make_cache(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    out = Path(args.out)
    shape = (4, 4, 512)
    if args.source:
        src = np.load(args.source)
        pools = [k[:-2] for k in src.files if k.startswith("train") and k.endswith("_x")]
        base_x = np.concatenate([src[f"{k}_x"] for k in sorted(pools)]).astype(np.float32)
        base_y = np.concatenate([src[f"{k}_y"] for k in sorted(pools)])
        n_classes = int(base_y.max()) + 1
        names = tuple(f"class{i}" for i in range(n_classes))

        def train() -> tuple[int, object]:
            def blocks():
                for start in range(0, args.rows, 2000):
                    idx = np.arange(start, min(args.rows, start + 2000))
                    x = base_x[idx % len(base_y)]
                    noisy = idx >= len(base_y)  # the real rows once as they are, then copies with 2% noise
                    x[noisy] *= rng.normal(1.0, 0.02, size=(int(noisy.sum()), *shape)).astype(np.float32)
                    yield x, base_y[idx % len(base_y)]

            return args.rows, blocks()

        splits = {
            "validation": (src["validation_x"], src["validation_y"]),
            "test": (src["test_x"], src["test_y"]),
            "train": train,
        }
    else:
        k, d_latent = args.classes, 64
        centres = rng.normal(0, 1.0, size=(k, d_latent)).astype(np.float32)
        proj = (rng.normal(0, 1.0, size=(d_latent, int(np.prod(shape)))) / np.sqrt(d_latent)).astype(np.float32)
        names = tuple(f"class{i}" for i in range(k))

        def rows(n: int, seed: int):
            r = np.random.default_rng(seed)
            for start in range(0, n, 2000):
                m = min(2000, n - start)
                y = r.integers(0, k, size=m)
                z = centres[y] * 0.35 + r.normal(0, 1.0, size=(m, d_latent)).astype(np.float32)
                x = np.maximum(z @ proj + r.normal(0, 0.5, size=(m, proj.shape[1])).astype(np.float32) - 0.5, 0)
                yield x.reshape(m, *shape).astype(np.float32), y

        def whole(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
            parts = list(rows(n, seed))
            return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

        splits = {
            "validation": whole(2000, 1),
            "test": whole(2000, 2),
            "train": lambda: (args.rows, rows(args.rows, 3)),
        }
    t0 = time.perf_counter()
    _write_streaming(out, splits, shape, names)
    print(
        f"wrote {out}: train {args.rows} rows x {shape}, {out.stat().st_size / 1e9:.2f} GB, "
        f"{time.perf_counter() - t0:.1f} s"
    )


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def sweep(args: argparse.Namespace) -> None:
    from pipeline.core.config import SweepConfig
    from pipeline.train.sweep import run_sweep

    print(machine())
    if args.path == "off":  # the variable fit_all reads (FEATCACHE_WARM_PATH=0 in the environment works too)
        os.environ["FEATCACHE_WARM_PATH"] = "0"
    path_mode = "off" if os.environ.get("FEATCACHE_WARM_PATH", "1") == "0" else "on"
    runs = Path(tempfile.mkdtemp(prefix="featcache-bench-runs-"))
    try:
        t0 = time.perf_counter()
        cfg = SweepConfig(sweep_file=Path(args.sweep), runs_dir=runs, n_jobs=args.jobs)
        result = run_sweep(cfg, Path(args.cache))
        wall = time.perf_counter() - t0
        print(result.table)
        by_head: dict[str, float] = {}
        for r in result.rows:
            key = f"{r['head']}/{r['pooling']}"
            by_head[key] = by_head.get(key, 0.0) + r["fit_seconds"]
        print("fit seconds by head/pooling: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_head.items())))
        print(
            f"sweep {len(result.rows)} configs, jobs {args.jobs}, path {path_mode}: {wall:.1f} s wall; "
            f"winner val {result.winner['val_accuracy']:.4f}; parent peak RSS {_peak_rss_gb():.2f} GB"
        )
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def levers(args: argparse.Namespace) -> None:
    """One flatten logistic regression, C in {0.001, 0.01, 0.1}, by each lever, one core."""
    from threadpoolctl import threadpool_limits

    from pipeline.cache import store
    from pipeline.runs.folder import score
    from pipeline.train.heads import LogRegHead
    from pipeline.train.regpath import fit_logreg_path

    print(machine())
    x, y, _ = store.load_split(args.cache, "train")
    xv, yv, _ = store.load_split(args.cache, "validation")
    cs = [0.001, 0.01, 0.1]
    with threadpool_limits(args.threads):
        for label, pooled in (("path from zero", False), ("path from the pooled start", True)):
            heads = [LogRegHead(pooling="flatten", C=c) for c in cs]
            times: dict[int, float] = {}
            c0 = time.process_time()
            fit_logreg_path(heads, x, y, times=times, pooled_warm_start=pooled)
            cpu = time.process_time() - c0
            per_c = ", ".join(
                f"C={h.C}: {times[id(h)]:.1f} s {h.n_iter_} iter val "
                f"{score(h.predict_proba(xv), yv, h.classes_)[0]:.4f}"
                for h in heads
            )
            print(f"warm-started {label} (scaler once): {cpu:.1f} CPU s; {per_c}", flush=True)
        if args.independent:
            t0 = time.perf_counter()
            accs = []
            for c in cs:
                accs.append(score(LogRegHead(pooling="flatten", C=c).fit(x, y).predict_proba(xv), yv, np.unique(y))[0])
            print(f"independent fits (float32, scaler each fit): {time.perf_counter() - t0:.1f} s; val {accs}")


def mlp(args: argparse.Namespace) -> None:
    """The MLP levers side by side: one MLPHead fit per variant ("key=value,..." over the
    default grid's flatten MLP), its fit seconds, epochs run and validation accuracy. Two keys
    are not head parameters: ``spe`` (batches per graph call, ``heads.STEPS_PER_EXECUTION``)
    and ``bf16=1`` (Keras's mixed_bfloat16 policy: bfloat16 matmuls, AMX where the CPU has it).
    One TensorFlow thread, as a sweep worker on 2 cores has."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    import keras

    from pipeline.cache import store
    from pipeline.runs.folder import score
    from pipeline.train import heads
    from pipeline.train.heads import MLPHead

    print(machine())
    x, y, _ = store.load_split(args.cache, "train")
    xv, yv, _ = store.load_split(args.cache, "validation")
    base = {"pooling": args.pooling, "learning_rate": 3e-4, "epochs": 30, "batch_size": 64, "patience": 5}
    for variant in args.variants:
        params, spe, bf16 = dict(base), 1, False
        for item in filter(None, variant.split(",")):
            key, value = item.split("=")
            if key == "spe":
                spe = int(value)
            elif key == "bf16":
                bf16 = value == "1"
            else:
                params[key] = type(base.get(key, 0.0))(float(value)) if key != "pooling" else value
        heads.STEPS_PER_EXECUTION = spe
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if bf16 else "float32")
        t0, c0 = time.perf_counter(), time.process_time()
        head = MLPHead(**params).fit(x, y)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        acc = score(head.predict_proba(xv), yv, head.classes_)[0]
        epochs = len(head.history_["loss"])
        print(
            f"mlp {variant or 'default'}: {seconds:.1f} s fit ({cpu:.1f} CPU s), {epochs} epochs, "
            f"{seconds / epochs:.2f} s/epoch, val {acc:.4f}",
            flush=True,
        )


def svm(args: argparse.Namespace) -> None:
    """The SVM calibration lever (issue 29): CalibratedClassifierCV(LinearSVC) on 3 folds (the
    old head) against one stratified held-out third (SVMHead now), one core, per pooling and C:
    wall and CPU seconds (CPU is the measure on a shared machine), validation accuracy and log-loss."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedShuffleSplit
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from threadpoolctl import threadpool_limits

    from pipeline.cache import store
    from pipeline.runs.folder import score
    from pipeline.train.heads import pool_features

    print(machine(), f"load {os.getloadavg()[0]:.1f}")
    x, y, _ = store.load_split(args.cache, "train")
    xv, yv, _ = store.load_split(args.cache, "validation")
    with threadpool_limits(1):
        for pooling in ("avg", "max"):
            scaler = StandardScaler().fit(pool_features(x, pooling))
            z, zv = scaler.transform(pool_features(x, pooling)), scaler.transform(pool_features(xv, pooling))
            for c in (0.01, 0.1):
                for label, cv in (
                    ("3 folds", 3),
                    ("one third", StratifiedShuffleSplit(1, test_size=1 / 3, random_state=0)),
                ):
                    t0, c0 = time.perf_counter(), time.process_time()
                    model = CalibratedClassifierCV(LinearSVC(C=c, max_iter=5000, random_state=0), cv=cv).fit(z, y)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    acc, loss = score(model.predict_proba(zv), yv, model.classes_)
                    print(
                        f"svm {pooling} C={c} {label}: wall {wall:.1f} s, cpu {cpu:.1f} s, "
                        f"val {acc:.4f}, log-loss {loss:.4f}",
                        flush=True,
                    )


def rss(args: argparse.Namespace) -> None:
    from pipeline.core.config import SweepConfig
    from pipeline.train.sweep import run_sweep

    spec = Path(tempfile.mkdtemp()) / "one.toml"
    spec.write_text(f'[[head]]\nname = "logreg"\npooling = "flatten"\nC = 0.01\nmax_iter = {args.max_iter}\n')
    runs = Path(tempfile.mkdtemp(prefix="featcache-bench-runs-"))
    try:
        t0 = time.perf_counter()
        cfg = SweepConfig(sweep_file=spec, runs_dir=runs, n_jobs=1, stream=args.stream)
        result = run_sweep(cfg, Path(args.cache))
        print(
            f"rss rows={result.rows[0]['train_rows']} stream={args.stream}: {time.perf_counter() - t0:.1f} s, "
            f"val {result.winner['val_accuracy']:.4f}, peak RSS {_peak_rss_gb():.2f} GB"
        )
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-cache")
    m.add_argument("--rows", type=int, default=12000)
    m.add_argument("--out", required=True)
    m.add_argument("--source", default=None)
    m.add_argument("--classes", type=int, default=6)
    s = sub.add_parser("sweep")
    s.add_argument("--cache", required=True)
    s.add_argument("--sweep", default=str(REPO / "pipeline" / "train" / "default_sweep.toml"))
    s.add_argument("--jobs", type=int, default=2)
    s.add_argument("--path", default="on", choices=["on", "off"], help="warm-started C paths (off: one fit per C)")
    v = sub.add_parser("levers")
    v.add_argument("--cache", required=True)
    v.add_argument("--threads", type=int, default=1)
    v.add_argument("--independent", action="store_true", help="also three independent fits (one per C)")
    ml = sub.add_parser("mlp")
    ml.add_argument("--cache", required=True)
    ml.add_argument("--pooling", default="flatten")
    ml.add_argument("variants", nargs="*", default=[""], help='e.g. "spe=1" "spe=32" "spe=32,bf16=1" "batch_size=256"')
    sv = sub.add_parser("svm")
    sv.add_argument("--cache", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--cache", required=True)
    r.add_argument("--stream", default="auto", choices=["auto", "on", "off"])
    r.add_argument("--max-iter", type=int, default=1000)
    args = p.parse_args()
    {"make-cache": make_cache, "sweep": sweep, "levers": levers, "mlp": mlp, "svm": svm, "rss": rss}[args.command](args)


if __name__ == "__main__":
    main()
