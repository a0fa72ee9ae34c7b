"""Linear probe: which encoder stage carries a scan's `any` label?

Encodes every scan of a `synthetic_ich` scan dataset with an exported encoder,
without augmentation. Each stage's map is pooled per slice (max over pixels)
and then per scan (max and mean over slices). The features are standardised
on the training folds, where a logistic regression is fitted. For each stage
it prints the AUC on the training folds and on the validation fold, so a
frozen encoder's tokens can be judged before an aggregator is trained on them.
The test fold is left out.

    python experiments/probe_scan_features.py \
        --encoder=work/curriculum/multitask/export/encoder \
        --dataset=synthetic_ich/scans_curriculum --data-dir=work/curriculum/tfds

Needs scikit-learn (in the test extra).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx
from sklearn.linear_model import LogisticRegression

from uem_ich_jax.ct.windowing import uint8_to_model_input
from uem_ich_jax.evaluate.metrics import roc_auc
from uem_ich_jax.models import convnext_v2
from uem_ich_jax.train import checkpoint as checkpoint_lib
from uem_ich_jax.train import stages


def load_encoder(directory: str) -> convnext_v2.ConvNeXtV2:
  """Build the exported ConvNeXt-V2 without a head and copy the export into it."""
  manifest, arrays = checkpoint_lib.read_encoder_export(directory)
  model_fields = manifest.get("model", {})
  config = convnext_v2.ConvNeXtV2Config(
      variant=model_fields.get("variant", "atto"),
      head=None,
      coordinate_attention_stages=tuple(model_fields.get("coordinate_attention_stages", ())),
  )
  model = convnext_v2.ConvNeXtV2(config, rngs=nnx.Rngs(0))
  _, params, _, extra = stages.split_model(model)
  params, _ = stages.copy_encoder(params, arrays["params"], head_prefix="head", source_name=directory)
  extra, _ = stages.copy_encoder(
      extra, arrays.get("extra", {}), head_prefix="head", source_name=directory
  )
  nnx.update(model, params)
  nnx.update(model, extra)
  model.eval()
  return model


def scan_features(model, source) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
  """Return per stage (scans, 2 * C) features, the scans' `any` labels and folds."""

  @nnx.jit
  def slice_maxima(model, images):
    return [stage_map.max(axis=(1, 2)) for stage_map in model.features(images)]

  per_stage, labels, folds = None, [], []
  for index in range(len(source)):
    example = source[index]
    images = uint8_to_model_input(np.asarray(example["image"]))
    maxima = [np.asarray(value) for value in slice_maxima(model, jax.numpy.asarray(images))]
    pooled = [np.concatenate([value.max(axis=0), value.mean(axis=0)]) for value in maxima]
    if per_stage is None:
      per_stage = [[] for _ in pooled]
    for stage, value in enumerate(pooled):
      per_stage[stage].append(value)
    labels.append(int(np.asarray(example["labels"])[0]))
    folds.append(int(example["fold"]))
  return [np.stack(values) for values in per_stage], np.array(labels), np.array(folds)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--encoder", required=True, help="an encoder export folder")
  parser.add_argument("--dataset", default="synthetic_ich/scans_curriculum")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--test-fold", type=int, default=0)
  parser.add_argument("--validation-fold", type=int, default=1)
  parser.add_argument("--regularisation", type=float, default=0.1, help="inverse L2 strength C")
  args = parser.parse_args(argv)

  source = tfds.data_source(args.dataset, split="train", data_dir=args.data_dir, download=False)
  features, labels, folds = scan_features(load_encoder(args.encoder), source)
  train = (folds != args.test_fold) & (folds != args.validation_fold)
  validation = folds == args.validation_fold
  print(f"{train.sum()} training scans, {validation.sum()} validation scans")
  print("| stage | stride | features | training AUC | validation AUC |")
  print("|---|---|---|---|---|")
  for stage, values in enumerate(features):
    mean, spread = values[train].mean(axis=0), values[train].std(axis=0) + 1e-6
    standard = (values - mean) / spread
    probe = LogisticRegression(C=args.regularisation, max_iter=5000)
    probe.fit(standard[train], labels[train])
    scores = probe.decision_function(standard)
    fitted, held_out = roc_auc(labels[train], scores[train]), roc_auc(labels[validation], scores[validation])
    print(f"| {stage} | {4 * 2**stage} | {values.shape[1]} | {fitted:.3f} | {held_out:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
