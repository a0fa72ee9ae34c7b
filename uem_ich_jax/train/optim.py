"""Learning-rate schedules and the AdamW optimizer with separate encoder and head rates."""

from __future__ import annotations

import logging
from typing import Any

import jax
import optax

from uem_ich_jax.errors import InputError
from uem_ich_jax.train.mesh import path_name

logger = logging.getLogger(__name__)

ENCODER = "encoder"
HEAD = "head"


def warmup_cosine(
    peak: float, *, total_steps: int, warmup_steps: int, floor_fraction: float
) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine decay to `peak * floor_fraction`.

  The floor is reached at `total_steps` and held after it, so a run that goes on
  past its planned length keeps learning at the floor rather than at zero.
  """
  if total_steps < 1 or not 0 <= warmup_steps < total_steps:
    raise InputError(
        f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps},"
        f" total_steps={total_steps}"
    )
  if not 0.0 <= floor_fraction <= 1.0:
    raise InputError(f"floor_fraction must lie in [0, 1], got {floor_fraction}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=total_steps,
      end_value=peak * floor_fraction,
  )


def param_groups(params: Any, head_prefix: str = HEAD) -> Any:
  """Label each parameter "head" when its top-level name starts with `head_prefix`, else "encoder".

  So `head`, `head_segmentation/...` and `head_detection/...` are all heads:
  the same rule by which encoder exports leave the heads out
  (`stages.copy_encoder`).
  """

  def label(path, _):
    top = path_name(path).split("/")[0]
    return HEAD if top.startswith(head_prefix) else ENCODER

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: Any) -> Any:
  # Weight decay on matrices and kernels only; norms, GRN and biases are vectors.
  return jax.tree.map(lambda leaf: getattr(leaf, "ndim", 0) > 1, params)


def create_optimizer(
    optim: Any, params: Any, *, total_steps: int
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """AdamW per group, gradient clipping, and optional accumulation, from `config.optim`.

  Fields read: encoder_lr, head_lr, warmup_steps, floor_fraction, weight_decay,
  b1, b2, eps, clip_norm (0 turns clipping off), accumulate_steps and
  head_prefix. `total_steps` counts optimizer updates; with accumulation
  the trainer runs `accumulate_steps` times as many steps.

  Returns the transformation and the schedule of each group (for logging).
  """
  schedules = {
      ENCODER: warmup_cosine(
          optim.encoder_lr,
          total_steps=total_steps,
          warmup_steps=optim.warmup_steps,
          floor_fraction=optim.floor_fraction,
      ),
      HEAD: warmup_cosine(
          optim.head_lr,
          total_steps=total_steps,
          warmup_steps=optim.warmup_steps,
          floor_fraction=optim.floor_fraction,
      ),
  }
  groups = {
      name: optax.adamw(
          schedule,
          b1=optim.b1,
          b2=optim.b2,
          eps=optim.eps,
          weight_decay=optim.weight_decay,
          mask=_decay_mask,
      )
      for name, schedule in schedules.items()
  }
  labels = param_groups(params, optim.head_prefix)
  counts = {name: 0 for name in groups}
  for label in jax.tree.leaves(labels):
    counts[label] += 1
  logger.info("optimizer groups (parameter arrays): %s", counts)

  parts = []
  if optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(optax.multi_transform(groups, labels))
  tx = optax.chain(*parts)
  if optim.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulate_steps)
  return tx, schedules
