"""Multi-label losses on logits, always computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
