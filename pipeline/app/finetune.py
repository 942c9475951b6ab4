"""Fine-tuning without rerunning the base: VGG's block5 + the seeds' head, trained on
cached block4_pool features.

The seeds' order is kept: first a head on the frozen base (warm-started from a stage-two
run, or trained here on frozen block5 features), then block5 is unfrozen and trained with
the head at RMSprop 1e-5. Block5 is about 9% of the conv base's FLOPs at 150 px, so an
epoch on cached block4 maps costs a small fraction of an end-to-end one. The classic
end-to-end fine-tune on images with augmentation (``end_to_end=True``) shares the head,
the compile step and the reporting.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import store
from pipeline.cache.store import CacheMeta
from pipeline.core.config import ExtractConfig, FinetuneConfig, as_dict
from pipeline.core.errors import ConfigError
from pipeline.core.vocab import SPLITS
from pipeline.features import backbone, images, layout, registry
from pipeline.features.weights import check_file_unchanged, values_sha256, verify_weights
from pipeline.runs import folder, plots, report, tracking
from pipeline.train.heads import KerasModelHead, MLPHead
from pipeline.train.persist import load_head, save_head
from pipeline.train.seeds_recipe import compile_for, seeds_head
from pipeline.train.splits import load_splits, load_views, training_rows

log = logging.getLogger(__name__)

POOLING_LAYERS = {"flatten": "Flatten", "avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}


@dataclass
class FinetuneResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    table: str


def build_block5(meta: CacheMeta) -> Any:
    """VGG's layers after block4_pool, with the cache's own weights: (N,h,w,512) block4
    maps -> block5_pool maps. Refuses weights that differ from the cache's."""
    import keras

    family = registry.spec(meta.backbone)
    source = meta.weights_source
    check_file_unchanged(source, meta.weights_file_sha256, f"the cache {meta.path}")
    if source == "random":
        keras.utils.set_random_seed(meta.seed)
    base = getattr(keras.applications, family.constructor)(
        include_top=False, weights=None if source == "random" else source, input_shape=(meta.size, meta.size, 3)
    )
    verify_weights(values_sha256(base), meta.weights_sha256, f"the cache {meta.path}")
    names = [layer.name for layer in base.layers]
    inputs = keras.Input(tuple(meta.feature_shape), name="block4_pool_features")
    x = inputs
    for layer in base.layers[names.index("block4_pool") + 1 :]:
        x = layer(x)
    return keras.Model(inputs, x, name="block5")


def finetune(ft: FinetuneConfig, ecfg: ExtractConfig) -> FinetuneResult:
    """Train block5 + head (cached block4 features, or images end to end) and write a run."""
    if ecfg.backbone not in ("vgg16", "vgg19"):
        raise ConfigError(
            f"finetune trains VGG's block5 from cached block4_pool maps; backbone={ecfg.backbone!r} "
            "has no such blocks (use vgg16 or vgg19)"
        )
    if ecfg.precision == "int8":
        raise ConfigError(
            "finetune trains Keras layers; precision='int8' is an OpenVINO inference engine for stage one. "
            "Use --precision float32, bfloat16 or auto"
        )
    import keras

    keras.utils.set_random_seed(ft.seed)
    return _end_to_end(ft, ecfg) if ft.end_to_end else _from_cache(ft, ecfg)


def _from_cache(ft: FinetuneConfig, ecfg: ExtractConfig) -> FinetuneResult:
    import keras

    cache = layout.locate(dataclasses.replace(ecfg, layer="block4_pool", augment=0))
    meta = store.read_meta(cache)
    data = load_splits(cache, meta, SPLITS)
    if "validation" not in data:
        raise ConfigError(f"{cache} has no validation split; fine-tuning stops early on it (seeds 001 and 003)")
    views = load_views(cache, meta, ft.views) if ft.train_on != "clean" else None
    x_train, y_train = training_rows(data["train"], views, ft.train_on)
    block5 = build_block5(meta)
    t0 = time.perf_counter()
    frozen5 = {s: block5.predict(x, batch_size=64, verbose=0) for s, (x, _) in data.items()}
    head, head_note = _warm_head(ft, meta, block5, x_train, y_train, frozen5)
    frozen_seconds = time.perf_counter() - t0
    rows = [
        _scores(
            "frozen block5 + head",
            head.predict_proba,
            frozen5,
            data,
            head.classes_,
            frozen_seconds,
            "block5 forward once per row",
        )
    ]
    inputs = keras.Input(tuple(meta.feature_shape))
    model = _with_head(inputs, block5(inputs), head)
    block5.trainable = True
    history, seconds = _train(model, head.classes_, ft, ft.learning_rate, x_train, y_train, data["validation"])
    tuned = KerasModelHead.wrap(model, head.classes_)
    rows.append(
        _scores(
            "fine-tuned block5 + head",
            tuned.predict_proba,
            {s: x for s, (x, _) in data.items()},
            data,
            head.classes_,
            seconds,
            f"{seconds / max(1, len(history['loss'])):.1f} s/epoch, "
            f"{len(history['loss'])} epochs on {len(y_train)} cached rows",
        )
    )
    return _save(ft, ecfg, meta, cache, tuned, rows, history, [head_note], model_input="block4_pool")


def _warm_head(
    ft: FinetuneConfig,
    meta4: CacheMeta,
    block5: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    frozen5: dict[str, np.ndarray],
) -> tuple[MLPHead, str]:
    """The seeds' first step: a head on the frozen base. From ``ft.head_run`` when given
    (its cache must be block5_pool of the same images, weights and size), else trained
    here on frozen block5 features of the training rows."""
    if ft.head_run is not None:
        run = folder.read_run(ft.head_run)
        m5 = CacheMeta.from_dict(run["cache_meta"])
        wanted = dataclasses.replace(meta4.key(), layer="block5_pool")
        diffs = m5.key().diff(wanted, fields=("fingerprint", "weights", "size", "backbone", "precision", "layer"))
        if m5.weights_sha256 != meta4.weights_sha256:
            diffs.append("weights_sha256: the head's cache and the block4 cache were made with other weight values")
        head = load_head(Path(ft.head_run), trust_pickle=ft.trust_pickle, versions=run.get("versions"))
        if not isinstance(head, MLPHead):
            diffs.append(f"head: the run's winner is {type(head).__name__}; warm start needs the Keras MLP head")
        if diffs:
            raise ConfigError(f"cannot warm-start from {ft.head_run}: " + "; ".join(diffs))
        return head, f"head warm-started from {ft.head_run}"
    x5 = frozen5["train"] if ft.train_on == "clean" else block5.predict(x_train, batch_size=64, verbose=0)
    head = MLPHead(
        pooling="flatten",
        learning_rate=ft.head_learning_rate,
        epochs=ft.head_epochs,
        batch_size=ft.batch_size,
        random_state=ft.seed,
    ).fit(x5, y_train)
    return head, f"head trained here on frozen block5 features ({len(head.history_['loss'])} epochs)"


def _with_head(inputs: Any, x: Any, head: MLPHead) -> Any:
    """``inputs -> x -> pooling -> the head's Dense layers``, weights copied from ``head``."""
    import keras

    x = getattr(keras.layers, POOLING_LAYERS[head.pooling])()(x)
    model = keras.Model(inputs, seeds_head(x, len(head.classes_), head.units, head.dropout))
    trained = [layer for layer in head.model_.layers if isinstance(layer, keras.layers.Dense)]
    fresh = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for src, dst in zip(trained, fresh, strict=True):
        dst.set_weights(src.get_weights())
    return model


def _train(
    model: Any,
    classes: np.ndarray,
    ft: FinetuneConfig,
    learning_rate: float,
    x: np.ndarray,
    y: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    epochs: int | None = None,
) -> tuple[dict[str, list[float]], float]:
    """Compile (recompiling after a trainable change is required) and fit, keeping the
    weights of the best validation loss (the seeds' ModelCheckpoint)."""
    import keras

    compile_for(model, len(classes), learning_rate)
    y_idx = np.searchsorted(classes, y).astype(np.float32)
    val = (validation[0], np.searchsorted(classes, validation[1]).astype(np.float32))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=ft.patience, restore_best_weights=True)
    t0 = time.perf_counter()
    history = model.fit(
        x,
        y_idx,
        validation_data=val,
        epochs=epochs or ft.epochs,
        batch_size=ft.batch_size,
        callbacks=[stop],
        verbose=2 if ft.verbose else 0,
        shuffle=True,
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}, time.perf_counter() - t0


def _scores(
    stage: str,
    proba_fn: Any,
    xs: dict[str, np.ndarray],
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: np.ndarray,
    seconds: float,
    cost: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": stage, "seconds": seconds, "cost": cost}
    for split in ("validation", "test"):
        if split in data:
            row[f"{split}_accuracy"], row[f"{split}_log_loss"] = folder.score(
                proba_fn(xs[split]), data[split][1], classes
            )
    return row


COLUMNS = ("stage", "validation_accuracy", "validation_log_loss", "test_accuracy", "test_log_loss", "seconds", "cost")


def _save(
    ft: FinetuneConfig,
    ecfg: ExtractConfig,
    meta: CacheMeta,
    cache: Path | None,
    tuned: KerasModelHead,
    rows: list[dict[str, Any]],
    history: dict[str, list[float]],
    notes: list[str],
    model_input: str,
) -> FinetuneResult:
    run = folder.RunFolder(ft.runs_dir, ft.name)
    save_head(tuned, run.path)  # winner.skops + winner.keras (the whole fine-tuned model, plain Keras)
    plots.plot_learning_curves(history, run.path / "curves.png", "block5 + head, fine-tuned")
    run.write_results(rows, COLUMNS)
    # --- issue 15: report.html and MLflow (one child per stage, the curves as metric history)
    report.table_report(run.path, "finetune", rows, COLUMNS, ["curves.png"], meta.to_dict(), notes)
    tracked = tracking.log_table_run(
        tracking.Tracker(track=ft.track),
        run.path,
        "finetune",
        tracking.cache_tags(meta, run.path),
        as_dict(ft),
        rows,
        "stage",
        history,
        ["results.csv", "curves.png", "winner.skops", "winner.keras", "report.html"],
    )
    run.write_json(
        {
            "kind": "finetune",
            "finetune": as_dict(ft),
            "extract": as_dict(ecfg),
            "cache": str(cache) if cache else None,
            "cache_meta": meta.to_dict(),
            "model_input": model_input,
            "rows": rows,
            "notes": notes,
            "history": history,
            "tracking": tracked,
        }
    )
    return FinetuneResult(run.path, rows, "\n".join([folder.text_table(rows, COLUMNS), *notes]))


def _decode_splits(ecfg: ExtractConfig, source: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split's images decoded at ``ecfg.size`` (uint8), with the labels of those that decoded."""
    assert ecfg.size is not None
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with images.Decoder(ecfg.decode_threads, ecfg.decode_processes) as decoder:
        for split in SPLITS:
            if split in source.splits:
                got = list(decoder.batches(source.items(split), range(len(source.splits[split])), ecfg.size, 256))
                decoded = np.concatenate([b.rows for b in got])
                data[split] = (np.concatenate([b.images for b in got]), source.splits[split].labels[decoded])
    return data


def _augmented_model(ft: FinetuneConfig, ecfg: ExtractConfig, extractor: Any, n_classes: int) -> tuple[Any, Any]:
    """uint8 images -> the cached views' augmentation -> the conv base -> the seeds' head; and the base."""
    import keras

    assert ecfg.size is not None
    inputs = keras.Input((ecfg.size, ecfg.size, 3), dtype="uint8")
    x = keras.ops.cast(inputs, "float32")
    for layer in images.AUGMENT.keras_layers(ft.seed):  # the policy of the cached views
        x = layer(x)
    base = extractor.get_layer(f"{ecfg.backbone}_block5_pool")  # the truncated conv base inside the extractor
    features = base(backbone.preprocess_layer(registry.spec(ecfg.backbone).module)(x))
    pooled = keras.layers.Flatten()(features)
    return keras.Model(inputs, seeds_head(pooled, n_classes)), base


def _end_to_end(ft: FinetuneConfig, ecfg: ExtractConfig) -> FinetuneResult:
    """The seeds' recipe on images: augmentation -> frozen base -> head, then block5
    unfrozen at a low learning rate. Meant for a GPU; on 2 CPU cores it takes hours."""
    plan = layout.plan(dataclasses.replace(ecfg, layer="block5_pool"))
    ecfg, source, weights = plan.cfg, plan.source, plan.weights
    assert ecfg.size is not None
    data = _decode_splits(ecfg, source)
    if "validation" not in data:
        raise ConfigError(f"{ecfg.data} has no validation split; fine-tuning stops early on it")
    classes = np.unique(data["train"][1])
    extractor = backbone.build(
        ecfg.backbone, size=ecfg.size, layer="block5_pool", weights=weights, precision=ecfg.precision
    )
    model, base = _augmented_model(ft, ecfg, extractor, len(classes))
    base.trainable = False
    t0 = time.perf_counter()
    h1, _ = _train(model, classes, ft, ft.head_learning_rate, *data["train"], data["validation"], ft.head_epochs)
    tuned = KerasModelHead.wrap(model, classes)
    xs: dict[str, np.ndarray] = {s: x for s, (x, _) in data.items()}
    rows = [
        _scores(
            "frozen base + head (end to end, augmented)",
            tuned.predict_proba,
            xs,
            data,
            classes,
            time.perf_counter() - t0,
            f"{len(h1['loss'])} epochs, full forward pass per image per epoch",
        )
    ]
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith("block5")
    h2, seconds = _train(model, classes, ft, ft.learning_rate, *data["train"], data["validation"])
    rows.append(
        _scores(
            "fine-tuned block5 + head (end to end, augmented)",
            tuned.predict_proba,
            xs,
            data,
            classes,
            seconds,
            f"{len(h2['loss'])} epochs, full forward pass per image per epoch",
        )
    )
    meta = CacheMeta(
        **{**dataclasses.asdict(plan.key), "layer": "input"},
        class_names=tuple(source.class_names),
        weights_sha256=extractor.base_weights_sha256,
        weights_file_sha256=weights.file_sha256,
        weights_source=weights.source or "random",
        seed=ecfg.seed,
        info={"config": as_dict(ecfg)},
    )
    return _save(
        ft, ecfg, meta, None, tuned, rows, {k: h1.get(k, []) + h2.get(k, []) for k in h2}, [], model_input="images"
    )
