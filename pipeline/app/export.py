"""One model from uint8 pixels to class probabilities: a run's winner, ready to ship.

``featcache export RUN`` composes stage one's frozen base (truncated at the cached layer,
its preprocessing as built-in layers) with stage two's winning head converted to Keras
layers, and writes it as ``model.keras`` plus any format ``keras.Model.export`` writes
(``tf_saved_model``, ``onnx``, ``litert``, ``openvino``). Nothing is kept unchecked: each
file is loaded back and its probabilities on a few of the run's own validation images are
compared with :func:`pipeline.app.predict.reference` (what ``featcache predict`` runs);
the folder appears (one rename) only when every format agrees within the tolerance.

The exported model holds built-in Keras layers only (no Lambda, no custom layer), so it
loads in safe mode with plain Keras: featcache is not needed to use it.

Head conversions, one function per kind, each ``(head, feature map tensor, name) ->
probabilities tensor`` with columns in ``head.classes_`` order:

- logistic regression: pooling -> Dense(softmax), standardisation folded into the kernel;
  two classes as softmax([0, d]) = [1 - sigmoid(d), sigmoid(d)], scikit-learn's formula.
- linear SVM: the same fold, the sigmoid calibration a*d + b folded too: two classes as
  above; K classes as Dense(log_sigmoid) -> softmax, i.e. p_k / sum(p), scikit-learn's
  normalisation. Several calibrated fits (cross-validated calibration) are averaged.
- the seeds' MLP: pooling -> copies of its Dense layers (Dropout is the identity at
  inference); a one-unit sigmoid output becomes two columns [1 - p, p].
- a fine-tuned block5 (KerasModelHead): its Keras model as it is, same two-column rule; an
  end-to-end fine-tune is the whole model, its Preprocess layer swapped for built-in ones.

An ensemble winner is ``Average`` over its members' conversions (:func:`ensemble_layers`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.app.predict import EXPORT_RECORD, reference
from pipeline.cache import models
from pipeline.cache.store import CacheMeta
from pipeline.core.config import ExportConfig, ExtractConfig
from pipeline.core.errors import CacheError, ConfigError
from pipeline.core.layers import load_model_safely, preprocess_layer_class
from pipeline.core.paths import check_writable
from pipeline.core.provenance import versions
from pipeline.core.version import __version__
from pipeline.features import backbone, images, quantize, registry, sources
from pipeline.features.weights import Weights, check_file_unchanged, verify_weights
from pipeline.runs import folder
from pipeline.train.ensemble import Ensemble
from pipeline.train.heads import KerasModelHead, LogRegHead, MLPHead, SVMHead
from pipeline.train.persist import load_winner

log = logging.getLogger(__name__)

# max |p_export - p_predict| accepted per compute precision. float32: the promise
# (measured: < 2e-6, every format). bfloat16 (the base in bf16, predict in float32):
# measured up to 1.6e-2 on 1,000 real images and 2.6e-2 with a weak 64-px head (BENCHMARKS.md
# section 13), so 5e-2: still far below what a wrong conversion gives. int8: both sides run
# the same OpenVINO model, only the head differs (float32 layers vs scikit-learn float64).
TOLERANCES = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 5e-2, "int8": 1e-4}

# where each format goes inside the export folder
FORMAT_FILES = {
    "keras": "model.keras",
    "tf_saved_model": "saved_model",
    "onnx": "model.onnx",
    "litert": "model.tflite",
    "openvino": "openvino/model.xml",
}
# what each format needs to be written and read back: (module, extra that installs it)
FORMAT_NEEDS = {
    "keras": (),
    "tf_saved_model": (("tensorflow", ""),),
    "onnx": (("tf2onnx", "export"), ("onnxruntime", "export")),
    "litert": (("tensorflow", ""),),
    "openvino": (("openvino", "openvino"),),
}

POOLING_LAYERS = {"flatten": "Flatten", "avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}

# keras.applications.<module>.preprocess_input as built-in layers (imagenet_utils' modes)
_CAFFE_MEAN = (103.939, 116.779, 123.68)  # BGR order
PREPROCESS_MODES = {
    "vgg16": "caffe",
    "vgg19": "caffe",
    "resnet50": "caffe",
    "mobilenet_v2": "tf",
    "inception_v3": "tf",
    "efficientnet": "none",
}


@dataclass
class ExportResult:
    out: Path
    record: dict[str, Any]

    def summary(self) -> str:
        check = self.record["check"]
        lines = [
            f"exported {self.record['run']} ({self.record['winner_kind']}, {self.record['precision']}) to {self.out}"
        ]
        for fmt, diff in check["max_abs_diff"].items():
            lines.append(
                f"  {fmt:15s} {self.record['files'][fmt]:20s} max |p - predict| = {diff:.2e} "
                f"on {check['images']} validation image(s) (tolerance {check['tolerance']:g})"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- heads as layers


def _dense(units: int, kernel: np.ndarray, bias: np.ndarray, activation: str | None, name: str) -> Any:
    """A Dense layer (float32) holding ``kernel`` (D, units) and ``bias``, built before use."""
    import keras

    layer = keras.layers.Dense(units, activation=activation, name=name, dtype="float32", trainable=False)
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return layer


def _pool(x: Any, pooling: str, name: str) -> Any:
    import keras

    if pooling not in POOLING_LAYERS:
        raise CacheError(f"the head's pooling {pooling!r} has no Keras layer; known: {sorted(POOLING_LAYERS)}")
    return getattr(keras.layers, POOLING_LAYERS[pooling])(name=f"{name}_{pooling}", dtype="float32")(x)


def _fold(scaler: Any, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x - mean) / scale @ coef.T + intercept == x @ W + b: W (D, K), b (K,), in float64."""
    mean = np.zeros(coef.shape[1]) if scaler.mean_ is None else np.asarray(scaler.mean_, np.float64)
    scale = np.ones(coef.shape[1]) if scaler.scale_ is None else np.asarray(scaler.scale_, np.float64)
    w = np.asarray(coef, np.float64) / scale  # (K, D)
    return w.T, np.asarray(intercept, np.float64) - w @ mean


def _two_columns(p: Any, name: str) -> Any:
    """(N, 1) probability of the second class -> (N, 2) [1 - p, p], as predict does."""
    return _dense(2, np.array([[-1.0, 1.0]]), np.array([1.0, 0.0]), None, f"{name}_two_columns")(p)


def _check_classes(estimator: Any, k: int, what: str) -> None:
    if not np.array_equal(np.asarray(estimator.classes_), np.arange(k)):
        raise CacheError(
            f"{what} was fitted on classes {np.asarray(estimator.classes_).tolist()}, not 0..{k - 1}; "
            "it cannot be exported as one Dense layer (refit it with `make classify`)"
        )


def logreg_layers(head: LogRegHead, x: Any, name: str = "head") -> Any:
    """Logistic regression: pooling -> Dense(softmax) with the standardisation folded in."""
    scaler, lr = head.model_[0], head.model_[-1]
    k = len(head.classes_)
    _check_classes(lr, k, "the logistic regression")
    w, b = _fold(scaler, lr.coef_, lr.intercept_)
    z = _pool(x, head.pooling, name)
    if k == 2:  # softmax([0, d]) = [1 - sigmoid(d), sigmoid(d)]
        w, b = np.column_stack([np.zeros(len(w)), w[:, 0]]), np.array([0.0, b[0]])
    return _dense(k, w, b, "softmax", f"{name}_logreg")(z)


def _calibrated_svm(calibrated: Any, scaler: Any, z: Any, k: int, name: str) -> Any:
    """One calibrated fit: p_k = sigmoid(-(a_k d_k + b_k)), d = the SVM's margins."""
    import keras

    if getattr(calibrated, "method", "sigmoid") != "sigmoid":
        raise CacheError(f"the SVM's calibration is {calibrated.method!r}; only sigmoid calibration is exported")
    svm = calibrated.estimator
    _check_classes(svm, k, "the linear SVM")
    w, b = _fold(scaler, svm.coef_, svm.intercept_)
    a = np.array([c.a_ for c in calibrated.calibrators], np.float64)
    c = np.array([c.b_ for c in calibrated.calibrators], np.float64)
    w, b = -w * a, -(a * b + c)  # the argument of the sigmoid
    if k == 2:
        return _dense(2, np.column_stack([np.zeros(len(w)), w[:, 0]]), np.array([0.0, b[0]]), "softmax", name)(z)
    logp = _dense(k, w, b, "log_sigmoid", name)(z)
    return keras.layers.Activation("softmax", name=f"{name}_normalise", dtype="float32")(logp)  # p_k / sum(p)


def svm_layers(head: SVMHead, x: Any, name: str = "head") -> Any:
    """Linear SVM + sigmoid calibration (or, when it had too few rows to calibrate, the
    softmax of its margins, as SVMHead._predict_proba)."""
    import keras

    scaler, last = head.model_[0], head.model_[-1]
    k = len(head.classes_)
    z = _pool(x, head.pooling, name)
    if hasattr(last, "calibrated_classifiers_"):
        branches = [
            _calibrated_svm(c, scaler, z, k, f"{name}_svm{i}") for i, c in enumerate(last.calibrated_classifiers_)
        ]
        return branches[0] if len(branches) == 1 else keras.layers.Average(name=f"{name}_svm_mean")(branches)
    _check_classes(last, k, "the linear SVM")
    w, b = _fold(scaler, last.coef_, last.intercept_)
    if k == 2:  # softmax([-d, d])
        w, b = np.column_stack([-w[:, 0], w[:, 0]]), np.array([-b[0], b[0]])
    return _dense(k, w, b, "softmax", f"{name}_svm")(z)


def mlp_layers(head: MLPHead, x: Any, name: str = "head") -> Any:
    """The seeds' MLP: pooling -> copies of its Dense layers (Dropout: identity at inference)."""
    import keras

    z = _pool(x, head.pooling, name)
    for layer in head.model_.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            z = _dense(
                layer.units, kernel, bias, keras.activations.serialize(layer.activation), f"{name}_{layer.name}"
            )(z)
        elif not isinstance(layer, keras.layers.Dropout | keras.layers.InputLayer):
            raise CacheError(f"the MLP head holds a {type(layer).__name__} layer; export knows Dense and Dropout")
    return _two_columns(z, name) if z.shape[-1] == 1 else z


def keras_model_layers(head: KerasModelHead, x: Any, name: str = "head") -> Any:
    """A fine-tuned block5 + head: its own Keras model on the block4 maps."""
    p = head.model_(x)
    return _two_columns(p, name) if p.shape[-1] == 1 else p


def ensemble_layers(head: Ensemble, x: Any, name: str = "head") -> Any:
    """An ensemble winner: the mean of its members' probabilities, each member converted."""
    import keras

    branches = [convert_head(m, x, f"{name}_m{i}") for i, m in enumerate(head.members)]
    return keras.layers.Average(name=f"{name}_mean")(branches)


# checked in this order (MLPHead before nothing else matches it; KerasModelHead has no pooling)
CONVERTERS: dict[type, Callable[[Any, Any, str], Any]] = {
    Ensemble: ensemble_layers,
    KerasModelHead: keras_model_layers,
    MLPHead: mlp_layers,
    SVMHead: svm_layers,
    LogRegHead: logreg_layers,
}


def convert_head(head: Any, x: Any, name: str = "head") -> Any:
    """Probabilities (columns in ``head.classes_`` order) of the feature map tensor ``x``;
    an ensemble is ``Average`` over its members' conversions."""
    for kind, convert in CONVERTERS.items():
        if isinstance(head, kind):
            return convert(head, x, name)
    raise CacheError(
        f"a {type(head).__name__} winner cannot be exported; exportable: {', '.join(t.__name__ for t in CONVERTERS)}"
    )


# --------------------------------------------------------------------------- the model


def preprocess_layers(module: str) -> list[Any]:
    """``keras.applications.<module>.preprocess_input`` as built-in layers, so the exported
    model needs no custom layer: uint8 -> float32 (Rescaling), then caffe mode (RGB->BGR and
    the ImageNet mean: a fixed 3x3 permutation Dense), tf mode (to [-1, 1]) or nothing."""
    import keras

    mode = PREPROCESS_MODES.get(module)
    if mode is None:
        raise ConfigError(f"no built-in preprocessing for {module!r}; exportable: {sorted(PREPROCESS_MODES)}")
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name="preprocess_tf")]
    to_float = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")
    if mode == "none":
        return [to_float]
    swap = np.eye(3)[::-1]  # x @ swap reverses the channels
    return [to_float, _dense(3, swap, -np.array(_CAFFE_MEAN), None, "preprocess_caffe")]


def _built_in_preprocess(model: Any, module: str) -> Any:
    """An end-to-end model with featcache's Preprocess layer replaced by built-in layers, and
    its augmentation layers (RandomFlip, RandomRotation, RandomZoom: the identity at
    inference, but random ops in a traced graph that ONNX cannot hold) by Identity."""
    import keras

    custom = preprocess_layer_class()

    def swap(layer: Any) -> Any:
        if isinstance(layer, custom):
            return keras.Sequential(preprocess_layers(layer.module)[1:] or [keras.layers.Identity()], name=layer.name)
        if type(layer).__name__.startswith("Random") and type(layer).__module__.startswith("keras."):
            return keras.layers.Identity(name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=swap)


def pinned_backbone(meta: CacheMeta, precision: str) -> Any:
    """backbone.build's model from the run's pins: the weights file unchanged, values checked."""
    source = meta.weights_source
    check_file_unchanged(source, meta.weights_file_sha256, f"the run's cache ({meta.path or 'see run.json'})")
    pinned = Weights(meta.weights, None if source == "random" else source, meta.weights_file_sha256, meta.seed)
    full = backbone.build(meta.backbone, size=meta.size, layer=meta.layer, weights=pinned, precision=precision)
    verify_weights(full.base_weights_sha256, meta.weights_sha256, "the run's cache")
    return full


def build_model(meta: CacheMeta, head: Any, info: dict[str, Any], full: Any = None) -> Any:
    """uint8 (B, S, S, 3) RGB -> (B, classes) float32: preprocessing, the frozen base at the
    cached layer (``full``: :func:`pinned_backbone`'s model), and the head as Keras layers."""
    import keras

    name = f"featcache_{meta.backbone}_{type(head).__name__.lower()}"
    if info.get("model_input") == "images":  # end-to-end fine-tune: the whole model is the head
        model = _built_in_preprocess(head.model_, registry.spec(meta.backbone).module)
        p = model.outputs[0]
        out = _two_columns(p, "head") if p.shape[-1] == 1 else p
        return keras.Model(model.inputs[0], out, name=name)  # one input, not a list: serve(x) as for the others
    trunk = full.get_layer(full.name)  # the truncated base inside build's model (no custom layer)
    pixels = keras.Input((meta.size, meta.size, 3), dtype="uint8", name="pixels")
    x = pixels
    for layer in preprocess_layers(registry.spec(meta.backbone).module):
        x = layer(x)
    return keras.Model(pixels, convert_head(head, trunk(x)), name=name)


def build_head_model(meta: CacheMeta, head: Any) -> Any:
    """Features (the cache's map) -> probabilities: the head alone, for an int8 export."""
    import keras

    features = keras.Input(tuple(meta.feature_shape), dtype="float32", name="features")
    return keras.Model(features, convert_head(head, features), name=f"featcache_head_{type(head).__name__.lower()}")


# --------------------------------------------------------------------------- checking


def _extract_config(meta: CacheMeta) -> ExtractConfig:
    recorded = (meta.info or {}).get("config") or {}
    known = {f.name for f in dataclasses.fields(ExtractConfig)}
    fields = {k: v for k, v in recorded.items() if k in known}
    if "split" in fields:
        fields["split"] = tuple(fields["split"])
    return ExtractConfig(**fields)


def check_images(meta: CacheMeta, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` of the run's own validation images (test, then train, without one), spread over
    the split, decoded as predict decodes them; the names of those used."""
    try:
        source = sources.resolve(_extract_config(meta))
    except ConfigError as e:
        raise CacheError(
            f"the export is checked on the run's validation images, and its data cannot be read ({e}); "
            "put the data back where the run recorded it"
        ) from e
    split = next((s for s in ("validation", "test", "train") if s in source.splits and len(source.splits[s])), None)
    if split is None:
        raise CacheError(f"the run's data {source.name} holds no images to check the export on")
    total = len(source.splits[split])
    rows = sorted({int(i) for i in np.linspace(0, total - 1, min(n, total))})
    items = source.items(split)
    got = list(images.batches(items, rows, meta.size, len(rows)))
    decoded = [b for b in got if len(b.rows)]
    if not decoded:
        raise CacheError(f"none of the {len(rows)} {split} image(s) picked to check the export could be decoded")
    return np.concatenate([b.images for b in decoded]), [
        source.splits[split].paths[int(i)] for b in decoded for i in b.rows
    ]


def _runner(fmt: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported file loaded back by its own runtime: a batch of uint8 images -> probabilities."""
    if fmt == "keras":
        model = load_model_safely(path)
        return lambda x: np.asarray(model.predict_on_batch(x))
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))
        return lambda x: np.asarray(loaded.serve(tf.constant(x)))
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: np.asarray(session.run(None, {name: x})[0])
    if fmt == "litert":
        import tensorflow as tf

        with warnings.catch_warnings():  # "deprecated, use ai_edge_litert": still shipped and working in TF 2.21
            warnings.simplefilter("ignore", UserWarning)
            interpreter = tf.lite.Interpreter(model_path=str(path))

        def run(x: np.ndarray) -> np.ndarray:
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, x.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(index, x)
            interpreter.invoke()
            return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))

        return run
    if fmt == "openvino":
        import openvino as ov

        # OpenVINO's CPU plugin computes in bf16 on AMX machines unless told otherwise
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda x: np.asarray(compiled(x)[0])
    raise ConfigError(f"unknown export format {fmt!r}")


def _available(formats: tuple[str, ...]) -> None:
    """Refuse, before any work, a format whose writer or runtime is not installed."""
    for fmt in formats:
        for module, extra in FORMAT_NEEDS[fmt]:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"format {fmt!r} needs the {module} package, which is not installed: "
                    f"pip install 'featcache[{extra}]'"
                    + (" (or pip install tensorflow)" if extra == "tensorflow" else "")
                )


# --------------------------------------------------------------------------- the command


def _target(cfg: ExportConfig) -> Path:
    out = Path(cfg.out) if cfg.out is not None else cfg.run / "export"
    if out.exists() or out.is_symlink():
        raise ConfigError(f"export target {out} already exists; give another --out or remove it (never overwritten)")
    check_writable(out.parent, "export folder")
    return out


def export(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.formats`` of the run's winner into a new folder, each checked against
    predict's probabilities; nothing is left behind when a check or a write fails."""
    import keras

    _available(cfg.formats)
    info = folder.read_run(cfg.run)
    meta = CacheMeta.from_dict(info["cache_meta"])
    out = _target(cfg)
    precision = meta.precision if cfg.precision == "cache" else cfg.precision
    if meta.precision == "int8" and cfg.precision != "cache":
        raise ConfigError(f"{cfg.run} is an int8 run: its export is its OpenVINO model; leave out --precision")
    if meta.precision == "int8" and cfg.formats != ("keras",):
        raise ConfigError(
            f"{cfg.run} is an int8 run: its export is the OpenVINO model that made the features plus the head "
            f"(head.keras); --format {','.join(cfg.formats)} is for float runs"
        )
    if info.get("model_input") == "images" and cfg.precision != "cache":
        raise ConfigError(
            f"{cfg.run} is an end-to-end fine-tune: its model is exported as trained ({meta.precision}); "
            "leave out --precision"
        )
    if precision == "bfloat16" and "onnx" in cfg.formats:
        raise ConfigError(
            "--format onnx of a bfloat16 model: ONNX Runtime's CPU provider has no bfloat16 convolution; "
            "export float32 for ONNX (--precision float32)"
        )
    # predict runs the cache's precision: the looser of the two bounds the difference
    default = max(TOLERANCES[precision], TOLERANCES.get(meta.precision, TOLERANCES["float32"]))
    tolerance = cfg.tolerance if cfg.tolerance is not None else default
    if info.get("tta"):
        raise ConfigError(
            f"{cfg.run} was scored with test-time views (run.json tta: {info['tta']}); an export is one "
            "forward pass per image and would not answer as predict does. Export a run swept without tta"
        )
    head = load_winner(cfg.run, info, trust_pickle=cfg.trust_pickle)
    floating = meta.precision != "int8" and info.get("model_input") != "images"
    full = pinned_backbone(meta, precision) if floating else None
    same = full if precision == meta.precision else None  # predict's backbone too: built once
    proba_fn, _ = reference(cfg.run, info, meta, cfg.batch_size, cfg.trust_pickle, model=same)
    batch, names = check_images(meta, cfg.check_images)
    expected = np.asarray(proba_fn(batch, None), np.float64)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        diffs: dict[str, float] = {}
        files: dict[str, str] = {}
        t0 = time.perf_counter()
        if meta.precision == "int8":
            files, diffs = _write_int8(cfg.run, meta, head, tmp, batch, expected, tolerance, names)
        else:
            model = build_model(meta, head, info, full)
            model.predict_on_batch(batch[:1])  # called once: Model.export traces every sub-model
            for fmt in cfg.formats:
                path = tmp / FORMAT_FILES[fmt]
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    if fmt == "keras":
                        model.save(path)
                    else:
                        model.export(str(path), format=fmt, verbose=False)
                except Exception as e:  # a converter failing on this model: say which format
                    raise CacheError(f"writing the {fmt} export failed ({type(e).__name__}: {str(e)[:300]})") from e
                files[fmt] = FORMAT_FILES[fmt]
                diffs[fmt] = _compare(fmt, _runner(fmt, path)(batch), expected, tolerance, names)
        record = _record(cfg, info, meta, head, precision, files, diffs, tolerance, names)
        if meta.precision != "int8":
            record["input"]["name"] = model.inputs[0].name  # "pixels"; an end-to-end fine-tune keeps its own
        record["export_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str))
        if out.exists():
            raise ConfigError(f"export target {out} appeared while exporting; nothing was overwritten")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        keras.backend.clear_session()
    return ExportResult(out, record)


def _compare(fmt: str, got: np.ndarray, expected: np.ndarray, tolerance: float, names: list[str]) -> float:
    got = np.asarray(got, np.float64)
    if got.shape != expected.shape:
        raise CacheError(f"the {fmt} export returns shape {got.shape}, predict {expected.shape}; refused")
    diff = np.abs(got - expected)
    worst = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(got).all() or worst > tolerance:
        i = int(np.unravel_index(np.nanargmax(diff), diff.shape)[0])
        raise CacheError(
            f"the {fmt} export disagrees with featcache predict: max |p - predict| = {worst:.3g} > "
            f"tolerance {tolerance:g} (worst on {names[i]}); the export was refused and nothing was kept"
        )
    return worst


def _write_int8(
    run_dir: Path,
    meta: CacheMeta,
    head: Any,
    tmp: Path,
    batch: np.ndarray,
    expected: np.ndarray,
    tol: float,
    names: list[str],
) -> tuple[dict[str, str], dict[str, float]]:
    """An int8 run: the very OpenVINO model that made its features, and the head as Keras."""
    recorded = meta.info.get("int8") or {}
    src = run_dir / "int8-model"
    if "model_sha256" not in recorded or not (src / models.MODEL_FILES[1]).is_file():
        raise CacheError(f"{run_dir} holds a head trained on int8 features but not the int8 model ({src} is missing)")
    (tmp / "int8").mkdir()
    for name in (*models.MODEL_FILES, models.RECORD):
        shutil.copy2(src / name, tmp / "int8" / name)
    engine = quantize.load(tmp / "int8", recorded["model_sha256"])
    head_model = build_head_model(meta, head)
    head_model.save(tmp / "head.keras")
    reloaded = load_model_safely(tmp / "head.keras")
    got = reloaded.predict_on_batch(backbone.forward(engine, batch, len(batch)))
    files = {"keras": "head.keras", "openvino": f"int8/{models.MODEL_FILES[0]}"}
    return files, {"keras": _compare("int8 (OpenVINO + head.keras)", got, expected, tol, names)}


def _record(
    cfg: ExportConfig,
    info: dict[str, Any],
    meta: CacheMeta,
    head: Any,
    precision: str,
    files: dict[str, str],
    diffs: dict[str, float],
    tolerance: float,
    names: list[str],
) -> dict[str, Any]:
    labels = [meta.class_names[int(c)] for c in head.classes_]
    return {
        "featcache_version": __version__,
        "run": str(cfg.run.resolve()),
        "run_kind": info.get("kind"),
        "winner_kind": type(head).__name__,
        "winner": info.get("winner"),
        "cache": info.get("cache"),
        "cache_identity": {**dataclasses.asdict(meta.key())},
        "weights_sha256": meta.weights_sha256,
        "weights_file_sha256": meta.weights_file_sha256,
        "weights_source": meta.weights_source,
        "input": {
            "name": "features" if meta.precision == "int8" else "pixels",
            "dtype": "uint8",
            "shape": [None, meta.size, meta.size, 3],
            "channels": "RGB",
            "resize": "square, as featcache decodes (pipeline.features.images)",
        },
        "input_size": meta.size,
        "class_names": list(meta.class_names),
        "labels": labels,  # the name of each output column, in order
        "precision": precision,
        "formats": list(files),
        "files": files,
        "custom_layers": [],
        "check": {
            "images": len(names),
            "image_names": names,
            "tolerance": tolerance,
            "max_abs_diff": diffs,
        },
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
