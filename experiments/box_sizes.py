"""Print the size of the ground-truth boxes per subtype in one fold of a built slice dataset.

Usage (after experiments/curriculum_synthetic.py has built its data):

    python experiments/box_sizes.py --data-dir=work/curriculum/tfds --fold=1

For each subtype: the box count, the median height x width in pixels, and the
share of boxes whose longer side is at most 1 and at most 2 pixels.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

import uem_ich_jax


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--name", default="synthetic_ich/slices_curriculum")
  parser.add_argument("--fold", type=int, default=1)
  args = parser.parse_args()

  import tensorflow_datasets as tfds

  source = tfds.data_source(args.name, split="train", data_dir=args.data_dir, download=False)
  sizes = collections.defaultdict(list)
  for index in range(len(source)):
    example = source[index]
    if int(example["fold"]) != args.fold:
      continue
    for box, class_id in zip(example["boxes"], example["box_classes"]):
      sizes[int(class_id)].append((box[2] - box[0], box[3] - box[1]))
  print(f"{args.name}, fold {args.fold}")
  for class_id, values in sorted(sizes.items()):
    values = np.asarray(values)
    longer = values.max(axis=1)
    height, width = np.median(values, axis=0)
    print(
        f"{uem_ich_jax.SUBTYPES[class_id - 1]:>16}: {len(values)} boxes, median"
        f" {height:.0f} x {width:.0f} px, longer side <= 1 px: {np.mean(longer <= 1):.1%},"
        f" <= 2 px: {np.mean(longer <= 2):.1%}"
    )


if __name__ == "__main__":
  main()
