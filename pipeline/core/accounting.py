"""Compute accounting against the seeds' recipe: backbone passes in its own unit.

The recipe (seed 003) runs VGG16's conv base to block5_pool at 180 px, 50 epochs over 2,000
train and 1,000 validation images: 150,000 passes. A cached configuration's cost is the
images it sent through its backbone (views included), each weighted by its FLOPs over one
recipe pass, so a 224 px image counts 1.58 and a 150 px one 0.68.
"""

from __future__ import annotations

RECIPE_PASSES = 150_000  # 50 epochs x (2,000 train + 1,000 validation) at 180 px
RECIPE_SIZE = 180
# VGG16 conv base to block5_pool at 180 px, multiply-adds x 2 (features.registry.flops_per_image;
# tests/test_tta_scoring.py checks the two agree)
RECIPE_PASS_FLOPS = 19_478_255_616.0


def recipe_passes(images: int, flops_per_image: float | None) -> float | None:
    """``images`` backbone passes of ``flops_per_image`` each, in recipe-pass equivalents;
    None where the backbone's FLOPs are not tabulated (0 or None)."""
    if not flops_per_image:
        return None
    return images * float(flops_per_image) / RECIPE_PASS_FLOPS


def recipe_share(passes: float | None) -> float | None:
    """The fraction of the recipe's 150,000 passes."""
    return None if passes is None else passes / RECIPE_PASSES
