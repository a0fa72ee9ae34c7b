"""Classification and segmentation losses on logits, always computed in float32."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from uem_ich_jax.errors import InputError


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logits) against 0/1 labels."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  return jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sigmoid_focal(
    logits: jax.Array, labels: jax.Array, *, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
  """Elementwise sigmoid focal loss (Lin et al. 2017).

  Each term is `alpha_t * (1 - p_t) ** gamma * bce`, where p_t is the
  probability given to the true label and alpha_t is `alpha` for positives and
  `1 - alpha` for negatives; `alpha` < 0 turns the weighting off.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  probability = jax.nn.sigmoid(logits)
  p_true = labels * probability + (1.0 - labels) * (1.0 - probability)
  loss = sigmoid_bce(logits, labels) * (1.0 - p_true) ** gamma
  if alpha >= 0:
    loss = loss * (labels * alpha + (1.0 - labels) * (1.0 - alpha))
  return loss


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` (batch, ...) over the rows where `mask` (batch,) is set."""
  values = values.astype(jnp.float32)
  weights = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (values.ndim - 1))
  weights = jnp.broadcast_to(weights, values.shape)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _example_weights(weights: jax.Array, ndim: int) -> jax.Array:
  """Reshape per-example weights (batch,) to broadcast over `ndim` dimensions."""
  weights = weights.astype(jnp.float32)
  return weights.reshape(weights.shape + (1,) * (ndim - 1))


def softmax_focal(
    logits: jax.Array,
    mask: jax.Array,
    weights: jax.Array,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> jax.Array:
  """Mean softmax focal cross-entropy over the pixels of weighted examples.

  Each pixel contributes `alpha * (1 - p_t) ** gamma * -log p_t`, where p_t is
  the softmax probability of its true class in `mask`. `alpha` is one constant
  scale for every class, as in the upstream segmentation loss. `weights`
  (batch,) are per-example weights, 0 for padding or for examples without a
  mask, and the mean divides by the weighted pixel count.

  Args:
    logits: (N, H, W, K) class logits.
    mask: (N, H, W) integer class ids in 0..K-1.
    weights: (N,) example weights (bool or float).
    alpha: constant scale of every term.
    gamma: focusing exponent; 0 gives plain cross-entropy times `alpha`.
  """
  logits = logits.astype(jnp.float32)
  log_probabilities = jax.nn.log_softmax(logits, axis=-1)
  log_p_true = jnp.take_along_axis(
      log_probabilities, mask.astype(jnp.int32)[..., None], axis=-1
  )[..., 0]
  p_true = jnp.exp(log_p_true)
  per_pixel = -alpha * (1.0 - p_true) ** gamma * log_p_true
  return masked_mean(per_pixel, weights)


def sigmoid_focal_pixels(
    logits: jax.Array,
    mask: jax.Array,
    weights: jax.Array,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> jax.Array:
  """Binary counterpart of `softmax_focal` for (N, H, W, 1) logits: foreground = mask > 0."""
  foreground = (mask > 0).astype(jnp.float32)
  # `alpha` scales every pixel alike, as in `softmax_focal`, so the focal
  # term itself runs without class weighting.
  per_pixel = alpha * sigmoid_focal(logits[..., 0], foreground, alpha=-1.0, gamma=gamma)
  return masked_mean(per_pixel, weights)


def soft_dice_loss(
    probabilities: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    epsilon: float = 1.0,
) -> jax.Array:
  """Return 1 - mean over channels of the soft Dice, summed over the whole batch.

  Per channel c: (2 * sum(p_c * g_c) + epsilon) / (sum(p_c) + sum(g_c) + epsilon).
  The sums run over every pixel of every weighted example at once, so there is
  one Dice per batch (as the upstream computes it), not a mean of per-example
  Dice. The epsilon keeps a channel that is absent from both prediction and target at
  Dice 1 with finite gradients.

  Args:
    probabilities: (N, H, W, C) predicted probabilities.
    targets: (N, H, W, C) one-hot (or soft) targets.
    weights: (N,) example weights.
    epsilon: smoothing added to numerator and denominator.
  """
  probabilities = probabilities.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  w = _example_weights(weights, probabilities.ndim)
  axes = tuple(range(probabilities.ndim - 1))
  intersection = jnp.sum(w * probabilities * targets, axis=axes)
  total = jnp.sum(w * probabilities, axis=axes) + jnp.sum(w * targets, axis=axes)
  dice = (2.0 * intersection + epsilon) / (total + epsilon)
  return 1.0 - jnp.mean(dice)


def _one_output_loss(
    logits: jax.Array,
    mask: jax.Array,
    weights: jax.Array,
    *,
    alpha: float,
    gamma: float,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
  """Return (focal, Dice loss) of one logit map, binary when it has one channel."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if num_classes == 1:
    focal = sigmoid_focal_pixels(logits, mask, weights, alpha=alpha, gamma=gamma)
    probabilities = jax.nn.sigmoid(logits)
    targets = (mask > 0).astype(jnp.float32)[..., None]
  else:
    focal = softmax_focal(logits, mask, weights, alpha=alpha, gamma=gamma)
    # Dice over the foreground classes 1..K-1 only, because background would dominate it.
    probabilities = jax.nn.softmax(logits, axis=-1)[..., 1:]
    targets = jax.nn.one_hot(mask, num_classes, dtype=jnp.float32)[..., 1:]
  dice = soft_dice_loss(probabilities, targets, weights, epsilon=epsilon)
  return focal, dice


def segmentation_loss(
    main: jax.Array,
    aux: Sequence[jax.Array],
    mask: jax.Array,
    valid: jax.Array,
    *,
    focal_weight: float = 0.2,
    dice_weight: float = 0.8,
    aux_weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1),
    alpha: float = 0.75,
    gamma: float = 2.0,
    epsilon: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Focal plus soft Dice loss of the main logits, plus weighted deep-supervision terms.

  Each output scores `focal_weight * focal + dice_weight * (1 - Dice)`, and the
  total is the main output's score plus `aux_weights[i]` times auxiliary
  output i's. With K > 1 channels the focal term is softmax over K classes and
  the Dice covers classes 1..K-1; with one channel both are binary (sigmoid,
  foreground = mask > 0).

  Args:
    main: (N, H, W, K) logits at the mask's size.
    aux: auxiliary logits, each (N, H, W, K); as many as `aux_weights`.
    mask: (N, H, W) integer class ids.
    valid: (N,) example weights: 0 for padding and for examples without a mask.

  Returns:
    The float32 scalar total and its parts: `focal` and `dice` (of the main
    output) and `aux` (the weighted auxiliary sum).

  Raises:
    InputError: when the number of auxiliary outputs differs from `aux_weights`
      or shapes disagree.
  """
  if len(aux) != len(aux_weights):
    raise InputError(
        f"segmentation_loss got {len(aux)} auxiliary outputs but {len(aux_weights)} aux_weights"
    )
  for name, logits in [("main", main), *((f"aux[{i}]", a) for i, a in enumerate(aux))]:
    if logits.ndim != 4 or tuple(logits.shape[:3]) != tuple(mask.shape):
      raise InputError(
          f"segmentation logits {name} have shape {tuple(logits.shape)}, expected (N, H, W, K)"
          f" matching the mask shape {tuple(mask.shape)}"
      )
  options = {"alpha": alpha, "gamma": gamma, "epsilon": epsilon}
  focal, dice = _one_output_loss(main, mask, valid, **options)
  total = focal_weight * focal + dice_weight * dice
  aux_total = jnp.zeros((), jnp.float32)
  for weight, logits in zip(aux_weights, aux):
    aux_focal, aux_dice = _one_output_loss(logits, mask, valid, **options)
    aux_total = aux_total + weight * (focal_weight * aux_focal + dice_weight * aux_dice)
  return total + aux_total, {"focal": focal, "dice": dice, "aux": aux_total}
