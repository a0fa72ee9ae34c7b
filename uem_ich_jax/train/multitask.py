"""The `multitask` stage: one encoder, slice classification, segmentation and detection heads.

Schedules (`config.multitask.schedule`):
  mixed: every step sums the task losses with the fixed `config.multitask.weights`.
  alternating: as the upstream, each step is a segmentation step with
    probability `segmentation_probability` (drawn from the step's key),
    otherwise a classification step. The two weights ramp linearly from
    `ramp_start` to `ramp_end` (segmentation, classification) over the run.
    Detection, when on, joins the segmentation steps.

Per-example flags `has_labels`, `has_mask` and `has_boxes` (True where a batch
lacks them) weight each task's loss, so batches that mix datasets with
different annotations train each head only on the examples that carry its
targets. Evaluation regroups slices into scans and reports 3D Dice, hematoma
volume error and slice AUCs (see `evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping
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
from uem_ich_jax.evaluate import segmentation as segmentation_metrics
from uem_ich_jax.train import classification
from uem_ich_jax.train import losses
from uem_ich_jax.train import stages

SCHEDULES = ("mixed", "alternating")

# `config.multitask` fields and the values used where a config lacks them.
MULTITASK_DEFAULTS = {
    "schedule": "mixed",
    # mixed: weight of each task loss.
    "weights": {"classification": 1.0, "segmentation": 1.0, "detection": 1.0},
    # alternating: chance of a segmentation step, and (segmentation,
    # classification) weights at the first and the last step.
    "segmentation_probability": 0.5,
    "ramp_start": (0.8, 0.2),
    "ramp_end": (0.5, 0.5),
    "detection": False,
    # Segmentation loss: focal_weight * focal CE + dice_weight * (1 - soft Dice).
    "focal_weight": 0.2,
    "dice_weight": 0.8,
    "aux_weights": (0.4, 0.3, 0.2, 0.1),
    "focal_alpha": 0.75,
    "focal_gamma": 2.0,
    "dice_epsilon": 1.0,
    # Detection loss and decoding.
    "detection_alpha": 0.25,
    "detection_gamma": 2.0,
    "center_radius": 1.5,
    "score_threshold": 0.05,
    "max_detections": 20,
    # Relative volume error counts scans with more true blood than this (mL).
    "min_volume_ml": segmentation_metrics.DEFAULT_MIN_VOLUME_ML,
}

# `config.model` fields of the heads beside the classifier, with defaults.
HEAD_DEFAULTS = {
    "segmentation_classes": 6,
    "embed_dim": 64,
    "classify_at_stride4": False,
    "detection": False,
}

# Availability flags: (batch field, task).
TASK_FLAGS = (("has_labels", "classification"), ("has_mask", "segmentation"), ("has_boxes", "detection"))


def setting(config: ml_collections.ConfigDict | None, name: str) -> Any:
  """Return `config.multitask.<name>`, or its `MULTITASK_DEFAULTS` value."""
  section = None if config is None else config.get("multitask")
  if section is None or name not in section:
    return MULTITASK_DEFAULTS[name]
  value = section[name]
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Reject `config.multitask` values and `config.model` head sizes that cannot train, before compiling."""
  schedule = setting(config, "schedule")
  if schedule not in SCHEDULES:
    raise InputError(f"config.multitask.schedule {schedule!r} is not one of {SCHEDULES}")
  weights = setting(config, "weights")
  for task in ("classification", "segmentation", "detection"):
    value = weights.get(task)
    if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
      raise InputError(
          f"config.multitask.weights.{task} must be a finite number >= 0, got {value!r}"
      )
  probability = setting(config, "segmentation_probability")
  if not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
    raise InputError(
        f"config.multitask.segmentation_probability must be in [0, 1], got {probability!r}"
    )
  for name in ("ramp_start", "ramp_end"):
    pair = tuple(setting(config, name))
    if len(pair) != 2 or any(not np.isfinite(w) or w < 0 for w in pair):
      raise InputError(
          f"config.multitask.{name} must be two weights >= 0 (segmentation, classification),"
          f" got {pair!r}"
      )
  if len(tuple(setting(config, "aux_weights"))) != 4:
    raise InputError(
        "config.multitask.aux_weights must give one weight per encoder stage (4), got"
        f" {setting(config, 'aux_weights')!r}"
    )
  if bool(setting(config, "detection")) != bool(config.model.get("detection", False)):
    raise InputError(
        f"config.multitask.detection ({setting(config, 'detection')}) and config.model.detection"
        f" ({config.model.get('detection', False)}) differ; the model needs the detection head"
        " exactly when its loss is on"
    )
  _check_task_weights(config)
  _check_model_classes(config.model)


def _check_task_weights(config: ml_collections.ConfigDict) -> None:
  """Reject schedules in which no task loss has a nonzero weight, which would train on loss 0."""
  weights = setting(config, "weights")
  detection = bool(setting(config, "detection"))
  if setting(config, "schedule") == "mixed":
    tasks = ("classification", "segmentation") + (("detection",) if detection else ())
    if all(weights[task] == 0 for task in tasks):
      raise InputError(
          f"config.multitask.weights of {list(tasks)} are all 0, so the mixed schedule would"
          " train on a loss of 0; give at least one of them a weight > 0"
      )
    return

  # Alternating: a step trains segmentation (with detection) or classification
  # only, so a task that is drawn needs a ramp weight above 0 at some step.
  start, end = tuple(setting(config, "ramp_start")), tuple(setting(config, "ramp_end"))
  probability = setting(config, "segmentation_probability")
  drawn = {"segmentation": probability > 0, "classification": probability < 1}
  for index, task in enumerate(("segmentation", "classification")):
    if drawn[task] and start[index] == 0 and end[index] == 0:
      raise InputError(
          f"config.multitask.ramp_start and ramp_end both give {task} weight 0, but the"
          f" alternating schedule draws {task} steps (segmentation_probability {probability}),"
          f" which would train on a loss of 0; set a {task} weight > 0 or set"
          f" segmentation_probability to {1.0 if task == 'classification' else 0.0}"
      )


def _check_model_classes(model: ml_collections.ConfigDict) -> None:
  """Reject head sizes that do not fit the labels, mask ids and box classes of the batches."""
  segmentation_classes = model.get("segmentation_classes", HEAD_DEFAULTS["segmentation_classes"])
  # Mask ids are 0 (background) to 5 (the BHSD subtype ids), so a head with
  # fewer classes sees ids outside its softmax and the loss becomes NaN.
  multiclass = len(uem_ich_jax.SUBTYPES) + 1
  is_integer = isinstance(segmentation_classes, int) and not isinstance(segmentation_classes, bool)
  if not is_integer or segmentation_classes not in (multiclass, 1):
    raise InputError(
        f"config.model.segmentation_classes is {segmentation_classes!r}; expected {multiclass}"
        f" (background + the {len(uem_ich_jax.SUBTYPES)} subtype ids of the masks) or 1 (binary"
        " foreground)"
    )
  num_classes = model.get("num_classes", len(uem_ich_jax.SLICE_LABELS))
  if num_classes != len(uem_ich_jax.SLICE_LABELS):
    raise InputError(
        f"config.model.num_classes is {num_classes!r}, but slice labels have"
        f" {len(uem_ich_jax.SLICE_LABELS)} columns {uem_ich_jax.SLICE_LABELS}; set it to"
        f" {len(uem_ich_jax.SLICE_LABELS)}"
    )
  # `build_model` never passes detection_classes on: the FCOS head always has
  # one output per subtype, because box class ids are 1 to 5.
  detection_classes = model.get("detection_classes")
  if detection_classes is not None and detection_classes != len(uem_ich_jax.SUBTYPES):
    raise InputError(
        f"config.model.detection_classes is {detection_classes!r}, but box class ids are the"
        f" {len(uem_ich_jax.SUBTYPES)} subtypes; remove the field or set it to"
        f" {len(uem_ich_jax.SUBTYPES)}"
    )


# ------------------------------------------------------------------ Model ---


class Schedule(nnx.Module):
  """The random stream that draws the alternating schedule's task, a fresh key each step."""

  def __init__(self, rngs: nnx.Rngs):
    self.stream = rngs["schedule"]


def build_model(model: ml_collections.ConfigDict, *, seed: int) -> nnx.Module:
  """Build the multi-task model of `config.model`, in evaluation mode.

  Streams: `params` from `seed`, `dropout` from `seed + 1` and `schedule`
  from `seed + 2`. The trainer replaces the last two keys every step.
  """
  if model.name != "convnext_v2":
    raise InputError(
        f"config.model.name {model.name!r} cannot train the multi-task stage; expected 'convnext_v2'"
    )
  from uem_ich_jax.models import uem

  heads_fields = {name: model.get(name, default) for name, default in HEAD_DEFAULTS.items()}
  encoder_config = stages.encoder_config(model, head=model.head, num_classes=model.num_classes)
  try:
    heads = uem.HeadsConfig(**heads_fields)
  except (ValueError, TypeError) as error:
    raise InputError(f"config.model does not describe a multi-task ConvNeXt-V2: {error}") from error
  rngs = nnx.Rngs(params=seed, dropout=seed + 1, schedule=seed + 2)
  network = uem.UEM(encoder_config, heads, rngs=rngs)
  # A "head" name keeps the schedule stream out of encoder exports.
  network.head_schedule = Schedule(rngs)
  network.eval()
  return network



# ---------------------------------------------------------------- Weights ---


def ramp_weights(
    step: jax.Array,
    num_steps: int,
    *,
    start: tuple[float, float] = (0.8, 0.2),
    end: tuple[float, float] = (0.5, 0.5),
) -> tuple[jax.Array, jax.Array]:
  """Return (segmentation, classification) weights at `step`, linear from `start` to `end`.

  Step 0 gets `start` and step `num_steps - 1` gets `end`; later steps stay at
  `end`. Works on traced steps.
  """
  fraction = jnp.asarray(step, jnp.float32) / max(int(num_steps) - 1, 1)
  fraction = jnp.clip(fraction, 0.0, 1.0)
  segmentation = start[0] + (end[0] - start[0]) * fraction
  classification = start[1] + (end[1] - start[1]) * fraction
  return segmentation, classification


def draw_segmentation_step(key: jax.Array, probability: float = 0.5) -> jax.Array:
  """Return a bool scalar: True for a segmentation step, with the given probability."""
  return jax.random.bernoulli(key, probability)


# ------------------------------------------------------------------- Loss ---


TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    classification=clu_metrics.Average.from_output("classification"),
    segmentation=clu_metrics.Average.from_output("segmentation"),
    segmentation_focal=clu_metrics.Average.from_output("segmentation_focal"),
    segmentation_dice=clu_metrics.Average.from_output("segmentation_dice"),
    detection=clu_metrics.Average.from_output("detection"),
    weight_segmentation=clu_metrics.Average.from_output("weight_segmentation"),
    weight_classification=clu_metrics.Average.from_output("weight_classification"),
    segmentation_steps=clu_metrics.Average.from_output("segmentation_steps"),
)


def _task_weights(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-example float weights of each task: `valid` times the task's availability flag."""
  valid = batch["valid"].astype(jnp.float32)
  weights = {}
  for flag, task in TASK_FLAGS:
    available = batch.get(flag)
    weights[task] = valid if available is None else valid * available.astype(jnp.float32)
  return weights


def _classification_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
  labels = labels.astype(jnp.float32)
  kind = config.loss.kind
  if kind == "focal":
    per_label = losses.sigmoid_focal(
        logits, labels, alpha=config.loss.alpha, gamma=config.loss.gamma
    )
  elif kind == "bce":
    per_label = losses.sigmoid_bce(logits, labels)
  else:
    raise InputError(f"config.loss.kind {kind!r} is not one of {classification.LOSS_KINDS}")
  return losses.masked_mean(per_label, weights)


def _detection_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    weights: jax.Array,
    config: ml_collections.ConfigDict,
) -> jax.Array:
  from uem_ich_jax.models import detection
  from uem_ich_jax.models import uem

  feature_size = tuple(outputs["class_logits"].shape[1:3])
  targets = detection.fcos_targets(
      batch["boxes"],
      batch["box_classes"],
      feature_size,
      uem.NECK_STRIDE,
      center_radius=float(setting(config, "center_radius")),
  )
  total, _ = detection.fcos_loss(
      outputs,
      targets,
      weights > 0,
      alpha=float(setting(config, "detection_alpha")),
      gamma=float(setting(config, "detection_gamma")),
  )
  return total


def loss(
    model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the multi-task loss of one batch; the alternating ramp reads `batch["step"]`.

  Rows with `valid` False do not count, and each task counts only the rows
  whose availability flag is set.
  """
  weights = _task_weights(batch)
  outputs = model(batch["image"])
  class_loss = _classification_loss(
      outputs["class_logits"], batch["labels"], weights["classification"], config
  )
  segmentation_loss, parts = losses.segmentation_loss(
      outputs["segmentation"],
      outputs["segmentation_aux"],
      batch["mask"],
      weights["segmentation"],
      focal_weight=float(setting(config, "focal_weight")),
      dice_weight=float(setting(config, "dice_weight")),
      aux_weights=tuple(setting(config, "aux_weights")),
      alpha=float(setting(config, "focal_alpha")),
      gamma=float(setting(config, "focal_gamma")),
      epsilon=float(setting(config, "dice_epsilon")),
  )
  if setting(config, "detection"):
    detection_loss = _detection_loss(outputs["detection"], batch, weights["detection"], config)
  else:
    detection_loss = jnp.zeros((), jnp.float32)

  # Outside the trainer (tests, direct calls) a batch may lack the step.
  step = batch.get("step", jnp.zeros((), jnp.int32))
  task_weights = setting(config, "weights")
  detection_weight = float(task_weights["detection"])
  if setting(config, "schedule") == "mixed":
    w_segmentation = jnp.asarray(task_weights["segmentation"], jnp.float32)
    w_classification = jnp.asarray(task_weights["classification"], jnp.float32)
    value = (
        w_classification * class_loss
        + w_segmentation * segmentation_loss
        + detection_weight * detection_loss
    )
    segmentation_step = jnp.ones((), jnp.float32)
  else:
    w_segmentation, w_classification = ramp_weights(
        step,
        config.num_steps,
        start=tuple(setting(config, "ramp_start")),
        end=tuple(setting(config, "ramp_end")),
    )
    is_segmentation = draw_segmentation_step(
        model.head_schedule.stream(), float(setting(config, "segmentation_probability"))
    )
    # Both branches are computed and one is selected: the encoder pass is
    # shared, so only the unused head's work is wasted, and the gradient of
    # the unselected branch is exactly zero.
    value = jnp.where(
        is_segmentation,
        w_segmentation * (segmentation_loss + detection_weight * detection_loss),
        w_classification * class_loss,
    )
    segmentation_step = is_segmentation.astype(jnp.float32)
  return value, {
      "loss": value,
      "classification": class_loss,
      "segmentation": segmentation_loss,
      "segmentation_focal": parts["focal"],
      "segmentation_dice": parts["dice"],
      "detection": detection_loss,
      "weight_segmentation": jnp.asarray(w_segmentation, jnp.float32),
      "weight_classification": jnp.asarray(w_classification, jnp.float32),
      "segmentation_steps": segmentation_step,
  }


# ------------------------------------------------------------- Evaluation ---


def predicted_mask(logits: jax.Array) -> jax.Array:
  """Return the (N, H, W) uint8 class ids of segmentation logits (binary: sigmoid > 0.5)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0.0).astype(jnp.uint8)
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def eval_outputs(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    config: ml_collections.ConfigDict | None = None,
) -> dict[str, jax.Array]:
  """Per slice: class probabilities and labels, predicted and true masks, spacing, slice index.

  With detection on, also the decoded boxes (`detection_boxes`, `_scores`,
  `_classes`, `_valid`) and the padded true boxes.
  """
  outputs = model(batch["image"])
  result = {
      "probabilities": jax.nn.sigmoid(outputs["class_logits"].astype(jnp.float32)),
      "labels": batch["labels"].astype(jnp.int32),
      "predicted_mask": predicted_mask(outputs["segmentation"]),
      "mask": batch["mask"].astype(jnp.uint8),
      "spacing": batch["spacing"].astype(jnp.float32),
      "slice_index": batch["slice_index"].astype(jnp.int32),
  }
  for flag, _ in TASK_FLAGS:
    if flag in batch:
      result[flag] = batch[flag].astype(bool)
  if setting(config, "detection"):
    from uem_ich_jax.models import detection
    from uem_ich_jax.models import uem

    decoded = detection.decode(
        outputs["detection"],
        uem.NECK_STRIDE,
        score_threshold=float(setting(config, "score_threshold")),
        max_detections=int(setting(config, "max_detections")),
    )
    result.update({f"detection_{key}": value for key, value in decoded.items()})
    result["boxes"] = batch["boxes"].astype(jnp.float32)
    result["box_classes"] = batch["box_classes"].astype(jnp.int32)
  return result


def _rows_with(outputs: Mapping[str, np.ndarray], flag: str) -> np.ndarray:
  """Return the bool rows whose availability `flag` is set (all rows when absent)."""
  count = np.asarray(outputs["labels"]).shape[0]
  if flag not in outputs:
    return np.ones((count,), bool)
  return np.asarray(outputs[flag], bool).reshape(count)


def _scan_any_from_volume(
    labels: np.ndarray, scans: list[np.ndarray], predicted_ml: list[float]
) -> dict[str, Any]:
  """Score each scan's `any` label by its predicted hemorrhage volume alone.

  A scan is positive when any of its slices is labelled `any` (column 0). The
  AUC measures how well the segmentation alone separates scans, for
  comparison with the scan aggregator. It is None when all scans share a class.
  """
  truth = np.array([int(labels[rows, 0].max()) for rows in scans])
  return {
      "auc": metrics_lib.roc_auc(truth, np.asarray(predicted_ml, np.float64)),
      "n_scans": int(truth.size),
      "n_positive": int(truth.sum()),
  }


def _box_map(outputs: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
  from uem_ich_jax.evaluate import detection as detection_metrics

  detections, truth = [], []
  for row in np.flatnonzero(rows):
    is_detection = np.asarray(outputs["detection_valid"][row], bool)
    detections.append((
        np.asarray(outputs["detection_boxes"][row])[is_detection],
        np.asarray(outputs["detection_scores"][row])[is_detection],
        np.asarray(outputs["detection_classes"][row])[is_detection],
    ))
    truth.append((np.asarray(outputs["boxes"][row]), np.asarray(outputs["box_classes"][row])))
  return detection_metrics.average_precision(detections, truth, iou_thresholds=(0.5,))


def evaluate(
    outputs: Mapping[str, np.ndarray],
    *,
    validation: Mapping[str, np.ndarray] | None,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Score collected slices as scans: 3D Dice, volume error, slice AUCs and box mAP@0.5.

  Segmentation metrics pool voxels within each scan (regrouped by
  `scan_id` when the outputs carry it, else by slice-index runs) and average
  over scans. Classification follows the classification stage: AUC alone, or
  with `validation` also F1, sensitivity and specificity at thresholds chosen
  there. Only rows whose availability flags are set count for each task.
  """
  if np.asarray(outputs["labels"]).shape[0] == 0:
    raise InputError("no valid examples to evaluate; the evaluated split is empty")
  scalars: dict[str, float] = {}
  result: dict[str, Any] = {}

  labelled = _rows_with(outputs, "has_labels")
  if labelled.any():
    class_outputs = {key: np.asarray(outputs[key])[labelled] for key in ("labels", "probabilities")}
    class_validation = None
    if validation is not None:
      validation_rows = _rows_with(validation, "has_labels")
      class_validation = {
          key: np.asarray(validation[key])[validation_rows] for key in ("labels", "probabilities")
      }
    class_scalars, result["classification"] = classification.evaluate(
        class_outputs, validation=class_validation, config=config
    )
    scalars.update(class_scalars)

  masked = _rows_with(outputs, "has_mask")
  if masked.any():
    scan_ids = outputs.get("scan_id")
    scans = segmentation_metrics.group_scans(
        np.asarray(outputs["slice_index"])[masked],
        None if scan_ids is None else np.asarray(scan_ids)[masked],
    )
    num_classes = int(config.model.get("segmentation_classes", HEAD_DEFAULTS["segmentation_classes"]))
    true_masks = np.asarray(outputs["mask"])[masked]
    if num_classes == 1:
      # A binary head predicts 0/1, so its truth is scored as foreground only.
      true_masks = (true_masks > 0).astype(np.uint8)
    seg = segmentation_metrics.scan_metrics(
        np.asarray(outputs["predicted_mask"])[masked],
        true_masks,
        np.asarray(outputs["spacing"])[masked],
        scans,
        num_classes=max(num_classes, 2),
        min_volume_ml=float(setting(config, "min_volume_ml")),
    )
    result["segmentation"] = seg
    optional = {
        "dice_3d": seg["dice_3d"]["mean"],
        "dice_pooled": seg["dice_pooled"],
        "volume_relative_error": seg["volume"]["mean_relative_error"],
    }
    for name, entry in seg["dice_3d_per_class"].items():
      optional[f"dice_3d_{name}"] = entry["mean"]
    scalars.update({key: float(value) for key, value in optional.items() if value is not None})
    scalars["volume_absolute_error_ml"] = seg["volume"]["mean_absolute_error_ml"]
    scalars["dice_3d_n_empty_both"] = float(seg["dice_3d"]["n_empty_both"])
    if labelled[masked].all():
      seg["scan_any_from_volume"] = _scan_any_from_volume(
          np.asarray(outputs["labels"])[masked], scans, seg["predicted_ml"]
      )
      if seg["scan_any_from_volume"]["auc"] is not None:
        scalars["scan_auc_any_from_volume"] = seg["scan_any_from_volume"]["auc"]

  if setting(config, "detection") and "detection_boxes" in outputs:
    boxed = _rows_with(outputs, "has_boxes")
    if boxed.any():
      result["detection"] = _box_map(outputs, boxed)
      if result["detection"]["map50"] is not None:
        scalars["map50"] = float(result["detection"]["map50"])
  result["n"] = int(np.asarray(outputs["labels"]).shape[0])
  return scalars, result


def check_source(config: ml_collections.ConfigDict, source: Any) -> None:
  """Reject a dataset whose masks have another number of classes than the segmentation head.

  Reads `num_mask_classes` (background included) from the dataset metadata:
  2 for binary blood masks, 6 for masks with the five subtype ids. Without
  that key nothing is checked. A binary head (`segmentation_classes` 1)
  accepts every mask, because it scores all blood as foreground.
  """
  info = getattr(source, "dataset_info", None)
  metadata = getattr(info, "metadata", None)
  if metadata is None:
    return
  # TFDS's LazyMetadataDict loads its file in items(), not in get().
  stored = dict(metadata.items()).get("num_mask_classes")
  classes = int(config.model.get("segmentation_classes", HEAD_DEFAULTS["segmentation_classes"]))
  if stored is None or classes == 1 or classes == int(stored):
    return
  fix = "1 for a binary head" if int(stored) == 2 else str(stored)
  raise InputError(
      f"dataset {config.data.name!r} stores masks with {stored} classes (background included),"
      f" but config.model.segmentation_classes is {classes}; set it to {fix}"
  )


class _MultitaskStage:
  name = "multitask"
  batch_keys = (
      "image", "labels", "mask", "boxes", "box_classes", "spacing", "slice_index", "valid"
  )
  # Per-task annotation flags, passed when a dataset has them.
  optional_batch_keys = tuple(flag for flag, _ in TASK_FLAGS)
  # Text ids collected beside the evaluation outputs, to group slices by scan.
  host_keys = ("scan_id",)
  # The encoder is the model root, so the export is everything outside the heads.
  train_metrics = TrainMetrics
  build_model = staticmethod(build_model)
  loss = staticmethod(loss)
  eval_outputs = staticmethod(eval_outputs)
  evaluate = staticmethod(evaluate)
  check_config = staticmethod(check_config)
  check_source = staticmethod(check_source)
  encoder_arrays = staticmethod(stages.root_encoder_arrays)

  @staticmethod
  def batch_keys_for(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Return the batch fields under `config`: boxes only with the detection head.

    Datasets without boxes (BHSD, PhysioNet) can then train segmentation and
    classification.
    """
    keys = _MultitaskStage.batch_keys
    if setting(config, "detection"):
      return keys
    return tuple(key for key in keys if key not in ("boxes", "box_classes"))


STAGE = _MultitaskStage()
