"""The backbone registry as data: families, default sizes and layers, preprocessing, and
the VGG arithmetic (layer names, output shapes, FLOPs) that needs no Keras.

Options are checked and cache hits answered from here before TensorFlow is imported.
Imports nothing of the project but its errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.core.errors import ConfigError

_CAFFE = (
    "keras.applications.{module}.preprocess_input (caffe mode): RGB->BGR, "
    "subtract ImageNet mean [103.939, 116.779, 123.68], no scaling"
)
_TF = "keras.applications.{module}.preprocess_input (tf mode): scale pixels to [-1, 1]"


@dataclass(frozen=True)
class Spec:
    """One backbone family of keras.applications, with the defaults a user expects."""

    constructor: str  # keras.applications.<constructor>
    module: str  # keras.applications.<module>.preprocess_input
    size: int  # default input size
    layer: str  # default output: the last conv/pooling map, spatial grid kept
    min_size: int  # smallest input the architecture accepts
    preprocessing_template: str  # what preprocess_input does, stored in the cache

    @property
    def preprocessing(self) -> str:
        return self.preprocessing_template.format(module=self.module)


BACKBONES: dict[str, Spec] = {
    "vgg16": Spec("VGG16", "vgg16", 150, "block5_pool", 32, _CAFFE),
    "vgg19": Spec("VGG19", "vgg19", 150, "block5_pool", 32, _CAFFE),
    "resnet50": Spec("ResNet50", "resnet50", 224, "conv5_block3_out", 32, _CAFFE),
    "mobilenetv2": Spec("MobileNetV2", "mobilenet_v2", 224, "out_relu", 32, _TF),
    "inceptionv3": Spec("InceptionV3", "inception_v3", 299, "mixed10", 75, _TF),
    "efficientnetb0": Spec(
        "EfficientNetB0",
        "efficientnet",
        224,
        "top_activation",
        32,
        "none outside the model: EfficientNet rescales and normalises inside it "
        "(keras.applications.efficientnet.preprocess_input is the identity)",
    ),
}

# VGG conv bases: convs per block, and output channels per block
VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
_VGG_CHANNELS = (64, 128, 256, 512, 512)


def spec(backbone: str) -> Spec:
    """The family named ``backbone``; an unknown name lists the available ones."""
    if backbone not in BACKBONES:
        close = difflib.get_close_matches(str(backbone), BACKBONES, n=2)
        hint = f" (did you mean {close}?)" if close else ""
        raise ConfigError(f"unknown backbone {backbone!r}{hint}; available: {sorted(BACKBONES)}")
    return BACKBONES[backbone]


def vgg_layers(name: str = "vgg16") -> tuple[str, ...]:
    return tuple(
        layer
        for b, n in enumerate(VGG_CONVS[name], 1)
        for layer in [f"block{b}_conv{i + 1}" for i in range(n)] + [f"block{b}_pool"]
    )


def unknown_layer(backbone: str, layer: str, names: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
    hint = f"; closest: {close}" if close else ""
    listing = (
        f" Available: {list(names)}"
        if len(names) <= 40
        else f" ({len(names)} layers; the default is {spec(backbone).layer!r})"
    )
    return ConfigError(f"{backbone} has no layer {layer!r}{hint}.{listing}")


def check_layer(layer: str, backbone: str = "vgg16") -> None:
    """VGG layer names are refused here, before any work; other families when built."""
    if backbone in VGG_CONVS and layer not in vgg_layers(backbone):
        raise unknown_layer(backbone, layer, vgg_layers(backbone))


def check_size(size: object, backbone: str) -> int:
    family = spec(backbone)
    if not isinstance(size, int) or isinstance(size, bool) or size < family.min_size:
        raise ConfigError(
            f"image size must be an integer >= {family.min_size} ({backbone}'s minimum input); received size={size!r}"
        )
    return size


def output_shape(size: int, layer: str, backbone: str = "vgg16") -> tuple[int, int, int] | None:
    """(h, w, C) of a VGG ``layer`` for a (size, size, 3) input ('same' convs, 2x2 pools,
    floor); None for other families (read it off the built model)."""
    if backbone not in VGG_CONVS:
        return None
    check_layer(layer, backbone)
    side = size
    for b, (_, channels) in enumerate(zip(VGG_CONVS[backbone], _VGG_CHANNELS, strict=True), 1):
        if layer.startswith(f"block{b}_conv"):
            return side, side, channels
        side //= 2
        if layer == f"block{b}_pool":
            return side, side, channels
    raise AssertionError("unreachable")


def flops_per_image(size: int, layer: str, backbone: str = "vgg16") -> float | None:
    """Multiply-adds x 2 of the conv layers up to ``layer`` (VGG16: 13.2e9 at 150 px,
    block5_pool); None where not tabulated (non-VGG families)."""
    if backbone not in VGG_CONVS:
        return None
    check_layer(layer, backbone)
    total, side, c_in = 0.0, size, 3
    for b, (n, c_out) in enumerate(zip(VGG_CONVS[backbone], _VGG_CHANNELS, strict=True), 1):
        for i in range(n):
            total += 2.0 * side * side * 9 * c_in * c_out
            c_in = c_out
            if layer == f"block{b}_conv{i + 1}":
                return total
        side //= 2
        if layer == f"block{b}_pool":
            return total
    raise AssertionError("unreachable")
