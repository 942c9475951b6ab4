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


def fast_jax_affine_transform() -> None:
    """Keras' JAX ``affine_transform`` (behind RandomRotation and RandomZoom) gathers every output
    value through an 8-corner ``map_coordinates`` over (row, column, channel). This replaces it,
    for bilinear NHWC batches, with the same arithmetic done once per pixel for all channels (4
    gathers of RGB rows instead of 8 of scalars): the same index fixers, weights and summation
    order, so the output equals Keras' to float rounding. ``bench_recipe_spread.py
    --check-augment`` measures both (on this CPU: 222 ms against 14 ms a batch of 32 at 180 px).
    Anything else falls through to Keras' own."""
    import itertools

    import jax
    import jax.numpy as jnp
    from jax._src.scipy.ndimage import _INDEX_FIXERS
    from keras.src import backend
    from keras.src.backend.jax import image

    original = getattr(image.affine_transform, "original", image.affine_transform)

    def affine_transform(
        images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0, data_format=None
    ):
        images, transform = jnp.asarray(images), jnp.asarray(transform)
        if (
            interpolation != "bilinear"
            or backend.standardize_data_format(data_format) != "channels_last"
            or images.ndim != 4
            or transform.ndim != 2
            or fill_mode not in _INDEX_FIXERS
        ):
            return original(images, transform, interpolation, fill_mode, fill_value, data_format)
        b, h, w, c = images.shape
        fix = _INDEX_FIXERS[fill_mode]
        rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
        t = [transform[:, k, None, None] for k in range(6)]
        # as Keras computes them: input row b0*x + b1*y + b2, input column a0*x + a1*y + a2
        y_in = rows * t[4] + cols * t[3] + t[5]
        x_in = rows * t[1] + cols * t[0] + t[2]

        def nodes(coordinate, size):
            lower = jnp.floor(coordinate)
            upper_weight = coordinate - lower
            index = lower.astype(jnp.int32)
            return [(index, 1 - upper_weight), (index + 1, upper_weight)]

        flat = images.reshape(b, h * w, c)
        out = None
        for (iy, wy), (ix, wx) in itertools.product(nodes(y_in, h), nodes(x_in, w)):
            gathered = jax.vmap(lambda im, k: im[k])(flat, (fix(iy, h) * w + fix(ix, w)).reshape(b, h * w))
            if fill_mode == "constant":
                valid = ((iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)).reshape(b, h * w, 1)
                gathered = jnp.where(valid, gathered, jnp.asarray(fill_value, images.dtype))
            term = (wy * wx).reshape(b, h * w, 1) * gathered
            out = term if out is None else out + term
        return out.reshape(b, h, w, c).astype(images.dtype)

    affine_transform.original = original
    image.affine_transform = affine_transform


def load_arrays(folder: Path, size: int, label_mode: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """A split as arrays, for backends without tf.data (the GPU machine has JAX, no TensorFlow):
    what ``image_dataset_from_directory`` yields, unshuffled. Class folders in sorted order,
    files sorted within each, decoded to RGB by Pillow and resized by ``keras.ops.image.resize``
    (bilinear, no antialiasing, as tf.image.resize there). Returns images (N, size, size, 3)
    float32, labels ((N, 1) float32 for "binary", one-hot for "categorical"), paths, class names."""
    import keras
    from PIL import Image

    class_names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    paths = [f for c in class_names for f in sorted((folder / c).iterdir()) if f.is_file()]
    labels = np.array([class_names.index(f.parent.name) for f in paths])
    images = np.empty((len(paths), size, size, 3), np.float32)
    for i, f in enumerate(paths):  # one by one: the files need not share a size
        img = np.asarray(Image.open(f).convert("RGB"), np.float32)
        images[i] = keras.ops.convert_to_numpy(keras.ops.image.resize(img, (size, size)))
    one_hot = np.eye(len(class_names), dtype=np.float32)[labels]
    y = labels[:, None].astype(np.float32) if label_mode == "binary" else one_hot
    return images, y, [str(f) for f in paths], class_names


def recipe_model(size: int, weights: str, precision: str, n_classes: int, augment: bool = True):
    """Seed 003's model, compiled: augmentation (RandomFlip, RandomRotation 0.1, RandomZoom 0.2;
    left out with ``augment=False``, for profiling only), VGG16's preprocessing, the frozen conv
    base, Flatten-Dense(256)-Dropout(0.5) and a sigmoid (softmax over ``n_classes`` > 2)."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = inputs
    if augment:
        x = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomZoom(0.2)])(x)
    x = keras.applications.vgg16.preprocess_input(x)
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
    return model


def seeds_recipe(
    size: int,
    epochs: int,
    weights: str,
    precision: str = "float32",
    extra_test: Path | None = None,
    loader: str = "dataset",
    seed: int = 0,
) -> dict:
    """Seed 003 as written: frozen conv base, augmentation, Flatten-Dense(256)-Dropout-sigmoid,
    RMSprop, ``epochs`` epochs with the best-``val_loss`` checkpoint (the seed's
    ModelCheckpoint) reloaded for the test. ``precision`` "bfloat16" runs the conv base and
    the head under Keras' mixed_bfloat16 policy (augmentation, preprocessing and the output
    stay float32), the fastest this CPU has without AMX.

    With more than two class folders under train/ (``FEATCACHE_BENCH_DATA`` set to a
    multi-class set) the labels are one-hot and the output Dense(K, softmax) with categorical
    cross-entropy; the rest of the recipe is unchanged.

    ``loader`` "dataset" reads the images as the seed does (tf.data, TensorFlow only); "arrays"
    reads them with ``load_arrays``, on any Keras backend, and fits on the arrays (batches of 32,
    shuffled each epoch, as the seed's dataset). ``seed`` seeds Keras (weights, dropout,
    augmentation, shuffling); the seed used 0.

    Returns seconds per epoch (list), test accuracy of the best checkpoint and of the last
    epoch, the best epoch, forward passes per epoch (train + validation images), the best
    checkpoint's test probabilities with their labels and paths, and the history; with
    ``extra_test``, the best checkpoint's accuracy there, its probabilities, labels and paths."""
    import keras

    keras.utils.set_random_seed(seed)
    # two classes: the seed as written (binary labels, sigmoid); more: one-hot labels, softmax
    n_classes = sum(1 for d in (DATA / "train").iterdir() if d.is_dir())
    label_mode = "binary" if n_classes == 2 else "categorical"
    splits = {s: Split.read(s, size, label_mode, loader, seed) for s in ("train", "validation", "test")}
    train, val, test = splits["train"], splits["validation"], splits["test"]
    model = recipe_model(size, weights, precision, n_classes)

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
        history = model.fit(
            *train.fit_inputs(),
            epochs=epochs,
            validation_data=val.fit_inputs(),
            callbacks=[checkpoint, times],
            verbose=2,
        )
        _, last_accuracy = model.evaluate(*test.fit_inputs(), verbose=0)
        best_model = keras.models.load_model(best)
        scored = test.score(best_model)
        extra = {}
        if extra_test is not None:
            more = Split.read("test", size, label_mode, loader, seed, extra_test)
            if more.class_names != test.class_names:
                raise SystemExit(f"error: {extra_test}/test has classes {more.class_names}, not {test.class_names}")
            extra = {f"extra_{k}": v for k, v in more.score(best_model).items()}
    val_loss = history.history["val_loss"]
    return {
        "epoch_seconds": times.seconds,
        "test_accuracy": scored.pop("accuracy"),
        "last_test_accuracy": last_accuracy,
        "best_epoch": 1 + val_loss.index(min(val_loss)),
        "passes_per_epoch": train.n + val.n,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        **{f"test_{k}": v for k, v in scored.items()},
        **extra,
    }


class Split:
    """One split as the recipe reads it: a tf.data dataset (the seed's loader) or arrays."""

    def __init__(self, data, labels, paths: list[str], class_names: list[str]) -> None:
        self.data, self.labels, self.paths, self.class_names = data, labels, paths, class_names
        self.n = len(paths)

    @classmethod
    def read(cls, split: str, size: int, label_mode: str, loader: str, seed: int, root: Path = DATA) -> Split:
        if loader == "arrays":
            return cls(*load_arrays(root / split, size, label_mode))
        import keras

        ds = keras.utils.image_dataset_from_directory(
            root / split,
            image_size=(size, size),
            batch_size=32,
            label_mode=label_mode,
            shuffle=split == "train",
            seed=seed,
        )
        # the file order: fixed for an unshuffled split; the train split is only fitted on
        return cls(ds.prefetch(2), None, list(ds.file_paths), list(ds.class_names))

    def fit_inputs(self):
        """What ``fit``/``evaluate`` take (and ``validation_data``): the dataset, or images and labels
        (fitted in batches of 32, shuffled each epoch: Keras' defaults for arrays)."""
        return (self.data,) if self.labels is None else (self.data, self.labels)

    def score(self, model) -> dict:
        """``model``'s probabilities here, with labels, paths and accuracy."""
        if self.labels is None:
            proba = model.predict(self.data, verbose=0)
            labels = np.concatenate([np.asarray(b[1]) for b in self.data])
        else:
            proba, labels = model.predict(self.data, batch_size=32, verbose=0), self.labels
        binary = proba.shape[1] == 1
        predicted = (proba[:, 0] > 0.5).astype(int) if binary else np.argmax(proba, axis=1)
        truth = labels.astype(int).ravel() if binary else np.argmax(labels, axis=1)
        return {"accuracy": float(np.mean(predicted == truth)), "proba": proba, "labels": truth, "paths": self.paths}


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
        arrays = ("extra_", "test_proba", "test_labels", "test_paths")
        figures = {k: v for k, v in r.items() if not k.startswith(arrays)}
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
