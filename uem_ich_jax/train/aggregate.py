"""The `aggregator` stage: scan-level labels from every slice of a scan.

The ConvNeXt-V2 encoder maps each slice to its stride-32 feature map, the scan
aggregator attends over the tokens of all real slices, and the scan head gives
one logit per label (`uem_ich_jax.models.scan_model.ScanModel`). The label set
is the six MBH scan labels (`labels`, in `uem_ich_jax.SLICE_LABELS` order) or
the 14 CQ500 labels (`cq500_labels`, in `uem_ich_jax.CQ500_LABELS` order).

Loss: sigmoid focal (alpha_t weighting) or BCE per label, averaged over labels
and valid scans, in float32. With `config.aggregator.freeze_encoder` the
encoder runs in evaluation mode, its features are cut from the gradient and
`config.optim.encoder_lr` must be 0, so that AdamW's weight decay does not
move it either. Encoding is then most of a step's time, so
`config.aggregator.cache_tokens = K` encodes K passes over the training scans
once, each with its own shuffle and augmentation, and trains the aggregator
and head on these cached tokens (`token_cache.TokenCache`). Evaluation always
encodes the images. Evaluation scores per-scan probabilities with
`uem_ich_jax.evaluate.metrics`, thresholds chosen on a validation split.

The encoder sits at the model root, so its export at the end of training is
every parameter outside `config.optim.head_prefix` (`encoder_arrays`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx
from jax.experimental import multihost_utils

import uem_ich_jax
from uem_ich_jax import compile_options
from uem_ich_jax.data import pipeline
from uem_ich_jax.data.global_batch import to_global_batch
from uem_ich_jax.errors import InputError
from uem_ich_jax.train import classification
from uem_ich_jax.train import losses
from uem_ich_jax.train import stages
from uem_ich_jax.train import token_cache

logger = logging.getLogger(__name__)

# Label set -> the example field that contains its labels.
LABEL_FIELDS = {"mbh": "labels", "cq500": "cq500_labels"}
LOSS_KINDS = ("focal", "bce")

# `config.aggregator` fields and the values used where a config lacks them.
AGGREGATOR_DEFAULTS = {
    "label_set": "mbh",  # "mbh" (6 labels) or "cq500" (14 labels)
    "freeze_encoder": True,  # the upstream trains the aggregator on a frozen encoder
    # Passes of the training scans to encode once with the frozen encoder and
    # train on; 0 encodes every batch at every step.
    "cache_tokens": 0,
    "cache_max_gib": 16.0,  # the largest token cache allowed in host memory
}


def aggregator_setting(config: ml_collections.ConfigDict | None, name: str) -> Any:
  """Return `config.aggregator.<name>`, or its `AGGREGATOR_DEFAULTS` value when the config lacks it."""
  section = None if config is None else config.get("aggregator")
  if section is None:
    return AGGREGATOR_DEFAULTS[name]
  return section.get(name, AGGREGATOR_DEFAULTS[name])


def label_names(label_set: str) -> tuple[str, ...]:
  """Return the label names of `label_set`, in the order of its label field."""
  if label_set == "mbh":
    return tuple(uem_ich_jax.SLICE_LABELS)
  if label_set == "cq500":
    return tuple(uem_ich_jax.CQ500_LABELS)
  raise InputError(
      f"config.aggregator.label_set {label_set!r} is not one of {sorted(LABEL_FIELDS)}"
  )


def label_field(config: ml_collections.ConfigDict | None) -> str:
  """Return the example field that contains the labels of the configured label set."""
  label_set = aggregator_setting(config, "label_set")
  if label_set not in LABEL_FIELDS:
    raise InputError(
        f"config.aggregator.label_set {label_set!r} is not one of {sorted(LABEL_FIELDS)}"
    )
  return LABEL_FIELDS[label_set]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Reject `config` values this stage cannot train with, before anything is compiled."""
  names = label_names(aggregator_setting(config, "label_set"))
  if config.model.num_classes != len(names):
    raise InputError(
        f"config.model.num_classes is {config.model.num_classes} but label_set"
        f" {aggregator_setting(config, 'label_set')!r} has {len(names)} labels; set"
        f" config.model.num_classes = {len(names)}"
    )

  freeze = aggregator_setting(config, "freeze_encoder")
  if not isinstance(freeze, bool):
    raise InputError(f"config.aggregator.freeze_encoder must be True or False, got {freeze!r}")
  if freeze and config.optim.encoder_lr != 0:
    raise InputError(
        f"config.aggregator.freeze_encoder is True but config.optim.encoder_lr is"
        f" {config.optim.encoder_lr}; set encoder_lr to 0, because AdamW's weight decay would"
        " otherwise move the frozen encoder"
    )
  if not freeze and not config.optim.encoder_lr > 0:
    # With encoder_lr 0 the weights stay put, yet the encoder runs in training
    # mode, so the BatchNorm statistics of its coordinate attention still drift.
    raise InputError(
        f"config.aggregator.freeze_encoder is False but config.optim.encoder_lr is"
        f" {config.optim.encoder_lr}; set encoder_lr > 0 to fine-tune the encoder, or set"
        " freeze_encoder to True to keep it fixed"
    )
  copies = aggregator_setting(config, "cache_tokens")
  if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
    raise InputError(
        f"config.aggregator.cache_tokens must be a non-negative integer, got {copies!r}"
    )
  if copies and not freeze:
    raise InputError(
        f"config.aggregator.cache_tokens is {copies} but freeze_encoder is False; tokens can be"
        " cached only while the encoder is frozen, so set cache_tokens to 0 to fine-tune it"
    )
  limit = aggregator_setting(config, "cache_max_gib")
  if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
    raise InputError(f"config.aggregator.cache_max_gib must be a positive number, got {limit!r}")
  if freeze and str(config.get("init_from", "")) == "random":
    logger.warning(
        "config.aggregator.freeze_encoder is True and config.init_from is 'random': the"
        " aggregator trains on a frozen randomly initialised encoder"
    )

  if config.loss.kind not in LOSS_KINDS:
    raise InputError(f"config.loss.kind {config.loss.kind!r} is not one of {LOSS_KINDS}")
  max_slices = config.model.max_slices
  if isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1:
    raise InputError(f"config.model.max_slices must be a positive integer, got {max_slices!r}")
  # Raises for buckets that are not strictly increasing positive integers.
  buckets = pipeline.check_slice_buckets(config.data.get("slice_buckets"))
  if buckets is not None and buckets[-1] > max_slices:
    raise InputError(
        f"the largest of config.data.slice_buckets {buckets} exceeds config.model.max_slices"
        f" ({max_slices}), the length of the aggregator's positional encoding"
    )


def build_model(model: ml_collections.ConfigDict, *, seed: int) -> nnx.Module:
  """Build the `ScanModel` that `config.model` describes, in evaluation mode.

  Fields read: name ("convnext_v2"), variant, coordinate_attention_stages,
  coordinate_attention_placement, drop_path_rate, dtype, num_classes,
  image_size, max_slices, aggregator (keyword arguments of ScanAggregator),
  aggregator_dim, scan_head_hidden_dim, scan_head_dropout and token_features.
  """
  if model.name != "convnext_v2":
    raise InputError(
        f"config.model.name {model.name!r} has no scan model; the aggregator stage needs"
        " 'convnext_v2'"
    )
  from uem_ich_jax.models import scan_model

  encoder_config = stages.encoder_config(model)
  aggregator = model.get("aggregator")
  aggregator = {} if aggregator is None else dict(aggregator.items())
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  return scan_model.ScanModel(
      encoder_config,
      num_classes=model.num_classes,
      image_size=model.image_size,
      max_slices=model.max_slices,
      aggregator=aggregator,
      aggregator_dim=model.get("aggregator_dim"),
      head_hidden_dim=model.get("scan_head_hidden_dim"),
      head_dropout=model.get("scan_head_dropout", 0.4),
      token_features=model.get("token_features", "last"),
      rngs=rngs,
  )


# Running means over the steps between two log lines.
TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    bce=clu_metrics.Average.from_output("bce"),
    positive_fraction=clu_metrics.Average.from_output("positive_fraction"),
    real_slices=clu_metrics.Average.from_output("real_slices"),
)


def _slice_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Return `slice_mask` as bool, with slice 0 marked real in a scan that has no real slice.

  A scan with every key masked would give NaN attention weights. Only padding
  rows (`valid` False) can be such scans.
  """
  mask = batch["slice_mask"].astype(bool)
  empty = ~jnp.any(mask, axis=1)
  return mask.at[:, 0].set(mask[:, 0] | empty)


def _labels(batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict | None) -> jax.Array:
  field = label_field(config)
  if field not in batch:
    raise InputError(
        f"the batch has no {field!r} field, which label_set"
        f" {aggregator_setting(config, 'label_set')!r} reads; the dataset must provide it"
    )
  return batch[field]


def logits(
    model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict | None
) -> jax.Array:
  """Return the (B, num_classes) float32 logits of a batch of padded scans.

  A batch from the token cache contains `tokens` instead of images, and only the
  aggregator and head run.
  """
  if token_cache.TOKENS in batch:
    return model.head(batch[token_cache.TOKENS], _slice_mask(batch)).astype(jnp.float32)
  freeze = bool(aggregator_setting(config, "freeze_encoder"))
  return model(batch["image"], _slice_mask(batch), freeze_encoder=freeze).astype(jnp.float32)


def loss(
    model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the training loss of one batch of scans. Scans with `valid` False do not count."""
  labels = _labels(batch, config).astype(jnp.float32)
  valid = batch["valid"]
  # A masked mean multiplies by 0, which keeps a NaN; padding rows get logit 0.
  scan_logits = jnp.where(valid[:, None], logits(model, batch, config), 0.0)
  bce = losses.sigmoid_bce(scan_logits, labels)
  if config.loss.kind == "focal":
    per_label = losses.sigmoid_focal(
        scan_logits, labels, alpha=config.loss.alpha, gamma=config.loss.gamma
    )
  elif config.loss.kind == "bce":
    per_label = bce
  else:
    raise InputError(f"config.loss.kind {config.loss.kind!r} is not one of {LOSS_KINDS}")
  value = losses.masked_mean(per_label, valid)
  real_slices = jnp.sum(batch["slice_mask"].astype(jnp.float32), axis=1)
  return value, {
      "loss": value,
      "bce": losses.masked_mean(bce, valid),
      "positive_fraction": losses.masked_mean(labels, valid),
      "real_slices": losses.masked_mean(real_slices, valid),
  }


def eval_outputs(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    config: ml_collections.ConfigDict | None = None,
) -> dict[str, jax.Array]:
  """Per-scan sigmoid `probabilities` and 0/1 `labels`, (B, num_classes) each."""
  probabilities = jax.nn.sigmoid(logits(model, batch, config))
  return {"probabilities": probabilities, "labels": _labels(batch, config).astype(jnp.int32)}


def evaluate(
    outputs: Mapping[str, np.ndarray],
    *,
    validation: Mapping[str, np.ndarray] | None,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, float], dict[str, Any]]:
  """AUC per label of `outputs`; with `validation`, also F1, sensitivity and specificity at its thresholds."""
  labels = outputs["labels"]
  if labels.shape[0] == 0:
    raise InputError("no valid scans to evaluate; the evaluated split is empty")
  label_set = aggregator_setting(config, "label_set")
  scalars, result = classification.score_labels(
      outputs, validation=validation, config=config, names=label_names(label_set)
  )
  result["label_set"] = label_set
  return scalars, result


def train_input(setup: Any, iterator: Any, source: Any) -> Any:
  """Wrap the training input in a `TokenCache` when `config.aggregator.cache_tokens` > 0."""
  config = setup.config
  copies = aggregator_setting(config, "cache_tokens")
  if not copies:
    return iterator
  batch_size = config.data.batch_size // jax.process_count()
  shard = pipeline.train_shard(
      source,
      folds=setup.folds.train,
      batch_size=batch_size,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      patient_fraction=config.data.get("patient_fraction", 1.0),
      patient_seed=config.data.get("patient_seed", 0),
  )
  # Batches run across passes, so K passes fill ceil(K * scans / batch) batches.
  return token_cache.TokenCache(
      iterator,
      batches=-(-copies * len(shard) // batch_size),
      keep=tuple(key for key in _AggregatorStage.batch_keys_for(config) if key != "image"),
      seed=config.seed,
      max_bytes=float(aggregator_setting(config, "cache_max_gib")) * 2**30,
  )


def prepare_train_input(setup: Any, state: Any, iterator: Any) -> None:
  """Fill a `TokenCache` with the tokens of the frozen encoder in `state`; leave other iterators alone."""
  if not isinstance(iterator, token_cache.TokenCache):
    return

  def encode(state, images, slice_mask):
    model = setup.eval_model(state)
    mask = _slice_mask({"slice_mask": slice_mask})
    return model.scan_features(images, mask)

  jitted = jax.jit(
      encode,
      in_shardings=(setup.state_shardings, setup.data_sharding, setup.data_sharding),
      out_shardings=setup.data_sharding,
      compiler_options=compile_options.forward_options(setup.mesh.devices.flat[0].platform),
  )

  def host_tokens(batch: Mapping[str, Any]) -> np.ndarray:
    arrays = to_global_batch(
        {"image": batch["image"], "slice_mask": batch["slice_mask"]}, setup.data_sharding
    )
    tokens = jitted(state, arrays["image"], arrays["slice_mask"])
    local = multihost_utils.global_array_to_host_local_array(
        tokens, setup.mesh, setup.data_sharding.spec
    )
    return np.asarray(local)

  iterator.prepare(host_tokens)


class _AggregatorStage:
  name = "aggregator"
  batch_keys = ("image", "slice_mask", "labels", "valid")
  train_metrics = TrainMetrics
  build_model = staticmethod(build_model)
  loss = staticmethod(loss)
  eval_outputs = staticmethod(eval_outputs)
  evaluate = staticmethod(evaluate)
  check_config = staticmethod(check_config)
  train_input = staticmethod(train_input)
  prepare_train_input = staticmethod(prepare_train_input)
  # The encoder is the model root, so the export is everything outside the head.
  encoder_arrays = staticmethod(stages.root_encoder_arrays)

  @staticmethod
  def batch_keys_for(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Return the batch fields the jitted steps need under `config`'s label set."""
    return ("image", "slice_mask", label_field(config), "valid")


STAGE = _AggregatorStage()
