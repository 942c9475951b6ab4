"""The cached pipeline against the seeds' recipe, same weights, data and size (180 px):

  (i)  seed 003: frozen conv base end to end with augmentation (RandomFlip, RandomRotation
       0.1, RandomZoom 0.2), Flatten-Dense(256)-Dropout(0.5)-sigmoid, RMSprop, the best-val_loss
       checkpoint reloaded for the test, as the seed does (Dense(K)-softmax on a set with K > 2
       classes). ``--epochs 50`` runs the recipe in
       full; fewer epochs are timed and extrapolated to 50 (and say so).
  (ii) featcache: extract once (train, validation, test) + the default sweep, test accuracy
       of the winner chosen on validation.

Both report backbone forward passes and seconds. ``--extra-test DIR`` (a folder holding
``test/<class>/``, the same classes) scores the seed's best checkpoint on more test images too,
and ``--predictions FILE`` saves its probability per image there (with the paths), so
``bench_cv_holdout.py --against FILE`` can compare it with a cached pick image by image. Usage:
    python bench/bench_recipe.py [--epochs 2] [--size 180] [--weights FILE]
        [--precision float32|bfloat16] [--seeds-only] [--extra-test DIR [--predictions FILE]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import DATA, HED_WEIGHTS, REPO, Timer, machine, require_data


def seeds_recipe(
    size: int, epochs: int, weights: str, precision: str = "float32", extra_test: Path | None = None
) -> dict:
    """Seed 003 as written: frozen conv base, augmentation, Flatten-Dense(256)-Dropout-sigmoid,
    RMSprop, ``epochs`` epochs with the best-``val_loss`` checkpoint (the seed's
    ModelCheckpoint) reloaded for the test. ``precision`` "bfloat16" runs the conv base and
    the head under Keras' mixed_bfloat16 policy (augmentation, preprocessing and the output
    stay float32), the fastest this CPU has without AMX.

    With more than two class folders under train/ (``FEATCACHE_BENCH_DATA`` set to a
    multi-class set) the labels are one-hot and the output Dense(K, softmax) with categorical
    cross-entropy; the rest of the recipe is unchanged.

    Returns seconds per epoch (list), test accuracy of the best checkpoint and of the last
    epoch, the best epoch, and forward passes per epoch (train + validation images); with
    ``extra_test``, the best checkpoint's accuracy there, its probabilities, labels and paths."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    # two classes: the seed as written (binary labels, sigmoid); more: one-hot labels, softmax
    n_classes = sum(1 for d in (DATA / "train").iterdir() if d.is_dir())
    label_mode = "binary" if n_classes == 2 else "categorical"
    load = lambda split, shuffle, root=DATA: keras.utils.image_dataset_from_directory(  # noqa: E731
        root / split, image_size=(size, size), batch_size=32, label_mode=label_mode, shuffle=shuffle, seed=0
    )
    train, val, test = load("train", True), load("validation", False), load("test", False)
    test_class_names = test.class_names
    train, val, test = (d.prefetch(2) for d in (train, val, test))
    augmentation = keras.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomZoom(0.2)]
    )
    inputs = keras.Input((size, size, 3))
    x = keras.applications.vgg16.preprocess_input(augmentation(inputs))
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}[precision]
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        conv_base = keras.applications.VGG16(weights=weights, include_top=False, input_shape=(size, size, 3))
        conv_base.trainable = False
        x = layers.Dropout(0.5)(layers.Dense(256)(layers.Flatten()(conv_base(x))))
        if n_classes == 2:
            outputs = layers.Dense(1, activation="sigmoid", dtype="float32")(x)
        else:
            outputs = layers.Dense(n_classes, activation="softmax", dtype="float32")(x)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model = keras.Model(inputs, outputs)
    loss = "binary_crossentropy" if n_classes == 2 else "categorical_crossentropy"
    model.compile(loss=loss, optimizer="rmsprop", metrics=["accuracy"])

    class EpochTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)

    times = EpochTimes()
    with tempfile.TemporaryDirectory(prefix="featcache-seed003-") as tmp:
        best = Path(tmp) / "feature_extraction_with_data_augmentation.keras"
        checkpoint = keras.callbacks.ModelCheckpoint(filepath=str(best), save_best_only=True, monitor="val_loss")
        history = model.fit(train, epochs=epochs, validation_data=val, callbacks=[checkpoint, times], verbose=2)
        _, last_accuracy = model.evaluate(test, verbose=0)
        best_model = keras.models.load_model(best)
        _, best_accuracy = best_model.evaluate(test, verbose=0)
        extra = {}
        if extra_test is not None:
            extra_ds = load("test", False, extra_test)
            if extra_ds.class_names != test_class_names:
                raise SystemExit(f"error: {extra_test}/test has classes {extra_ds.class_names}, not {test_class_names}")
            proba = best_model.predict(extra_ds.prefetch(2), verbose=0)
            labels = np.concatenate([np.asarray(b[1]) for b in extra_ds])
            predicted = (proba[:, 0] > 0.5).astype(int) if n_classes == 2 else np.argmax(proba, axis=1)
            truth = labels.astype(int).ravel() if n_classes == 2 else np.argmax(labels, axis=1)
            extra = {
                "extra_accuracy": float(np.mean(predicted == truth)),
                "extra_proba": proba,
                "extra_labels": truth,
                "extra_paths": list(extra_ds.file_paths),
            }
    val_loss = history.history["val_loss"]
    n_train = sum(len(b[1]) for b in train)
    n_val = sum(len(b[1]) for b in val)
    return {
        "epoch_seconds": times.seconds,
        "test_accuracy": best_accuracy,
        "last_test_accuracy": last_accuracy,
        "best_epoch": 1 + val_loss.index(min(val_loss)),
        "passes_per_epoch": n_train + n_val,
        **extra,
    }


def report_seeds(r: dict, epochs: int, precision: str) -> tuple[float, int]:
    """Print the seed recipe's figures; returns its 50-epoch seconds and forward passes."""
    secs = r["epoch_seconds"]
    full = epochs >= 50
    seconds = sum(secs) if full else 50 * sum(secs) / len(secs)
    print(
        f"(i)  seeds' end-to-end recipe ({precision}): {len(secs)} epochs run, {sum(secs):.0f} s "
        f"(epochs {min(secs):.0f}-{max(secs):.0f} s); {r['passes_per_epoch']} forward passes/epoch; "
        f"50 epochs = {seconds:.0f} s{'' if full else ' (extrapolated)'} and {50 * r['passes_per_epoch']} passes; "
        f"test accuracy {r['test_accuracy']:.4f} (best val_loss checkpoint, epoch {r['best_epoch']}), "
        f"{r['last_test_accuracy']:.4f} after the last epoch",
        flush=True,
    )
    if "extra_accuracy" in r:
        n = len(r["extra_labels"])
        print(
            f"     extra test ({n} images): accuracy {r['extra_accuracy']:.4f} (best val_loss checkpoint)", flush=True
        )
    return seconds, 50 * r["passes_per_epoch"]


def run_seed(args: argparse.Namespace, weights: str) -> tuple[float, int]:
    """The seed's recipe run and reported; with ``--predictions``, its extra-test probabilities
    saved with their paths and labels. Returns what ``report_seeds`` returns."""
    r = seeds_recipe(args.size, args.epochs, weights, args.precision, args.extra_test)
    result = report_seeds(r, args.epochs, args.precision)
    if args.predictions is not None:
        figures = {k: v for k, v in r.items() if not k.startswith("extra_")}
        settings = {"epochs": args.epochs, "size": args.size, "weights": weights, "precision": args.precision}
        np.savez_compressed(
            args.predictions,
            proba=r["extra_proba"],
            labels=r["extra_labels"],
            paths=np.array(r["extra_paths"]),
            meta=np.array(json.dumps(figures | settings | {"extra_accuracy": r["extra_accuracy"]})),
        )
        print(f"     saved the extra-test probabilities to {args.predictions}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=180)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sweep", type=Path, default=REPO / "pipeline" / "train" / "default_sweep.toml")
    p.add_argument("--weights", default=None, help="VGG16 weights file (default: the HED file when made)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seeds-only", action="store_true", help="run only the seeds' recipe")
    p.add_argument(
        "--extra-test", type=Path, default=None, help="a folder with test/<class>/: score the seed there too"
    )
    p.add_argument("--predictions", type=Path, default=None, help="save the seed's extra-test probabilities (.npz)")
    args = p.parse_args()
    require_data()
    if args.predictions is not None and args.extra_test is None:
        p.error("--predictions saves the --extra-test probabilities: give --extra-test too")
    weights = args.weights or (str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random")
    print(machine())
    print(f"weights {weights}; size {args.size}; precision {args.precision}; data {DATA}", flush=True)
    if args.seeds_only:
        run_seed(args, weights)
        return

    from pipeline.core.config import ExtractConfig, SweepConfig
    from pipeline.features.extract import extract
    from pipeline.train.sweep import run_sweep

    cache_dir = Path(tempfile.mkdtemp(prefix="featcache-recipe-"))
    try:
        with Timer() as t_extract:
            result = extract(
                ExtractConfig(
                    data=str(DATA),
                    size=args.size,
                    weights=weights,
                    precision=args.precision,
                    cache_dir=cache_dir,
                    quiet=True,
                )
            )
        with Timer() as t_sweep:
            sweep = run_sweep(SweepConfig(sweep_file=args.sweep, runs_dir=cache_dir / "runs"), result.path)
        ours_passes = result.images
        ours_seconds = t_extract.seconds + t_sweep.seconds
        ours_acc = sweep.winner["test_accuracy"]
        print(
            f"(ii) featcache: extract {t_extract.seconds:.0f} s ({ours_passes} forward passes) + sweep "
            f"{t_sweep.seconds:.0f} s ({len(sweep.rows)} configs) = {ours_seconds:.0f} s; winner "
            f"{sweep.winner['head']} {sweep.winner['pooling']} {sweep.winner['params']}: "
            f"test accuracy {ours_acc:.4f}",
            flush=True,
        )
        seconds, passes = run_seed(args, weights)
        print(
            f"ratio: {seconds / ours_seconds:.0f}x less time, {passes / ours_passes:.0f}x "
            "fewer backbone forward passes for the cached pipeline"
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
