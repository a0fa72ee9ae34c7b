"""The one training loop for every stage, and evaluation of a saved run.

`train(config, workdir)` runs a stage (see `stages.py`) on the config's mesh and
resumes from `workdir` when it contains checkpoints. `evaluate(workdir)` scores
a saved checkpoint on the run's test fold with thresholds from its validation
fold. The sections follow big_vision's train.py: setup, mesh, input, model and
optimizer, sharding, steps, state, evaluation, loop.

A resumed run continues exactly as an uninterrupted one. The checkpoint
contains the step, parameters, optimizer state and every process's grain
iterator position. The per-step randomness (dropout, drop path) is derived
from (seed, step) instead of being carried as state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.experimental import multihost_utils

from uem_ich_jax import compile_options
from uem_ich_jax.data import augment as augment_lib
from uem_ich_jax.data import pipeline
from uem_ich_jax.data.global_batch import to_global_batch
from uem_ich_jax.errors import InputError
from uem_ich_jax.errors import TrainingPreempted
from uem_ich_jax.train import checkpoint as checkpoint_lib
from uem_ich_jax.train import mesh as mesh_lib
from uem_ich_jax.train import optim
from uem_ich_jax.train import stages
from uem_ich_jax.train import writer as writer_lib

logger = logging.getLogger(__name__)


class ConfigError(InputError):
  """A config value the trainer cannot use; the message names the field."""


class NonFiniteLossError(RuntimeError):
  """Training stopped because the loss became NaN or infinite."""


class PreemptionWatch:
  """Turns a preemption notice (SIGTERM) into a checkpoint and a clean stop.

  With one process, a SIGTERM handler sets a flag, and the loop saves and
  stops after the step in progress. With several, JAX's preemption service
  (on by default with `jax.distributed`) receives the signal on any host and
  names a step that every process reaches, so all of them save the same step.
  Use as a context manager around the loop and ask `reached(step)` after
  every step, on every process.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    self._distributed = jax.process_count() > 1

  def __enter__(self) -> "PreemptionWatch":
    # Signal handlers can only be set from the main thread. Elsewhere (a
    # notebook worker thread) SIGTERM keeps its usual effect.
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.received = True

  def reached(self, step: int) -> bool:
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received


def non_finite_loss_message(
    loss: float, first_step: int, last_step: int, directory: Any, latest_step: int | None
) -> str:
  """Return the message of `NonFiniteLossError`, naming the checkpoint to resume from if any."""
  if latest_step is None:
    saved = f"No checkpoint was saved in {directory} yet, so a rerun starts from step 0."
  else:
    saved = f"The last checkpoint in {directory} is step {latest_step}."
  return (
      f"the training loss became {loss} between steps {first_step} and {last_step}; stopped"
      f" without saving this state. {saved} Lower the learning rate, check the input, or turn on"
      " gradient clipping (config.optim.clip_norm)."
  )


OptimizerMetrics = clu_metrics.Collection.create(
    grad_norm=clu_metrics.Average.from_output("grad_norm")
)


@dataclasses.dataclass(frozen=True)
class Folds:
  """Patient-level folds: train on `train`, choose thresholds and checkpoints on
  `validation`, report `test`."""

  train: tuple[int, ...]
  validation: tuple[int, ...]
  test: tuple[int, ...]


def split_folds(data: ml_collections.ConfigDict) -> Folds:
  """Test = `test_fold`, validation = `validation_fold` (-1: the next fold), train = the rest."""
  k = data.num_folds
  if k < 3:
    raise ConfigError(f"config.data.num_folds must be at least 3 (train, validation, test), got {k}")
  test = data.test_fold
  validation = (test + 1) % k if data.validation_fold < 0 else data.validation_fold
  for name, fold in (("test_fold", test), ("validation_fold", validation)):
    if not 0 <= fold < k:
      raise ConfigError(f"config.data.{name} = {fold} is outside 0..{k - 1}")
  if validation == test:
    raise ConfigError(
        f"config.data.validation_fold equals test_fold ({test}); thresholds and checkpoints"
        " must be chosen on a split other than the one reported"
    )
  train = tuple(fold for fold in range(k) if fold not in (test, validation))
  return Folds(train=train, validation=(validation,), test=(test,))


def _check_config(config: ml_collections.ConfigDict, device_count: int) -> None:
  processes = jax.process_count()
  for field in ("batch_size", "eval_batch_size"):
    size = config.data[field]
    if size < 1 or size % device_count or size % processes:
      raise ConfigError(
          f"config.data.{field} = {size} must be a positive multiple of the device count"
          f" ({device_count}) and of the process count ({processes})"
      )
  for field in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
    if config[field] < 1:
      raise ConfigError(f"config.{field} must be at least 1, got {config[field]}")
  if config.best_metric and config.checkpoint_every % config.eval_every:
    logger.warning(
        "config.checkpoint_every (%d) is not a multiple of config.eval_every (%d): checkpoints"
        " saved between evaluations carry no %s and never count as the best",
        config.checkpoint_every,
        config.eval_every,
        config.best_metric,
    )
  if config.optim.accumulate_steps < 1 or config.num_steps % config.optim.accumulate_steps:
    raise ConfigError(
        f"config.num_steps ({config.num_steps}) must be a multiple of"
        f" config.optim.accumulate_steps ({config.optim.accumulate_steps})"
    )


@dataclasses.dataclass
class Setup:
  """Everything `train` and `evaluate` share: mesh, stage, optimizer, state layout, steps."""

  config: ml_collections.ConfigDict
  stage: Any
  mesh: jax.sharding.Mesh
  data_sharding: jax.sharding.NamedSharding
  folds: Folds
  tx: optax.GradientTransformation
  schedules: dict[str, optax.Schedule]
  init_state: Callable[[], dict[str, Any]]
  abstract_state: Any  # ShapeDtypeStructs that carry their shardings.
  state_shardings: Any
  train_step: Callable
  eval_step: Callable
  eval_model: Callable[[Any], nnx.Module]  # state -> the model in evaluation mode


def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def build(
    config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None
) -> Setup:
  """Build the mesh, model and optimizer layout, shardings and jitted steps of `config`.

  `devices` defaults to every device of every process.
  """
  # ----------------------------------------------------------------- Mesh ---
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  logger.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())
  _check_config(config, mesh.size)
  data_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  folds = split_folds(config.data)
  stage = stages.get_stage(config.stage)
  if hasattr(stage, "check_config"):
    stage.check_config(config)

  # -------------------------------------------------- Model and optimizer ---
  # Nothing is allocated here: the model exists only as shapes until the
  # initialisation below runs under jit straight onto the mesh.
  abstract_model = nnx.eval_shape(lambda: stage.build_model(config.model, seed=config.seed))
  abstract_model.train()
  train_graph, abstract_params, abstract_rngs, _ = stages.split_model(abstract_model)
  abstract_model.eval()
  eval_graph = nnx.graphdef(abstract_model)
  num_updates = config.num_steps // config.optim.accumulate_steps
  tx, schedules = optim.create_optimizer(config.optim, abstract_params, total_steps=num_updates)

  def init_state() -> dict[str, Any]:
    model = stage.build_model(config.model, seed=config.seed)
    _, params, _, extra = stages.split_model(model)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "extra": extra,
    }

  # ------------------------------------------------------------- Sharding ---
  state_shapes = jax.eval_shape(init_state)
  state_shardings = mesh_lib.tree_shardings(
      state_shapes, mesh, min_shard_size=config.min_shard_size
  )
  abstract_state = jax.tree.map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      state_shapes,
      state_shardings,
  )
  share = mesh_lib.replicated_share(state_shapes["params"], state_shardings["params"])
  param_count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state_shapes["params"]))
  logger.info(
      "%d parameters; %.1f%% of parameter bytes replicated on every device", param_count, 100 * share
  )
  mesh_lib.check_replicated_share(
      share, mesh.shape["fsdp"], config.get("max_replicated_share", 1.0)
  )

  # ---------------------------------------------------------------- Steps ---
  base_key = jax.random.key(config.seed)

  def step_rngs(step: jax.Array) -> Any:
    # Dropout and drop path keys from (seed, step): nothing random to checkpoint.
    key = jax.random.fold_in(base_key, step)
    leaves, treedef = jax.tree.flatten(abstract_rngs)
    fresh = [
        jax.random.fold_in(key, index) if _is_key(leaf) else jnp.zeros(leaf.shape, leaf.dtype)
        for index, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, fresh)

  def train_step(state, metrics, batch):
    """Run one optimizer step (or one accumulation micro-step).

    `state` and `metrics` are donated: their buffers are reused for the
    outputs, so the caller must use only the returned ones.
    """

    def loss_fn(params):
      model = nnx.merge(train_graph, params, step_rngs(state["step"]), state["extra"])
      # The loss also receives the step, for schedules that change over the run.
      loss, outputs = stage.loss(model, dict(batch, step=state["step"]), config)
      _, _, _, extra = stages.split_model(model)
      return loss, (outputs, extra)

    (_, (outputs, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "extra": extra,
    }
    stage_metrics, optimizer_metrics = metrics
    new_metrics = (
        stage_metrics.merge(stage.train_metrics.single_from_model_output(**outputs)),
        optimizer_metrics.merge(
            OptimizerMetrics.single_from_model_output(grad_norm=optax.tree.norm(grads))
        ),
    )
    return new_state, new_metrics

  def eval_model(state):
    return nnx.merge(eval_graph, state["params"], step_rngs(state["step"]), state["extra"])

  def eval_step(state, batch):
    model = eval_model(state)
    outputs = stage.eval_outputs(model, batch, config)
    outputs["valid"] = batch["valid"]
    return outputs

  jitted_train = jax.jit(
      train_step,
      in_shardings=(state_shardings, replicated, data_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0, 1) if config.get("donate", True) else (),
  )
  # Outputs are replicated so that every process can read every example.
  jitted_eval = jax.jit(
      eval_step,
      in_shardings=(state_shardings, data_sharding),
      out_shardings=replicated,
      compiler_options=compile_options.forward_options(mesh.devices.flat[0].platform),
  )
  return Setup(
      config=config,
      stage=stage,
      mesh=mesh,
      data_sharding=data_sharding,
      folds=folds,
      tx=tx,
      schedules=schedules,
      init_state=init_state,
      abstract_state=abstract_state,
      state_shardings=state_shardings,
      train_step=jitted_train,
      eval_step=jitted_eval,
      eval_model=eval_model,
  )


def empty_metrics(setup: Setup) -> tuple[Any, Any]:
  metrics = (setup.stage.train_metrics.empty(), OptimizerMetrics.empty())
  return jax.device_put(metrics, mesh_lib.replicated(setup.mesh))


def model_batch(
    setup: Setup, batch: Mapping[str, Any], keys: tuple[str, ...] | None = None
) -> dict[str, jax.Array]:
  """Convert the stage's fields of a process-local batch to global arrays on the mesh.

  `keys` replaces the stage's batch fields, for a training input that yields
  other fields (such as cached tokens instead of images).
  """
  keys = stages.batch_keys(setup.stage, setup.config) if keys is None else tuple(keys)
  missing = [key for key in keys if key not in batch]
  if missing:
    raise InputError(f"batches of {setup.config.data.name} lack the fields {missing}")
  # Fields a stage reads when a dataset has them (such as per-task
  # annotation flags); the stage supplies defaults otherwise.
  keys += tuple(
      key for key in getattr(setup.stage, "optional_batch_keys", ()) if key in batch
  )
  return to_global_batch({key: batch[key] for key in keys}, setup.data_sharding)


def compile_train_step(setup: Setup, state: Any, metrics: Any, batch: Mapping[str, Any]):
  """Compile the train step before step 0 and log the memory XLA reports for it."""
  compiled = setup.train_step.lower(state, metrics, batch).compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    logger.info(
        "train step compiled: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB per"
        " device",
        memory.argument_size_in_bytes / 2**20,
        memory.output_size_in_bytes / 2**20,
        memory.temp_size_in_bytes / 2**20,
    )
  else:
    logger.info("train step compiled (no memory analysis on %s)", jax.default_backend())
  return compiled


# ------------------------------------------------------------------ Input ---


def dataset_source(config: ml_collections.ConfigDict):
  """Open `config.data.name` and check that it stores the fields and layout the stage reads.

  `train` runs the check before it builds the model, so a dataset without,
  for example, slice labels or masks fails at once with the missing feature named.
  """
  try:
    source = pipeline.load_source(
        config.data.name, split=config.data.split, data_dir=config.data.data_dir or None
    )
  except pipeline.DataPipelineError:
    raise  # Its message already names the dataset and what to do.
  except Exception as error:  # TFDS raises many types for a missing or unbuilt dataset.
    raise InputError(
        f"cannot open dataset {config.data.name!r} in {config.data.data_dir or 'the TFDS default'}"
        f" ({type(error).__name__}: {error}); build it with `uem-ich build-dataset`"
    ) from error
  stage = stages.get_stage(config.stage)
  keys = stages.batch_keys(stage, config)
  # Only scan stages read `slice_mask`, which the pipeline adds to scan examples.
  pipeline.check_fields(source, keys, scans="slice_mask" in keys, name=config.data.name)
  check_source = getattr(stage, "check_source", None)
  if check_source is not None:
    check_source(config, source)
  return source


def train_iterator(config: ml_collections.ConfigDict, source: Any, folds: Folds):
  augment = None
  if config.data.augment:
    augment = augment_lib.AugmentConfig(
        boxes_from_mask=bool(config.data.get("boxes_from_mask", False))
    )
  dataset = pipeline.train_dataset(
      source,
      folds=folds.train,
      batch_size=config.data.batch_size // jax.process_count(),
      seed=config.seed,
      augment=augment,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      worker_count=config.data.worker_count,
      patient_fraction=config.data.get("patient_fraction", 1.0),
      patient_seed=config.data.get("patient_seed", 0),
      slice_buckets=config.data.get("slice_buckets"),
  )
  return iter(dataset)


def picture_images(config: ml_collections.ConfigDict, source: Any, folds: Folds) -> np.ndarray:
  """Return the first validation images, the same on every process, for a stage's pictures."""
  count = config.get("image_count", 8)
  dataset = pipeline.eval_dataset(
      source,
      folds=folds.validation,
      batch_size=count,
      shard_index=0,
      shard_count=1,
      slice_buckets=config.data.get("slice_buckets"),
  )
  batch = next(iter(dataset))
  return np.asarray(batch["image"])[np.asarray(batch["valid"], bool)]


def write_pictures(setup: Setup, state: Any, images: np.ndarray, workdir: pathlib.Path) -> None:
  """Let a stage that draws pictures (`stage.write_images`) draw them for this state."""
  step = int(state["step"])
  path = workdir / "images" / f"step{step:07d}.png"
  model = setup.eval_model(state)
  replicated = mesh_lib.replicated(setup.mesh)
  images = jax.make_array_from_process_local_data(replicated, images)
  setup.stage.write_images(model, images, path, setup.config)
  logger.info("wrote %s", path)


# Maximum length in bytes of a scan or patient id gathered across processes.
ID_BYTES = 256


def _gather_ids(ids: Any) -> np.ndarray:
  """Return the text ids of a process-local batch in global batch order, as bytes."""
  local = np.asarray([_as_bytes(value) for value in np.asarray(ids).reshape(-1)], dtype=object)
  if jax.process_count() == 1:
    return local.astype(bytes)
  # Fixed-width uint8 rows, gathered process-major as the global batch is.
  width = ID_BYTES
  rows = np.zeros((len(local), width), np.uint8)
  for index, value in enumerate(local):
    if len(value) > width:
      raise InputError(f"id {value[:40]!r}... is longer than {width} bytes")
    rows[index, : len(value)] = np.frombuffer(value, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
  return np.asarray([row.tobytes().rstrip(b"\0") for row in gathered]).astype(bytes)


def _as_bytes(value: Any) -> bytes:
  return value if isinstance(value, bytes) else str(value).encode()


def collect(setup: Setup, state: Any, source: Any, folds: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Run the eval step over `folds` and return the outputs of the real (valid) examples."""
  config = setup.config
  dataset = pipeline.eval_dataset(
      source,
      folds=folds,
      batch_size=config.data.eval_batch_size // jax.process_count(),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      worker_count=0,
      slice_buckets=config.data.get("slice_buckets"),
  )
  parts: dict[str, list[np.ndarray]] = {}
  for batch in dataset:
    outputs = setup.eval_step(state, model_batch(setup, batch))
    for key, value in outputs.items():
      parts.setdefault(key, []).append(np.asarray(value))
    # Ids stay on the host beside the outputs, so stages can group slices
    # into scans by id rather than by position.
    for key in getattr(setup.stage, "host_keys", ()):
      if key in batch:
        parts.setdefault(key, []).append(_gather_ids(batch[key]))
  joined = {key: np.concatenate(values) for key, values in parts.items()}
  valid = joined.pop("valid").astype(bool)
  return {key: value[valid] for key, value in joined.items()}


# ------------------------------------------------------------ Checkpoint ---


RANDOM_INIT = "random"


def _encoder_export_hint(source_dir: pathlib.Path) -> str | None:
  """Return a hint to use the encoder export of `source_dir`, or None if its stage exports none."""
  try:
    stage = stages.get_stage(checkpoint_lib.load_config(source_dir).stage)
  except (InputError, AttributeError):
    return None
  if not stages.exports_encoder(stage):
    return None
  export = source_dir / checkpoint_lib.ENCODER_EXPORT_DIR
  return (
      f"{source_dir} is the work directory of a {stage.name!r} run, whose checkpoints hold its"
      f" whole model; to start from its encoder, use WORKDIR/{checkpoint_lib.ENCODER_EXPORT_DIR}"
      f" ({export}) as config.init_from"
  )


def _initialise(setup: Setup) -> Any:
  """Fresh state, built under jit straight into its shardings, then `init_from` unless random.

  `config.init_from` names where the weights come from. It is "random", a
  run's work directory, or an encoder export. From a work directory, the
  arrays under `init_from_prefixes` of checkpoint `init_from_step` are copied.
  An encoder export is a directory with encoder.json, such as
  WORKDIR/export/encoder of a pretraining run, and must cover the whole model
  except the head.
  """
  state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
  config = setup.config
  init_from = str(config.init_from)
  if init_from == RANDOM_INIT:
    logger.info("config.init_from is %r: starting from freshly drawn weights", RANDOM_INIT)
    return state
  if not init_from:
    raise ConfigError(
        f"config.init_from is empty; set it to {RANDOM_INIT!r} to start from random weights, or to"
        " a run's work directory or an encoder export (WORKDIR/export/encoder)"
    )
  source_dir = pathlib.Path(init_from).absolute()
  if not source_dir.exists():
    raise checkpoint_lib.CheckpointError(f"config.init_from {init_from} does not exist")
  if not source_dir.is_dir():
    raise checkpoint_lib.CheckpointError(
        f"config.init_from {init_from} is a file; expected a run's work directory or an encoder"
        " export folder (WORKDIR/export/encoder)"
    )

  if checkpoint_lib.is_encoder_export(source_dir) or (source_dir / "arrays").is_dir():
    manifest, arrays = checkpoint_lib.read_encoder_export(source_dir)
    name = f"encoder export {source_dir} (step {manifest.get('step')})"
    exported = manifest.get("model", {})
    for field in ("name", "variant", "coordinate_attention_stages"):
      mine, theirs = config.model.get(field), exported.get(field)
      if theirs is not None and mine is not None and tuple(np.atleast_1d(mine)) != tuple(
          np.atleast_1d(theirs)
      ):
        raise ConfigError(
            f"{name} has model.{field} = {theirs!r} but this config has {mine!r}; set"
            f" config.model.{field} to match the pretrained encoder"
        )
    params, copied = stages.copy_encoder(
        state["params"], arrays["params"], head_prefix=config.optim.head_prefix, source_name=name
    )
    extra = state["extra"]
    if jax.tree.leaves(extra) or jax.tree.leaves(arrays.get("extra", {})):
      extra, _ = stages.copy_encoder(
          extra, arrays.get("extra", {}), head_prefix=config.optim.head_prefix, source_name=name
      )
  else:
    manager = checkpoint_lib.run_manager(source_dir)
    step = checkpoint_lib.resolve_step(
        manager, None if config.init_from_step < 0 else config.init_from_step, workdir=source_dir
    )
    arrays = manager.restore_arrays(step)
    manager.close()
    name = f"init_from {source_dir} step {step}"
    try:
      params, copied = stages.copy_matching(
          state["params"],
          arrays["params"],
          prefixes=tuple(config.init_from_prefixes),
          source_name=name,
      )
    except InputError as error:
      hint = _encoder_export_hint(source_dir)
      if hint is None:
        raise
      raise InputError(f"{error}. {hint}") from error
    extra = state["extra"]

  # Copied arrays go straight to their shards, so no device stores a whole
  # array first.
  def place(tree, shardings):
    return jax.tree.map(
        lambda value, sharding: (
            jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
            if isinstance(value, np.ndarray)
            else value
        ),
        tree,
        shardings,
    )

  params = place(params, setup.state_shardings["params"])
  extra = place(extra, setup.state_shardings["extra"])
  logger.info("%s: copied %d parameter arrays", name, len(copied))
  return dict(state, params=params, extra=extra)


def _export(
    config: ml_collections.ConfigDict,
    state: Any,
    workdir: pathlib.Path,
    output: pathlib.Path | None = None,
) -> pathlib.Path | None:
  """Export the encoder of a stage that has one (`stage.encoder_path` or `stage.encoder_arrays`).

  The export goes to `output`, by default WORKDIR/export/encoder.
  """
  stage = stages.get_stage(config.stage)
  if not stages.exports_encoder(stage):
    return None
  manifest = {
      "stage": config.stage,
      "step": int(state["step"]),
      "workdir": str(pathlib.Path(workdir).absolute()),
      "model": config.model.to_dict(),
  }
  root_arrays = getattr(stage, "encoder_arrays", None)
  if root_arrays is not None:
    # An encoder at the model root: everything outside the head.
    head_prefix = config.optim.head_prefix
    arrays = {
        "params": root_arrays(state["params"], head_prefix=head_prefix),
        "extra": root_arrays(state["extra"], head_prefix=head_prefix),
    }
  else:
    path = stage.encoder_path
    arrays = {"params": state["params"][path], "extra": state["extra"].get(path, {})}
  output = output or pathlib.Path(workdir) / checkpoint_lib.ENCODER_EXPORT_DIR
  return checkpoint_lib.export_encoder(output, arrays, manifest)


def export_encoder(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    output: str | os.PathLike | None = None,
) -> pathlib.Path:
  """Export the encoder of checkpoint `step` (default: the best) of a pretraining run.

  Training exports its last step to WORKDIR/export/encoder by itself; this
  exports any saved step, to `output` (default: that same folder, replaced).
  """
  config = checkpoint_lib.load_config(workdir)
  if not stages.exports_encoder(stages.get_stage(config.stage)):
    pretraining = sorted(
        name for name in stages.STAGE_MODULES
        if stages.exports_encoder(stages.get_stage(name))
    )
    raise InputError(
        f"{workdir} is a {config.stage!r} run; only runs of the stages {pretraining} export an"
        " encoder"
    )
  manager = checkpoint_lib.run_manager(workdir, config)
  try:
    step = checkpoint_lib.resolve_step(manager, step, workdir=workdir)
    arrays = manager.restore_arrays(step)
  finally:
    manager.close()
  return _export(config, arrays, pathlib.Path(workdir), None if output is None else pathlib.Path(output))


# ------------------------------------------------------------------ Loop ---


def _warn_on_changed_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  if not (workdir / checkpoint_lib.CONFIG_FILE).is_file():
    return
  saved = checkpoint_lib.load_config(workdir)
  current = checkpoint_lib.load_config_text(config.to_json_best_effort())
  changed = [
      key
      for key in sorted(set(saved.keys()) | set(current.keys()))
      if saved.get(key) != current.get(key)
  ]
  if changed:
    logger.warning(
        "the config differs from the one saved in %s in %s; resuming with the new values",
        workdir,
        ", ".join(changed),
    )


def _host_scalars(metrics: Any) -> dict[str, float]:
  values = {}
  for collection in metrics:
    values.update({key: float(value) for key, value in collection.compute().items()})
  return values


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    stop_after: int | None = None,
) -> dict[str, Any]:
  """Train `config.stage` in `workdir`, resuming from its latest checkpoint if there is one.

  `stop_after` ends this call after that step (saving a checkpoint there), as
  a preempted job would; a later call resumes to `config.num_steps`.
  Returns the last training and validation scalars and the final step.
  Raises NonFiniteLossError (and saves nothing more) when the loss stops being
  finite, and TrainingPreempted after saving the step in progress when a
  SIGTERM arrives (see `PreemptionWatch`).
  """
  # ----------------------------------------------------------------- Setup ---
  mesh_lib.maybe_initialize_distributed(config.distributed)
  workdir = pathlib.Path(workdir)
  source = dataset_source(config)
  setup = build(config)
  _warn_on_changed_config(workdir, config)
  checkpoint_lib.save_config(workdir, config)
  iterator = train_iterator(config, source, setup.folds)
  stage_input = getattr(setup.stage, "train_input", None)
  if stage_input is not None:
    iterator = stage_input(setup, iterator, source)
  manager = checkpoint_lib.CheckpointManager(
      workdir,
      keep=config.keep_checkpoints,
      best_metric=config.best_metric,
      best_mode=config.best_mode,
  )
  writer = writer_lib.MetricWriter(workdir)
  summary: dict[str, Any] = {"train": {}, "validation": {}}
  preemption = PreemptionWatch().__enter__()
  try:
    # ------------------------------------------------------ State / resume ---
    latest = manager.latest_step()
    if latest is not None:
      state = manager.restore(latest, setup.abstract_state, iterator)
      logger.info("resumed from %s at step %d", manager.directory, latest)
    else:
      state = _initialise(setup)
    start = int(state["step"])
    last = config.num_steps if stop_after is None else min(stop_after, config.num_steps)
    prepare_input = getattr(setup.stage, "prepare_train_input", None)
    if prepare_input is not None and start < last:
      prepare_input(setup, state, iterator)
    if start >= config.num_steps:
      logger.info(
          "%s already contains step %d of %d; nothing to train", workdir, start, config.num_steps
      )

    metrics = empty_metrics(setup)
    image_every = config.get("image_every", 0) if hasattr(setup.stage, "write_images") else 0
    images = picture_images(config, source, setup.folds) if image_every else None
    # One compiled step per batch shape: scan batches padded to slice buckets
    # come in a few shapes.
    compiled_steps = {}
    progress = writer_lib.Progress(config.num_steps, start)
    last_checked = start
    for step in range(start, last):
      batch = model_batch(setup, next(iterator), getattr(iterator, "batch_keys", None))
      shapes = tuple(sorted((key, np.shape(value)) for key, value in batch.items()))
      if shapes not in compiled_steps:
        compiled_steps[shapes] = compile_train_step(setup, state, metrics, batch)
      state, metrics = compiled_steps[shapes](state, metrics, batch)
      done = step + 1
      at_end = done == config.num_steps
      preempted = preemption.reached(done) and not at_end
      do_eval = done % config.eval_every == 0 or at_end
      do_save = done % config.checkpoint_every == 0 or at_end or done == last or preempted

      # Logging also checks the loss, so it runs before every save.
      if done % config.log_every == 0 or do_eval or do_save:
        scalars = _host_scalars(metrics)
        if not np.isfinite(scalars["loss"]):
          raise NonFiniteLossError(
              non_finite_loss_message(
                  scalars["loss"], last_checked + 1, done, manager.directory, manager.latest_step()
              )
          )
        update = done // config.optim.accumulate_steps
        for name, schedule in setup.schedules.items():
          scalars[f"lr_{name}"] = float(schedule(update))
        speed = progress.update(done)
        scalars.update(speed)
        writer.write_scalars(done, scalars, prefix="train/")
        logger.info(
            "step %d/%d, %.2f steps/s, ETA %s",
            done,
            config.num_steps,
            speed["steps_per_second"],
            writer_lib.format_eta(speed["eta_seconds"]),
        )
        summary["train"] = scalars
        metrics = empty_metrics(setup)
        last_checked = done

      # ------------------------------------------------------------ Evals ---
      validation = None
      if do_eval:
        outputs = collect(setup, state, source, setup.folds.validation)
        validation, _ = setup.stage.evaluate(outputs, validation=None, config=config)
        writer.write_scalars(done, validation, prefix="val/")
        summary["validation"] = validation
      if image_every and (done % image_every == 0 or at_end):
        write_pictures(setup, state, images, workdir)
      if do_save:
        saved_metrics = None
        if validation is not None:
          saved_metrics = {f"val_{key}": value for key, value in validation.items()}
        manager.save(done, state, iterator, metrics=saved_metrics)
      if do_eval or do_save:
        # Evaluation and checkpoint time stay out of the measured steps/s.
        progress.restart(done)
      if preempted:
        raise TrainingPreempted(done, workdir)
    if int(state["step"]) >= config.num_steps:
      exported = _export(config, state, workdir)
      if exported is not None:
        summary["encoder_export"] = str(exported)
    summary["step"] = int(state["step"])
    return summary
  finally:
    preemption.__exit__(None, None, None)
    # Pending asynchronous saves finish before the process may exit.
    manager.close()
    writer.close()
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def evaluate(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    output: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """Score a saved run on its test fold, with thresholds chosen on its validation fold.

  Uses the checkpoint of `step` (the best one when None) and the folds of the
  run's config, because any other test fold was part of training. Writes
  the result to `output` (default `workdir/eval_step<step>_fold<test>.json`)
  and returns it. Beside it, `predictions_step<step>_fold<test>.npz` stores
  the test fold's per-example outputs of the stage (for classification
  `probabilities` and `labels`), written before the JSON, so a result JSON
  always has its predictions.
  """
  if output is not None:
    output = pathlib.Path(output)
    if output.is_dir():
      raise InputError(
          f"output {output} is a folder; give a file name such as {output / 'eval.json'}"
      )
    # Checked before anything is computed, so a bad path costs nothing.
    output.parent.mkdir(parents=True, exist_ok=True)
  config = checkpoint_lib.load_config(workdir)
  mesh_lib.maybe_initialize_distributed(config.distributed)
  try:
    mesh_lib.mesh_shape(config.mesh, jax.device_count())
  except mesh_lib.MeshError as error:
    # Restoring works on any mesh, so evaluation need not match the training hardware.
    logger.warning("%s; evaluating data-parallel over all %d devices", error, jax.device_count())
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  setup = build(config)
  manager = checkpoint_lib.CheckpointManager(
      workdir, best_metric=config.best_metric, best_mode=config.best_mode, read_only=True
  )
  try:
    step = checkpoint_lib.resolve_step(manager, step, workdir=workdir)
    state = manager.restore(step, setup.abstract_state)
  finally:
    manager.close()
  source = dataset_source(config)
  validation = collect(setup, state, source, setup.folds.validation)
  test = collect(setup, state, source, setup.folds.test)
  scalars, result = setup.stage.evaluate(test, validation=validation, config=config)
  result = {
      "workdir": str(workdir),
      "step": step,
      "folds": dataclasses.asdict(setup.folds),
      # The stage's main figures, which `uem-ich evaluate` prints.
      "headline": scalars,
      **result,
  }
  path = pathlib.Path(
      output or pathlib.Path(workdir) / f"eval_step{step}_fold{setup.folds.test[0]}.json"
  )
  if jax.process_index() == 0:
    predictions = path.with_name(f"predictions_step{step}_fold{setup.folds.test[0]}.npz")
    # Arrays with more than two axes (masks, feature maps) are left out,
    # because a test fold of them can take gigabytes.
    kept = {key: value for key, value in test.items() if value.ndim <= 2}
    if len(kept) < len(test):
      left_out = sorted(set(test) - set(kept))
      logger.info("%s leaves out %s (more than two axes)", predictions, left_out)
    partial = predictions.with_name(predictions.name + ".partial")
    with open(partial, "wb") as file:
      np.savez_compressed(file, **kept)
    os.replace(partial, predictions)
    # Written under a temporary name and renamed, so a crash never leaves a
    # partial JSON that `uem-ich evaluate --folds` would take as finished.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    os.replace(partial, path)
    logger.info("wrote %s and %s", path, predictions.name)
  return result
