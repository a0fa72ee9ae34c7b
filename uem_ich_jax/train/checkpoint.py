"""Orbax checkpoints of the train state and the grain iterator, resume, and restoring a model.

A work directory is self-describing:

    WORKDIR/config.json          the run's full config (`load_config`)
    WORKDIR/checkpoints/<step>/  `state` (step, params, opt_state, extra) and
                                 `data` (the grain iterator of each process)
    WORKDIR/checkpoints/<step>/metrics  validation metrics of that step, when
                                 it was evaluated; `best_step` ranks by them
    WORKDIR/export/encoder/      the encoder of a pretraining run
                                 (`export_encoder`), for `init_from`
    WORKDIR/tensorboard/         event files
    WORKDIR/eval_*.json          results of `uem-ich evaluate`

Saves are asynchronous: `CheckpointManager.save` returns while the arrays are
written. `wait` must run before the process exits or restores, or the newest
checkpoint is still a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# A pretraining run writes its encoder to WORKDIR/export/encoder.
ENCODER_EXPORT_DIR = "export/encoder"
# The manifest is written last, so an export without it is incomplete.
ENCODER_MANIFEST = "encoder.json"
ENCODER_FORMAT = "uem-ich-jax encoder"


class CheckpointError(InputError):
  """A checkpoint or work directory that cannot be used; the message names the path."""


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Write the run's config to `workdir/config.json` (process 0 only)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """Read the config a run saved in `workdir`; lists come back as tuples."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path} does not exist; is {workdir} the work directory of a run?")
  try:
    return load_config_text(path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def load_config_text(text: str) -> ml_collections.ConfigDict:
  """Parse a config saved as JSON; lists come back as tuples."""
  return ml_collections.ConfigDict(_lists_to_tuples(json.loads(text)))


def _lists_to_tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(item) for item in value)
  return value


class CheckpointManager:
  """Keep the latest `keep` checkpoints plus the best one by `best_metric`.

  A checkpoint saved without metrics only counts for "latest". With
  `best_metric` empty, only the latest are kept and `best_step` is the latest.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      *,
      keep: int = 2,
      best_metric: str = "",
      best_mode: str = "max",
      read_only: bool = False,
  ):
    if best_mode not in ("max", "min"):
      raise CheckpointError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoints in {workdir}: {self.directory} does not exist")
    self.best_metric = best_metric

    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      # A checkpoint whose metric was undefined (for example an AUC without
      # positives) ranks last.
      worst = float("-inf") if best_mode == "max" else float("inf")
      best_fn = lambda metrics: float(metrics.get(best_metric, worst))  # noqa: E731
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=best_fn,
              reverse=best_mode == "min",
              n=1,
              keep_checkpoints_without_metrics=False,
          )
      )
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        read_only=read_only,
        create=not read_only,
        enable_async_checkpointing=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
        options=options,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Return the step with the best metric, or the latest when no kept step has metrics."""
    with_metrics = [step for step in self._manager.all_steps() if self.metrics(step)]
    if not self.best_metric or not with_metrics:
      return self.latest_step()
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def metrics(self, step: int) -> dict[str, float] | None:
    return self._manager.metrics(step)

  def save(
      self,
      step: int,
      state: Any,
      iterator: Any | None = None,
      metrics: dict[str, float] | None = None,
  ) -> None:
    """Start an asynchronous save of `state` and the iterator position at `step`.

    The grain handler writes the iterator state before this returns, so the
    iterator may advance right away.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    if metrics is not None:
      metrics = {key: float(value) for key, value in metrics.items()}
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, iterator: Any | None = None) -> Any:
    """Restore step `step` onto the shardings that `abstract_state` carries.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `sharding` set,
    so a checkpoint written on one mesh restores onto another. The iterator, if
    given, is moved to its saved position in place.
    """
    self.wait()
    state = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    try:
      restored = self._manager.restore(step, args=state)
    except (ValueError, KeyError, TypeError) as error:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} does not match the model and optimizer of"
          f" this config: {error}"
      ) from error
    if iterator is not None:
      # Restored on its own, so that a mismatch is reported as an input mismatch.
      data = ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator))
      try:
        self._manager.restore(step, args=data)
      except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"the training input position in checkpoint {self.directory / str(step)} does not"
            f" fit this config's input (missing or invalid {error}): the run was saved with"
            " other input settings, such as config.aggregator.cache_tokens. Resume with the"
            " saved run's input settings, or start a new work directory"
        ) from error
    return restored["state"]

  def restore_arrays(self, step: int) -> Any:
    """Restore the `state` of `step` as host numpy arrays, whatever mesh wrote it."""
    self.wait()
    metadata = self._manager.item_metadata(step)["state"]
    if metadata is None:
      raise CheckpointError(f"checkpoint {self.directory / str(step)} has no state item")
    # A numpy target makes Orbax read every array whole onto the host,
    # ignoring the shardings it was saved with.
    target = jax.tree.map(
        lambda leaf: np.empty(leaf.shape, leaf.dtype),
        metadata,
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Wait for pending saves and release the manager; call before exit."""
    self._manager.wait_until_finished()
    self._manager.close()


def run_manager(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None
) -> CheckpointManager:
  """Open the checkpoints of a finished or running run read-only, ranked as the run ranks them.

  The best metric and its direction come from the run's config (`config`, or
  `workdir/config.json`; a folder without one ranks by step only).
  """
  if config is None and (pathlib.Path(workdir) / CONFIG_FILE).is_file():
    config = load_config(workdir)
  best_metric = config.get("best_metric", "") if config is not None else ""
  best_mode = config.get("best_mode", "max") if config is not None else "max"
  return CheckpointManager(workdir, best_metric=best_metric, best_mode=best_mode, read_only=True)


def resolve_step(manager: CheckpointManager, step: int | None, *, workdir: Any) -> int:
  """`step` if it was saved, else the best step; a CheckpointError names the choices."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"{workdir} contains no finished checkpoint")
  if step is None:
    return manager.best_step()
  if step not in steps:
    raise CheckpointError(f"{workdir} has no checkpoint of step {step}; saved steps: {steps}")
  return step


def restore_model(workdir: str | os.PathLike, step: int | None = None):
  """Load a trained model for inference from a work directory.

  Returns `(model, config)`: the NNX model in evaluation mode with the weights
  of `step` (the best checkpoint when None) on the default device, and the
  run's config. No parameter is drawn at random on the way.
  """
  # Imported here: the stage modules import this one.
  from uem_ich_jax.train import stages

  config = load_config(workdir)
  manager = run_manager(workdir, config)
  step = resolve_step(manager, step, workdir=workdir)
  arrays = manager.restore_arrays(step)
  manager.close()
  stage = stages.get_stage(config.stage)
  model = stages.model_from_arrays(
      lambda: stage.build_model(config.model, seed=config.seed),
      arrays["params"],
      arrays.get("extra"),
      seed=config.seed,
      source=f"{workdir} step {step}",
  )
  logger.info("restored %s step %d", workdir, step)
  return model, config


def is_encoder_export(path: str | os.PathLike) -> bool:
  return (pathlib.Path(path) / ENCODER_MANIFEST).is_file()


def export_encoder(
    directory: str | os.PathLike, arrays: dict[str, Any], manifest: dict[str, Any]
) -> pathlib.Path:
  """Write an encoder's `params` and `extra` (BatchNorm statistics) to `directory`.

  Every process must call this, because Orbax writes sharded arrays
  collectively. Process 0 writes `encoder.json` from `manifest` after the
  arrays are complete, so an interrupted export is never taken for a
  finished one.
  """
  directory = pathlib.Path(directory).absolute()
  manifest_path = directory / ENCODER_MANIFEST
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "arrays", arrays, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    manifest = {"format": ENCODER_FORMAT, **manifest}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  logger.info("exported the encoder to %s", directory)
  return directory


def read_encoder_export(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Read an `export_encoder` directory: (manifest, {"params": ..., "extra": ...}) as numpy."""
  # Orbax needs an absolute path.
  directory = pathlib.Path(directory).absolute()
  manifest_path = directory / ENCODER_MANIFEST

  if not manifest_path.is_file():
    raise CheckpointError(
        f"{directory} is not an encoder export: {ENCODER_MANIFEST} is missing (an interrupted"
        " export leaves none; export again with `uem-ich export-encoder`)"
    )
  try:
    manifest = json.loads(manifest_path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{manifest_path} is not valid JSON: {error}") from error
  if not isinstance(manifest, dict) or manifest.get("format") != ENCODER_FORMAT:
    raise CheckpointError(f"{manifest_path} does not describe a {ENCODER_FORMAT} export")

  # TODO: when the array files are corrupt, Orbax's background tasks also print
  # asyncio tracebacks after this error; the error itself is still raised.
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(directory / "arrays").item_metadata
    if metadata is None:
      raise ValueError("the array metadata is missing")
    target = jax.tree.map(
        lambda leaf: np.empty(leaf.shape, leaf.dtype),
        dict(metadata),
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )
    arrays = checkpointer.restore(directory / "arrays", target)
  except (FileNotFoundError, ValueError, KeyError) as error:
    raise CheckpointError(f"cannot read the arrays of the encoder export {directory}: {error}") from error
  finally:
    checkpointer.close()
  return manifest, arrays
