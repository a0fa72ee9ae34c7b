"""Segmentation losses against float64 numpy references, and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uem_ich_jax.errors import InputError
from uem_ich_jax.train import losses


def _softmax64(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def _focal_reference(logits, mask, weights, alpha, gamma):
  probabilities = _softmax64(logits.astype(np.float64))
  p_true = np.take_along_axis(probabilities, mask[..., None].astype(int), axis=-1)[..., 0]
  per_pixel = -alpha * (1.0 - p_true) ** gamma * np.log(p_true)
  w = np.broadcast_to(weights.astype(np.float64)[:, None, None], per_pixel.shape)
  return (per_pixel * w).sum() / max(w.sum(), 1.0)


def _dice_reference(logits, mask, weights, epsilon):
  probabilities = _softmax64(logits.astype(np.float64))
  classes = logits.shape[-1]
  w = weights.astype(np.float64)[:, None, None]
  values = []
  for c in range(1, classes):
    p, g = probabilities[..., c], (mask == c).astype(np.float64)
    intersection = (w * p * g).sum()
    total = (w * p).sum() + (w * g).sum()
    values.append((2 * intersection + epsilon) / (total + epsilon))
  return 1.0 - np.mean(values)


def _case(seed=0, batch=3, size=8, classes=6):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=(batch, size, size, classes)).astype(np.float32)
  mask = rng.integers(0, classes, size=(batch, size, size)).astype(np.uint8)
  return logits, mask


@pytest.mark.parametrize("alpha,gamma", [(0.75, 2.0), (1.0, 0.0), (0.25, 1.5)])
def test_softmax_focal_matches_reference(alpha, gamma):
  logits, mask = _case()
  weights = np.array([1.0, 0.0, 1.0], np.float32)
  got = losses.softmax_focal(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(weights), alpha=alpha, gamma=gamma)
  assert got.dtype == jnp.float32
  expected = _focal_reference(logits, mask, weights, alpha, gamma)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_softmax_focal_gamma_zero_is_cross_entropy():
  logits, mask = _case(seed=1)
  weights = np.ones(3, np.float32)
  focal = losses.softmax_focal(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(weights), alpha=1.0, gamma=0.0)
  log_p = jax.nn.log_softmax(jnp.asarray(logits))
  cross_entropy = -jnp.mean(jnp.take_along_axis(log_p, jnp.asarray(mask, jnp.int32)[..., None], -1))
  np.testing.assert_allclose(float(focal), float(cross_entropy), rtol=1e-5)


def test_soft_dice_matches_reference_over_whole_batch():
  logits, mask = _case(seed=2)
  weights = np.array([1.0, 1.0, 0.0], np.float32)
  probabilities = jax.nn.softmax(jnp.asarray(logits))[..., 1:]
  targets = jax.nn.one_hot(jnp.asarray(mask), 6)[..., 1:]
  got = losses.soft_dice_loss(probabilities, targets, jnp.asarray(weights), epsilon=1.0)
  np.testing.assert_allclose(float(got), _dice_reference(logits, mask, weights, 1.0), rtol=1e-5)


def test_soft_dice_pools_the_batch():
  # Example 0 contains one class-1 pixel and predicts it. Example 1 contains
  # none and predicts one. The batch Dice is 2/3, the mean of per-example Dice 1/2.
  probabilities = np.zeros((2, 2, 2, 1), np.float32)
  targets = np.zeros((2, 2, 2, 1), np.float32)
  probabilities[0, 0, 0, 0] = targets[0, 0, 0, 0] = 1.0
  probabilities[1, 1, 1, 0] = 1.0
  got = losses.soft_dice_loss(jnp.asarray(probabilities), jnp.asarray(targets), jnp.ones(2), epsilon=0.0)
  assert float(got) == pytest.approx(1.0 - 2.0 / 3.0)


def test_soft_dice_perfect_prediction_is_zero():
  _, mask = _case(seed=3)
  targets = jax.nn.one_hot(jnp.asarray(mask), 6)[..., 1:]
  got = losses.soft_dice_loss(targets, targets, jnp.ones(3), epsilon=1e-6)
  assert float(got) == pytest.approx(0.0, abs=1e-6)


def test_segmentation_loss_combines_terms():
  logits, mask = _case(seed=4)
  rng = np.random.default_rng(5)
  aux = [rng.normal(size=logits.shape).astype(np.float32) for _ in range(4)]
  weights = np.array([1.0, 1.0, 1.0], np.float32)
  total, parts = losses.segmentation_loss(
      jnp.asarray(logits), [jnp.asarray(a) for a in aux], jnp.asarray(mask), jnp.asarray(weights)
  )

  def score(x):
    return 0.2 * _focal_reference(x, mask, weights, 0.75, 2.0) + 0.8 * _dice_reference(x, mask, weights, 1.0)

  expected_aux = sum(w * score(a) for w, a in zip((0.4, 0.3, 0.2, 0.1), aux))
  np.testing.assert_allclose(float(parts["aux"]), expected_aux, rtol=1e-5)
  np.testing.assert_allclose(float(total), score(logits) + expected_aux, rtol=1e-5)
  np.testing.assert_allclose(float(parts["focal"]), _focal_reference(logits, mask, weights, 0.75, 2.0), rtol=1e-5)


def test_segmentation_loss_binary_mode():
  logits, mask = _case(seed=6, classes=1)
  mask = (np.random.default_rng(7).random(mask.shape) < 0.3).astype(np.uint8) * 3
  weights = np.ones(3, np.float32)
  _, parts = losses.segmentation_loss(
      jnp.asarray(logits), [], jnp.asarray(mask), jnp.asarray(weights), aux_weights=()
  )
  x = logits[..., 0].astype(np.float64)
  g = (mask > 0).astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  p_true = np.where(g > 0, p, 1 - p)
  focal = np.mean(-0.75 * (1 - p_true) ** 2 * np.log(p_true))
  dice = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
  np.testing.assert_allclose(float(parts["focal"]), focal, rtol=1e-5)
  np.testing.assert_allclose(float(parts["dice"]), dice, rtol=1e-5)


def test_segmentation_loss_gradients_finite_on_empty_masks():
  logits, _ = _case(seed=8)
  mask = np.zeros(logits.shape[:3], np.uint8)
  aux = [jnp.asarray(logits)] * 4

  def total(x, weights):
    return losses.segmentation_loss(x, aux, jnp.asarray(mask), weights)[0]

  for weights in (jnp.ones(3), jnp.zeros(3)):
    value, grad = jax.value_and_grad(total)(jnp.asarray(logits), weights)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))
  # No example with a mask: no loss and no gradient.
  value, grad = jax.value_and_grad(total)(jnp.asarray(logits), jnp.zeros(3))
  assert float(value) == 0.0
  assert float(jnp.abs(grad).max()) == 0.0


def test_segmentation_loss_rejects_wrong_aux_count():
  logits, mask = _case()
  with pytest.raises(InputError, match="2 auxiliary outputs but 4"):
    losses.segmentation_loss(jnp.asarray(logits), [jnp.asarray(logits)] * 2, jnp.asarray(mask), jnp.ones(3))


def test_segmentation_loss_rejects_wrong_shape():
  logits, mask = _case()
  with pytest.raises(InputError, match="matching the mask shape"):
    losses.segmentation_loss(jnp.asarray(logits[:, :4]), [], jnp.asarray(mask), jnp.ones(3), aux_weights=())
