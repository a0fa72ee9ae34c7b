"""The stage interface of the trainer, the stage registry, and NNX state helpers.

A stage (classification, segmentation, pretraining, ...) supplies its model,
its loss, what evaluation collects per example, and how that becomes metrics.
The trainer supplies everything else: mesh, sharding, optimizer, input,
checkpoints, logging.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.train.mesh import path_name

# Stage name -> module defining `STAGE`.
STAGE_MODULES = {
    "aggregator": "uem_ich_jax.train.aggregate",
    "classification": "uem_ich_jax.train.classification",
    "multitask": "uem_ich_jax.train.multitask",
    "ssl_pretrain": "uem_ich_jax.train.ssl",
}


class Stage(Protocol):
  """The per-stage part of training.

  `loss` and `eval_outputs` run inside `jax.jit`; the others run on the host.

  Optional attributes the trainer reads when a stage has them:
  `batch_keys_for(config)` replaces `batch_keys` when the fields depend on the
  config; `optional_batch_keys` are passed when a batch has them;
  `host_keys` are text fields collected beside the evaluation outputs;
  `encoder_path` (the encoder's attribute) or `encoder_arrays` (for an encoder
  at the model root) make the stage export its encoder; `check_config`
  validates the config before anything compiles; `write_images` draws
  pictures during training.

  Two more hooks let a stage replace its training input, as the aggregator's
  token cache does. `train_input(setup, iterator, source)` may wrap the
  training iterator before a resume restores its position. Then
  `prepare_train_input(setup, state, iterator)` runs once the state is ready,
  before the first step. A wrapped iterator with a `batch_keys` attribute
  names the fields of its batches.
  """

  name: str
  # Batch fields the jitted steps receive; `valid` marks real examples.
  batch_keys: tuple[str, ...]
  # clu metric collection the train step fills; it must hold `loss`.
  train_metrics: type[clu_metrics.Collection]

  def build_model(self, model: ml_collections.ConfigDict, *, seed: int) -> nnx.Module:
    """Build the model with freshly drawn parameters, in evaluation mode."""

  def loss(
      self, model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Return the float32 scalar loss and the outputs `train_metrics` reads.

    In training, `batch` also contains `step`, the int32 step number.
    """

  def eval_outputs(
      self, model: nnx.Module, batch: Mapping[str, jax.Array], config: ml_collections.ConfigDict
  ) -> dict[str, jax.Array]:
    """Per-example arrays (leading axis = batch) that `evaluate` turns into metrics."""

  def evaluate(
      self,
      outputs: Mapping[str, np.ndarray],
      *,
      validation: Mapping[str, np.ndarray] | None,
      config: ml_collections.ConfigDict,
  ) -> tuple[dict[str, float], dict[str, Any]]:
    """Compute the metrics of one split's collected outputs (valid rows only).

    `validation`, when given, contains the outputs of a distinct validation split
    for choosing thresholds. Returns scalars for TensorBoard and the full
    JSON-ready result.
    """


def batch_keys(stage: Stage, config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Return the batch fields of `stage` under `config` (`stage.batch_keys_for(config)` where defined)."""
  keys_for = getattr(stage, "batch_keys_for", None)
  return tuple(keys_for(config)) if keys_for is not None else tuple(stage.batch_keys)


def root_encoder_arrays(tree: Mapping[str, Any], *, head_prefix: str) -> dict[str, Any]:
  """Return the top-level entries of a parameter (or statistics) tree outside `head_prefix`.

  For stages whose encoder sits at the model root (as in ConvNeXtV2): the
  export is the model minus its heads, in the layout `copy_encoder` reads.
  """
  return {name: value for name, value in tree.items() if not str(name).startswith(head_prefix)}


def exports_encoder(stage: Stage) -> bool:
  """Return whether `stage` names its encoder: `encoder_path`, or `encoder_arrays` for a root encoder."""
  return (
      getattr(stage, "encoder_path", None) is not None
      or getattr(stage, "encoder_arrays", None) is not None
  )


def encoder_config(
    model: ml_collections.ConfigDict, *, head: str | None = None, num_classes: int | None = None
) -> Any:
  """Return the `ConvNeXtV2Config` that `config.model` describes, with the given head.

  Raises:
    InputError: when `config.model` does not describe a valid ConvNeXt-V2.
  """
  from uem_ich_jax.models import convnext_v2

  options = dict(
      variant=model.variant,
      head=head,
      drop_path_rate=model.drop_path_rate,
      coordinate_attention_stages=tuple(model.coordinate_attention_stages),
      coordinate_attention_placement=model.get("coordinate_attention_placement", "outputs"),
      dtype=jax.numpy.dtype(model.dtype),
      depthwise=model.get("depthwise", "auto"),
      remat=model.get("remat", "none"),
  )
  if num_classes is not None:
    options["num_classes"] = num_classes
  try:
    return convnext_v2.ConvNeXtV2Config(**options)
  except (ValueError, TypeError) as error:
    raise InputError(f"config.model does not describe a ConvNeXt-V2: {error}") from error


def get_stage(name: str) -> Stage:
  if name not in STAGE_MODULES:
    raise InputError(f"config.stage {name!r} is not a stage; the stages are {sorted(STAGE_MODULES)}")
  return importlib.import_module(STAGE_MODULES[name]).STAGE


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict, dict]:
  """Split into graph, parameters, RNG state and the rest (BatchNorm statistics), as plain dicts."""
  graphdef, params, rngs, extra = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rngs), nnx.to_pure_dict(extra)


def flatten(tree: Any) -> dict[str, Any]:
  """Map "a/b/c" paths to leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_name(path): leaf for path, leaf in leaves}


def copy_matching(
    target: Any, source: Any, *, prefixes: tuple[str, ...] = ("",), source_name: str
) -> tuple[Any, list[str]]:
  """Replace the leaves of `target` under `prefixes` with those of `source` at the same path.

  Every target leaf under a prefix must exist in `source` with the same shape.
  Otherwise an InputError names the first mismatches, so a wrong checkpoint
  never gives a silent random start. Returns the new tree and the
  copied paths.
  """
  source_flat = flatten(source)
  copied, missing, mismatched = [], [], []

  def one(path, leaf):
    name = path_name(path)
    if not any(name == prefix or name.startswith(prefix) for prefix in prefixes):
      return leaf
    if name not in source_flat:
      missing.append(name)
      return leaf
    value = source_flat[name]
    if tuple(np.shape(value)) != tuple(leaf.shape):
      mismatched.append(f"{name} {tuple(np.shape(value))} != {tuple(leaf.shape)}")
      return leaf
    copied.append(name)
    return np.asarray(value, dtype=leaf.dtype)

  result = jax.tree_util.tree_map_with_path(one, target)
  if missing or mismatched:
    raise InputError(
        f"{source_name} does not fit this model: {len(missing)} missing and"
        f" {len(mismatched)} mismatched arrays; first missing {missing[:3]}, first mismatched"
        f" {mismatched[:3]}"
    )
  if not copied:
    raise InputError(f"{source_name}: no parameter matched the prefixes {list(prefixes)}")
  return result, copied


def copy_encoder(
    target: Any, source: Any, *, head_prefix: str, source_name: str
) -> tuple[Any, list[str]]:
  """Copy every array of an exported encoder into `target`, where the same path has it.

  Strict both ways. An exported array that the model lacks, or has in another
  shape, is an error: the export belongs to another architecture. A model
  array outside the head (`head_prefix`) that the export does not hold is an
  error too, because it would start from random weights. Returns the new tree and
  the copied paths.
  """
  source_flat = flatten(source)
  target_flat = flatten(target)
  absent = sorted(set(source_flat) - set(target_flat))
  uncovered = sorted(
      name for name in set(target_flat) - set(source_flat)
      if not (head_prefix and name.startswith(head_prefix))
  )
  if absent or uncovered:
    raise InputError(
        f"{source_name} does not fit this model: {len(absent)} exported arrays are not in the"
        f" model (first {absent[:3]}) and {len(uncovered)} model arrays outside the head"
        f" {head_prefix!r} are not in the export (first {uncovered[:3]}); is it the same"
        " encoder variant and coordinate attention placement?"
    )
  return copy_matching(
      target, source, prefixes=tuple(sorted(source_flat)) or ("",), source_name=source_name
  )


def model_from_arrays(
    build: Callable[[], nnx.Module],
    params: Any,
    extra: Any | None,
    *,
    seed: int,
    source: str,
) -> nnx.Module:
  """Build the model of `build` around `params` (and BatchNorm `extra`), in evaluation mode.

  The model is built abstractly (`nnx.eval_shape`), so no parameter is drawn
  and no initialiser is compiled; every parameter must come from `params`.
  """
  abstract = nnx.eval_shape(build)
  abstract.eval()
  graphdef, abstract_params, abstract_rngs, abstract_extra = split_model(abstract)
  params, _ = copy_matching(abstract_params, params, source_name=source)
  if jax.tree.leaves(abstract_extra):
    extra, _ = copy_matching(abstract_extra, extra or {}, source_name=source)
  else:
    extra = abstract_extra
  params, extra = jax.tree.map(jax.numpy.asarray, (params, extra))
  key = jax.random.key(seed)
  rngs = jax.tree.map(
      lambda leaf: key if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
      else np.zeros(leaf.shape, leaf.dtype),
      abstract_rngs,
  )
  return nnx.merge(graphdef, params, rngs, extra)
