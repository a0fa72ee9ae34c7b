"""The classification stage: six slice labels (any + five subtypes) from one slice.

Loss: sigmoid focal or BCE per label, averaged over labels and valid rows, in
float32. Evaluation collects sigmoid probabilities and labels and scores them
with `uem_ich_jax.evaluate.metrics`, thresholds chosen on a validation split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

import uem_ich_jax
from uem_ich_jax.errors import InputError
from uem_ich_jax.evaluate import metrics as metrics_lib
from uem_ich_jax.train import losses
from uem_ich_jax.train import stages

MODEL_NAMES = ("convnext_v2", "tiny_cnn")
LOSS_KINDS = ("focal", "bce")


POOLS = ("avg", "avgmax")


class TinyCNN(nnx.Module):
  """Strided 3x3 convolutions, global pooling and a linear head: a CPU-sized classifier.

  Stage i (1-based) is a stride-2 convolution to `width * 2**(i - 1)` channels
  and a GELU. Every stage but the last has a LayerNorm before its GELU.
  `depth=2, pool="avg"` is the two-convolution model of smoke runs and tests.
  Max pooling is there to keep the response to a bleed a few pixels wide,
  which the average over the whole slice dilutes (the quickstart measured
  depth and pooling together, not each alone). Its `encoder_*` / `head` names mirror
  ConvNeXt-V2's split into encoder and head, so the optimizer gives each its
  own learning rate.
  """

  def __init__(
      self,
      *,
      width: int = 8,
      depth: int = 2,
      pool: str = "avg",
      num_classes: int = 6,
      dropout: float = 0.1,
      rngs: nnx.Rngs,
  ):
    if depth < 1:
      raise InputError(f"config.model.depth must be at least 1, got {depth}")
    if pool not in POOLS:
      raise InputError(f"config.model.pool {pool!r} is not one of {POOLS}")
    self.depth = depth
    self.pool = pool
    channels = 3
    for stage in range(1, depth + 1):
      out = width * 2 ** (stage - 1)
      conv = nnx.Conv(channels, out, (3, 3), strides=(2, 2), rngs=rngs)
      setattr(self, f"encoder_conv{stage}", conv)
      if stage < depth:
        # Stage 1 keeps the name it had when the model had two stages.
        name = "encoder_norm" if stage == 1 else f"encoder_norm{stage}"
        setattr(self, name, nnx.LayerNorm(out, epsilon=1e-6, rngs=rngs))
      channels = out
    self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
    features = channels * (2 if pool == "avgmax" else 1)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for stage in range(1, self.depth + 1):
      x = getattr(self, f"encoder_conv{stage}")(x)
      if stage < self.depth:
        x = getattr(self, "encoder_norm" if stage == 1 else f"encoder_norm{stage}")(x)
      x = nnx.gelu(x)
    pooled = jnp.mean(x, axis=(1, 2))
    if self.pool == "avgmax":
      pooled = jnp.concatenate([pooled, jnp.max(x, axis=(1, 2))], axis=-1)
    return self.head(self.dropout(pooled)).astype(jnp.float32)


def build_model(model: ml_collections.ConfigDict, *, seed: int) -> nnx.Module:
  """Build the classifier that `config.model` names, in evaluation mode."""
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  if model.name == "tiny_cnn":
    return TinyCNN(
        width=model.width,
        depth=model.get("depth", 2),
        pool=model.get("pool", "avg"),
        num_classes=model.num_classes,
        rngs=rngs,
    )
  if model.name == "convnext_v2":
    from uem_ich_jax.models import convnext_v2

    model_config = stages.encoder_config(model, head=model.head, num_classes=model.num_classes)
    return convnext_v2.ConvNeXtV2(model_config, rngs=rngs)
  raise InputError(f"config.model.name {model.name!r} is not one of {MODEL_NAMES}")


# Running means over the steps between two log lines.
TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    bce=clu_metrics.Average.from_output("bce"),
    positive_fraction=clu_metrics.Average.from_output("positive_fraction"),
)


def loss(
    model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the training loss of one batch. Rows with `valid` False do not count."""
  logits = model(batch["image"]).astype(jnp.float32)
  labels = batch["labels"].astype(jnp.float32)
  valid = batch["valid"]
  bce = losses.sigmoid_bce(logits, labels)
  if config.loss.kind == "focal":
    per_label = losses.sigmoid_focal(
        logits, labels, alpha=config.loss.alpha, gamma=config.loss.gamma
    )
  elif config.loss.kind == "bce":
    per_label = bce
  else:
    raise InputError(f"config.loss.kind {config.loss.kind!r} is not one of {LOSS_KINDS}")
  value = losses.masked_mean(per_label, valid)
  return value, {
      "loss": value,
      "bce": losses.masked_mean(bce, valid),
      "positive_fraction": losses.masked_mean(labels, valid),
  }


def eval_outputs(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    config: ml_collections.ConfigDict | None = None,
) -> dict[str, jax.Array]:
  del config  # Classification evaluation has no settings.
  logits = model(batch["image"]).astype(jnp.float32)
  return {"probabilities": jax.nn.sigmoid(logits), "labels": batch["labels"].astype(jnp.int32)}


def evaluate(
    outputs: Mapping[str, np.ndarray],
    *,
    validation: Mapping[str, np.ndarray] | None,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, float], dict[str, Any]]:
  """AUC of `outputs`; with `validation`, also F1, sensitivity and specificity at its thresholds."""
  return score_labels(outputs, validation=validation, config=config, names=uem_ich_jax.SLICE_LABELS)


def score_labels(
    outputs: Mapping[str, np.ndarray],
    *,
    validation: Mapping[str, np.ndarray] | None,
    config: ml_collections.ConfigDict,
    names: Sequence[str],
) -> tuple[dict[str, float], dict[str, Any]]:
  """Score multi-label `probabilities` against `labels` for the label `names`, as `evaluate` does."""
  names = list(names)
  labels, probabilities = outputs["labels"], outputs["probabilities"]
  if validation is None:
    result = metrics_lib.per_class_auc(labels, probabilities, names)
    result["n"] = int(labels.shape[0])
    scalars = {f"auc_{name}": value for name, value in result["per_class"].items()}
    scalars["auc_macro"] = result["macro"]
    scalars["auc_n_undefined"] = result["n_undefined"]
  else:
    result = metrics_lib.evaluate_classification(
        labels,
        probabilities,
        validation["labels"],
        validation["probabilities"],
        names,
        criterion=config.eval.threshold_criterion,
    )
    scalars = {f"auc_{name}": entry["auc"] for name, entry in result["classes"].items()}
    scalars["auc_macro"] = result["auc"]["macro"]
    scalars["auc_n_undefined"] = result["auc"]["n_undefined"]
    for metric in ("f1", "sensitivity", "specificity"):
      scalars[f"{metric}_macro"] = result["macro"][metric]
  # An undefined metric is None in the JSON result; TensorBoard gets no point for it.
  scalars = {key: float(value) for key, value in scalars.items() if value is not None}
  return scalars, result


class _ClassificationStage:
  name = "classification"
  batch_keys = ("image", "labels", "valid")
  train_metrics = TrainMetrics
  build_model = staticmethod(build_model)
  loss = staticmethod(loss)
  eval_outputs = staticmethod(eval_outputs)
  evaluate = staticmethod(evaluate)


STAGE = _ClassificationStage()
