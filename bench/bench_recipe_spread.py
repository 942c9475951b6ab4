"""The seeds' recipe run several times, one Keras seed each, to see how far its test figure moves.

Issue 26's goal is "the recipe's own figure", read from one run; two runs of it here gave 0.979
and 0.973. This runs ``bench_recipe.seeds_recipe`` (the seed as written: frozen conv base,
augmentation, Flatten-Dense(256)-Dropout-sigmoid, RMSprop, best-``val_loss`` checkpoint) for
seeds ``--first-seed`` .. ``--first-seed + --runs - 1`` and prints each run's test accuracy and
their mean, spread and range. A run takes 68 minutes on this 2-core CPU; on a lent H200 under
``KERAS_BACKEND=jax`` Keras' loop ran 10-12 s an epoch (BENCHMARKS 9b), so about 10 minutes a
run, which a 15-minute device lease barely holds. ``--loader arrays`` reads the images without
TensorFlow (the GPU machine has none); ``--fast-augment`` swaps in
``bench_recipe.fast_jax_affine_transform`` (``--check-augment`` checks and times it).
``--budget-s`` stops starting runs that would not end in time. ``--out``
is rewritten after every run (JSON: settings, machine, each run's figures, history and test
probabilities with their paths), so a run cut short keeps what finished. Usage:
    KERAS_BACKEND=jax python bench/bench_recipe_spread.py --weights FILE --runs 8 \\
        [--epochs 50] [--size 180] [--precision bfloat16] [--loader arrays] [--fast-augment] [--budget-s 480] \\
        [--out FILE]
    KERAS_BACKEND=jax python bench/bench_recipe_spread.py --check-augment
    KERAS_BACKEND=jax python bench/bench_recipe_spread.py --profile 20 [--fast-augment]   # where a step goes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import DATA, machine, require_data
from bench_recipe import fast_jax_affine_transform, recipe_model, seeds_recipe


def accelerator() -> str:
    """The backend's devices, in words (a GPU's name where the backend reports one)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return ", ".join(str(d.device_kind) for d in jax.devices())
    return "cpu"


def summary(accuracies: list[float]) -> str:
    if not accuracies:
        return "no run finished"
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan")
    return (
        f"{len(accuracies)} runs: test accuracy mean {statistics.mean(accuracies):.4f}, sd {spread:.4f}, "
        f"median {statistics.median(accuracies):.4f}, range {min(accuracies):.4f}-{max(accuracies):.4f}"
    )


def median_ms(step, repeats: int) -> float:
    """Milliseconds ``step()`` takes, median of ``repeats`` calls after one warm-up (the compile)."""
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def check_augment(size: int = 180, batch: int = 32) -> None:
    """``fast_jax_affine_transform`` against Keras' own: the recipe's augmentation on the same
    seeds through both (largest difference), each fill mode on one transform, and each
    transform's time, jitted (median of 5)."""
    import jax
    import keras
    import numpy as np
    from keras import layers
    from keras.src.backend.jax import image

    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)

    def augmented(seed: int) -> np.ndarray:
        keras.utils.set_random_seed(seed)
        flips = [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1), layers.RandomZoom(0.2)]
        return keras.ops.convert_to_numpy(keras.Sequential(flips)(x, training=True))

    before = [augmented(seed) for seed in (0, 1)]
    fast_jax_affine_transform()
    after = [augmented(seed) for seed in (0, 1)]
    print(
        "recipe augmentation, Keras' against fast, largest difference:",
        max(np.abs(a - b).max() for a, b in zip(before, after, strict=True)),
    )
    t = np.array([[0.9, -0.2, 10, 0.25, 1.1, -7, 0, 0]] * batch, np.float32)
    for mode in ("constant", "nearest", "reflect", "wrap"):
        ours, theirs = (
            f(x, t, fill_mode=mode, fill_value=3.0) for f in (image.affine_transform, image.affine_transform.original)
        )
        print(f"fill_mode {mode}: largest difference {float(np.abs(np.asarray(ours) - np.asarray(theirs)).max()):.2e}")
    for name, f in (("Keras", image.affine_transform.original), ("fast", image.affine_transform)):
        g = jax.jit(lambda im, tr, f=f: f(im, tr, fill_mode="reflect"))
        ms = median_ms(lambda g=g: g(x, t).block_until_ready(), 5)
        print(f"{name}: {ms:.1f} ms a batch of {batch} at {size} px ({accelerator()})")


def profile_steps(size: int, weights: str | None, precision: str, steps: int) -> None:
    """Where a recipe step's time goes: milliseconds a training step of 32 images (median over
    ``steps`` after one warm-up) four ways: ``fit`` on host arrays (the recipe's path),
    ``train_on_batch`` on a host batch (no data pipeline), on a batch already on the device (no
    copy), and the same without augmentation. Random images; run it with and without
    ``--fast-augment``. ``weights`` None: random (the time does not depend on them)."""
    import keras
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 255, (32 * steps, size, size, 3)).astype(np.float32)
    y = (np.arange(32 * steps) % 2).astype(np.float32)[:, None]

    model = recipe_model(size, weights, precision, 2)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    figures = {"fit, host arrays": 1000 * (time.perf_counter() - t0) / steps}
    batch, labels = x[:32], y[:32]
    figures["train_on_batch, host batch"] = median_ms(lambda: model.train_on_batch(batch, labels), steps)
    on_device = keras.ops.convert_to_tensor(batch), keras.ops.convert_to_tensor(labels)
    figures["train_on_batch, device batch"] = median_ms(lambda: model.train_on_batch(*on_device), steps)
    bare = recipe_model(size, weights, precision, 2, augment=False)
    figures["the same, no augmentation"] = median_ms(lambda: bare.train_on_batch(*on_device), steps)
    for name, ms in figures.items():
        print(f"{name}: {ms:.1f} ms a step of 32 at {size} px ({precision}, {accelerator()})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="VGG16 conv-base weights file (required to run the recipe)")
    p.add_argument("--check-augment", action="store_true", help="check and time fast_jax_affine_transform, then stop")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="time a recipe step four ways, then stop")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--size", type=int, default=180)
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--loader", choices=["arrays", "dataset"], default="arrays")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run that would end after this")
    p.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after each run")
    p.add_argument(
        "--fast-augment", action="store_true", help="JAX: fast_jax_affine_transform (same output, 16-21x here)"
    )
    args = p.parse_args()
    if args.check_augment:
        print(machine())
        check_augment()
        return
    if args.fast_augment:
        import keras

        if keras.backend.backend() != "jax":
            p.error(f"--fast-augment replaces a JAX function; the backend is {keras.backend.backend()}")
        fast_jax_affine_transform()
    if args.profile:
        print(machine(), "| fast augmentation" if args.fast_augment else "")
        profile_steps(args.size, args.weights, args.precision, args.profile)
        return
    if not args.weights:
        p.error("--weights is required to run the recipe")
    require_data()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"data": str(DATA)}
    record = {"settings": settings, "machine": machine(), "accelerator": accelerator(), "runs": []}
    print(record["machine"], "|", record["accelerator"], flush=True)
    start, longest = time.perf_counter(), 0.0
    for seed in range(args.first_seed, args.first_seed + args.runs):
        elapsed = time.perf_counter() - start
        if record["runs"] and elapsed + 1.1 * longest > args.budget_s:
            print(f"stopping before seed {seed}: {elapsed:.0f} s spent, a run takes up to {longest:.0f} s", flush=True)
            break
        t0 = time.perf_counter()
        r = seeds_recipe(args.size, args.epochs, args.weights, args.precision, loader=args.loader, seed=seed)
        wall = time.perf_counter() - t0
        longest = max(longest, wall)
        proba = r["test_proba"]
        print(
            f"seed {seed}: test {r['test_accuracy']:.4f} (best val_loss epoch {r['best_epoch']}), "
            f"{r['last_test_accuracy']:.4f} after the last epoch; {wall:.0f} s",
            flush=True,
        )
        record["runs"].append(
            {
                "seed": seed,
                "wall_s": wall,
                **{k: v for k, v in r.items() if not k.startswith("test_") or k == "test_accuracy"},
                "test_proba": (proba[:, 0] if proba.shape[1] == 1 else proba).tolist(),
                "test_labels": r["test_labels"].tolist(),
                "test_paths": [str(Path(q).relative_to(DATA)) for q in r["test_paths"]],
            }
        )
        if args.out is not None:
            args.out.write_text(json.dumps(record))
    print(summary([run["test_accuracy"] for run in record["runs"]]), flush=True)


if __name__ == "__main__":
    main()
