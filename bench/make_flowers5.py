"""A seeded split of TensorFlow's flower_photos (5 classes, 3,670 JPEGs) into the product's layout.

Source: the public GitHub repository Oldpel/flower_photos (snapshot commit 140ff6f), unpacked as
``SRC/{train,val}/<class>/*.jpg``. Output ``OUT/{train,validation,test}/<class>/``, symlinks to
the source files (no copies; keep both outside the repository):

  test        their ``val`` folder as it is (736 images)
  validation  a stratified 20% of their ``train``: per class, the sorted file names shuffled by
              ``random.Random(SEED)`` (seed 26), the first round(0.2 n) taken
  train       the rest of their ``train``

Usage: python bench/make_flowers5.py [--src /work/data/flowers_src/dataset] [--out /work/data/flowers5]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

SEED = 26


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=Path("/work/data/flowers_src/dataset"))
    p.add_argument("--out", type=Path, default=Path("/work/data/flowers5"))
    args = p.parse_args()
    if not (args.src / "train").is_dir() or not (args.src / "val").is_dir():
        print(f"SKIP: {args.src} has no train/ and val/ folders (unpack Oldpel/flower_photos there)")
        return 0
    if args.out.exists():
        print(f"error: {args.out} exists; remove it first (nothing is overwritten)", file=sys.stderr)
        return 2
    rng = random.Random(SEED)
    counts: dict[str, dict[str, int]] = {}
    for cls in sorted(d.name for d in (args.src / "train").iterdir() if d.is_dir()):
        train = sorted((args.src / "train" / cls).glob("*.jpg"))
        rng.shuffle(train)
        n_val = round(0.2 * len(train))
        splits = {
            "train": train[n_val:],
            "validation": train[:n_val],
            "test": sorted((args.src / "val" / cls).glob("*.jpg")),
        }
        for split, files in splits.items():
            folder = args.out / split / cls
            folder.mkdir(parents=True)
            for f in files:
                (folder / f.name).symlink_to(f.resolve())
            counts.setdefault(split, {})[cls] = len(files)
    for split, per_class in counts.items():
        print(f"{split}: {sum(per_class.values())} images {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
