"""The cached pipeline against the seeds' recipe, same weights, data and size (180 px):

  (i)  seed 003: frozen conv base end to end with augmentation (RandomFlip, RandomRotation
       0.1, RandomZoom 0.2), Flatten-Dense(256)-Dropout(0.5)-sigmoid, RMSprop, 50 epochs.
       A few epochs are timed and the time is extrapolated to 50; the test accuracy is the
       one after those epochs (the full 50 would take hours on 2 cores).
  (ii) featcache: extract once (train, validation, test) + the default sweep, test accuracy
       of the winner chosen on validation.

Both report backbone forward passes and seconds. Usage:
    python bench/bench_recipe.py [--epochs 2] [--size 180]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import DATA, HED_WEIGHTS, REPO, Timer, machine, require_data


def seeds_recipe(size: int, epochs: int, weights: str) -> tuple[float, float, int]:
    """Seconds per epoch, test accuracy after ``epochs``, forward passes per epoch."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    load = lambda split, shuffle: keras.utils.image_dataset_from_directory(  # noqa: E731
        DATA / split, image_size=(size, size), batch_size=32, label_mode="binary", shuffle=shuffle, seed=0
    )
    train, val, test = load("train", True), load("validation", False), load("test", False)
    conv_base = keras.applications.VGG16(weights=weights, include_top=False, input_shape=(size, size, 3))
    conv_base.trainable = False
    augmentation = keras.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomZoom(0.2)]
    )
    inputs = keras.Input((size, size, 3))
    x = conv_base(keras.applications.vgg16.preprocess_input(augmentation(inputs)))
    x = layers.Dropout(0.5)(layers.Dense(256)(layers.Flatten()(x)))
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
    model.compile(loss="binary_crossentropy", optimizer="rmsprop", metrics=["accuracy"])
    with Timer() as t:
        model.fit(train, epochs=epochs, validation_data=val, verbose=2)
    _, accuracy = model.evaluate(test, verbose=0)
    n_train = sum(len(b[1]) for b in train)
    n_val = sum(len(b[1]) for b in val)
    return t.seconds / epochs, accuracy, n_train + n_val


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=180)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sweep", type=Path, default=REPO / "configs" / "sweep.toml")
    args = p.parse_args()
    require_data()
    from pipeline.config import ExtractConfig, SweepConfig
    from pipeline.extract import extract
    from pipeline.sweep import run_sweep

    weights = str(HED_WEIGHTS) if HED_WEIGHTS.exists() else "random"
    print(machine())
    print(f"weights {weights}; size {args.size}; data {DATA}")
    cache_dir = Path(tempfile.mkdtemp(prefix="featcache-recipe-"))
    try:
        with Timer() as t_extract:
            result = extract(
                ExtractConfig(data=str(DATA), size=args.size, weights=weights, cache_dir=cache_dir, quiet=True)
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
            f"test accuracy {ours_acc:.4f}"
        )
        per_epoch, acc, passes_per_epoch = seeds_recipe(args.size, args.epochs, weights)
        print(
            f"(i)  seeds' end-to-end recipe: {per_epoch:.0f} s/epoch ({passes_per_epoch} forward passes/epoch); "
            f"50 epochs = {50 * per_epoch:.0f} s and {50 * passes_per_epoch} forward passes (extrapolated); "
            f"test accuracy after {args.epochs} epoch(s): {acc:.4f}"
        )
        print(
            f"ratio: {50 * per_epoch / ours_seconds:.0f}x less time, {50 * passes_per_epoch / ours_passes:.0f}x "
            "fewer backbone forward passes for the cached pipeline"
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
