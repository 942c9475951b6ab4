"""Stage one per compute precision, side by side in one run, on this machine's CPU.

    python bench/bench_precision.py --sizes 150 180 --repeats 3

For each size: VGG16 conv base (block5_pool, batch 32, same weights) forward images/s under
Keras float32, mixed_bfloat16 and mixed_float16, interleaved per repeat (median reported),
and each one's features' relative L2 error against float32 on real JPEGs. When OpenVINO is
installed (`pip install 'featcache[openvino]'`) its float32, bfloat16 and int8 (NNCF
post-training quantisation, calibrated on train images) run in the same loop. Then
(``--heads``) a logistic-regression head per precision on the features of a train/test
subset: test accuracy. Prints the CPU's name and its bfloat16/AVX-512/AMX flags.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np

from bench._common import HED_WEIGHTS, machine, median, require_data
from pipeline.features import machine as hardware
from pipeline.features import precision as P
from pipeline.features import quantize

KERAS_PRECISIONS = ("float32", "bfloat16", "float16")


def load_images(root: Path, split: str, n_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for label, cls in enumerate(sorted(p.name for p in (root / split).iterdir())):
        files = sorted((root / split / cls).iterdir(), key=lambda p: int(p.name.split(".")[1]))[:n_per_class]
        for f in files:
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def keras_models(size: int, weights: str | None) -> dict[str, object]:
    """The same VGG16 conv base under each policy; caffe preprocessing is done once, outside."""
    import keras

    models, first = {}, None
    for p in KERAS_PRECISIONS:
        keras.utils.set_random_seed(0)
        with P.policy_scope(p):
            base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
        if first is None:
            if weights:
                base.load_weights(weights)
            first = base.get_weights()
        base.set_weights(first)
        out = keras.ops.cast(base.output, "float32")
        models[p] = keras.Model(base.input, out)
    return models


def openvino_models(model: object, batch: int, size: int, calib: np.ndarray) -> dict[str, object]:
    """OpenVINO float32 / bfloat16 / int8 compiled models of the float32 Keras model, or {}."""
    try:
        import openvino as ov
    except ImportError:
        print("OpenVINO: not installed, its rows are skipped (pip install 'featcache[openvino]')")
        return {}
    core = ov.Core()
    ovm = ov.convert_model(model, input=[(batch, size, size, 3)])
    out = {
        f"openvino {name}": core.compile_model(ovm, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        for name, hint in (("float32", "f32"), ("bfloat16", "bf16"))
    }
    try:
        import nncf
    except ImportError:
        print("OpenVINO int8: nncf not installed, row skipped (pip install 'featcache[openvino]')")
        return out
    t0 = time.perf_counter()
    quantized = nncf.quantize(
        ovm,
        nncf.Dataset([calib[i : i + batch] for i in range(0, len(calib) - batch + 1, batch)]),
        subset_size=len(calib),
    )
    print(f"OpenVINO int8: NNCF quantisation on {len(calib)} train images took {time.perf_counter() - t0:.1f} s")
    out["openvino int8"] = core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return out


def runner(model: object) -> object:
    """A callable batch -> float32 features for a Keras model or an OpenVINO compiled model."""
    if hasattr(model, "predict_on_batch"):
        return lambda x: np.asarray(model.predict_on_batch(x), np.float32)
    request = model.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def rate(run: object, x: np.ndarray, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
        run(x)
        n += 1
    return n * len(x) / elapsed


def features(run: object, x: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(x) - len(x) % batch, batch):  # whole batches: OpenVINO models have a fixed batch
        out.append(run(x[i : i + batch]))
    return np.concatenate(out)


def head_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    head.fit(f_train.reshape(len(f_train), -1), y_train)
    return float(head.score(f_test.reshape(len(f_test), -1), y_test))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[150, 180])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per precision and repeat")
    ap.add_argument(
        "--weights",
        default=str(HED_WEIGHTS) if HED_WEIGHTS.is_file() else "none",
        help="VGG16 weights file, or 'none' (seeded random); default: HED file when present",
    )
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument(
        "--heads",
        type=int,
        default=0,
        metavar="N",
        help="also train a head per precision on N train and N/2 test images per class (first size)",
    )
    args = ap.parse_args()
    data = require_data()
    weights = None if args.weights.lower() == "none" else args.weights

    flags = hardware.cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f")))
    print(machine())
    print(
        f"CPU: {hardware.cpu_name()}; flags: {' '.join(shown) or '(none of amx*/avx512*)'}; "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(unset: on)')}"
    )
    print(f"weights: {weights or 'random (seed 0)'}; batch {args.batch}; {args.repeats} repeats x {args.seconds:.0f} s")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    results = {}
    for size in args.sizes:
        x_real, _ = load_images(data, "train", max(args.batch, 64) // 2, size)
        import keras

        x = keras.applications.vgg16.preprocess_input(x_real.astype("float32"))
        models = keras_models(size, weights)
        runs = {p: runner(m) for p, m in models.items()}
        if not args.no_openvino:
            runs.update({k: runner(m) for k, m in openvino_models(models["float32"], args.batch, size, x).items()})
        batch = x[: args.batch]
        ref = features(runs["float32"], x, args.batch)
        errors = {name: P.relative_error(features(run, x, args.batch), ref) for name, run in runs.items()}
        for run in runs.values():  # warm-up outside the timing
            run(batch)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                rates[name].append(rate(run, batch, args.seconds))
        print(f"\n{size} px, {len(x)} real train images for the error, VGG16 block5_pool {tuple(ref.shape[1:])}:")
        base = median(rates["float32"])
        for name in runs:
            r = median(rates[name])
            results[(size, name)] = (r, errors[name])
            print(
                f"  {name:18s} {r:7.1f} img/s  {r / base:5.2f}x float32   rel. error vs float32 "
                f"{errors[name]:.5f}   runs: {', '.join(f'{v:.1f}' for v in rates[name])}",
                flush=True,
            )
    if args.heads:
        size = args.sizes[0]
        x_tr, y_tr = load_images(data, "train", args.heads, size)
        x_te, y_te = load_images(data, "test", args.heads // 2, size)
        import keras

        x_tr = keras.applications.vgg16.preprocess_input(x_tr.astype("float32"))
        x_te = keras.applications.vgg16.preprocess_input(x_te.astype("float32"))
        models = keras_models(size, weights)
        print(f"\nheads ({size} px; logistic regression, C=0.1, on {len(x_tr)} train / {len(x_te)} test images):")
        heads = {p: runner(models[p]) for p in ("float32", "bfloat16")}
        if not args.no_openvino:
            try:
                heads["openvino int8"] = runner(quantize.openvino_engine(models["float32"], x_tr[:64], args.batch))
            except P.ConfigError as e:
                print(f"  openvino int8 skipped: {e}")
        for p, run in heads.items():
            t0 = time.perf_counter()
            f_tr = np.concatenate([run(x_tr[i : i + args.batch]) for i in range(0, len(x_tr), args.batch)])
            f_te = np.concatenate([run(x_te[i : i + args.batch]) for i in range(0, len(x_te), args.batch)])
            took = time.perf_counter() - t0
            print(
                f"  {p:14s} test accuracy {head_accuracy(f_tr, y_tr, f_te, y_te):.4f}  (features in {took:.1f} s)",
                flush=True,
            )
    print("\nload:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
