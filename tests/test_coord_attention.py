"""Tests of coordinate attention, including BatchNorm statistics on a data mesh."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.models.coord_attention import CoordinateAttention
from uem_ich_jax.models.coord_attention import hidden_channels


@pytest.mark.parametrize("channels, expected", [(40, 8), (160, 8), (320, 10), (384, 12), (768, 24)])
def test_hidden_channels_minimum_eight(channels, expected):
  assert hidden_channels(channels) == expected


def _randomised(channels: int = 64, seed: int = 0) -> CoordinateAttention:
  """A block with every parameter and running statistic drawn at random."""
  block = CoordinateAttention(channels, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, variable in nnx.iter_graph(block):
    if isinstance(variable, (nnx.Param, nnx.BatchStat)):
      value = rng.normal(scale=0.5, size=variable.shape).astype(np.float32)
      if variable is block.bn1.var:
        value = np.abs(value) + 0.5
      variable.set_value(jnp.asarray(value))
  return block


def _reference(block: CoordinateAttention, x: np.ndarray) -> np.ndarray:
  """Coordinate attention in float64 numpy, BatchNorm with running statistics."""

  def dense(layer, value):
    return value @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)

  x = x.astype(np.float64)
  height = x.shape[1]
  strips = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1)
  hidden = dense(block.conv1, strips)
  bn = block.bn1
  hidden = (hidden - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
  hidden = hidden * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  hidden = hidden / (1.0 + np.exp(-hidden))  # SiLU
  attention_h = 1.0 / (1.0 + np.exp(-dense(block.conv_h, hidden[:, :height])))
  attention_w = 1.0 / (1.0 + np.exp(-dense(block.conv_w, hidden[:, height:])))
  return x * attention_h[:, :, None, :] * attention_w[:, None, :, :]


def test_matches_numpy_reference():
  block = _randomised()
  x = np.random.default_rng(1).normal(size=(2, 6, 5, 64)).astype(np.float32)
  np.testing.assert_allclose(block(jnp.asarray(x)), _reference(block, x), rtol=1e-5, atol=1e-5)


def test_no_residual_zero_stays_zero():
  block = _randomised()
  x = np.random.default_rng(2).normal(size=(1, 4, 4, 64)).astype(np.float32)
  x[..., 5] = 0.0
  y = np.asarray(block(jnp.asarray(x)))
  assert np.all(y[..., 5] == 0.0)
  # Attention lies in (0, 1) squared, so without a residual |y| < |x|.
  assert np.all(np.abs(y) <= np.abs(x))


def test_training_updates_running_statistics():
  block = _randomised()
  old_mean = np.asarray(block.bn1.mean[...]).copy()
  old_var = np.asarray(block.bn1.var[...]).copy()
  x = np.random.default_rng(3).normal(size=(4, 6, 5, 64)).astype(np.float32)
  strips = np.concatenate([x.mean(axis=2), x.mean(axis=1)], axis=1).astype(np.float64)
  hidden = strips @ np.asarray(block.conv1.kernel[...]) + np.asarray(block.conv1.bias[...])
  batch_mean = hidden.mean(axis=(0, 1))
  batch_var = hidden.var(axis=(0, 1))

  block.train()
  block(jnp.asarray(x))
  # PyTorch momentum 0.1 is Flax momentum 0.9.
  np.testing.assert_allclose(block.bn1.mean[...], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(block.bn1.var[...], 0.9 * old_var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute():
  block = _randomised()
  half = CoordinateAttention(64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(half, nnx.state(block))
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 64))
  y = half(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), block(x), atol=5e-2, rtol=5e-2)


# Runs in a fresh interpreter because the forced device count must be set
# before JAX starts.
SHARDED_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from uem_ich_jax.models.coord_attention import CoordinateAttention

    assert jax.device_count() == 8, jax.devices()
    block = CoordinateAttention(64, rngs=nnx.Rngs(0))
    block.train()
    graphdef, state = nnx.split(block)

    def step(state, x):
      module = nnx.merge(graphdef, state)
      y = module(x)
      return y, nnx.state(module)

    # Shift one half of the batch so that per-shard statistics would differ
    # from global ones.
    x = jax.random.normal(jax.random.key(1), (16, 6, 5, 64))
    x = x.at[8:].multiply(3.0).at[8:].add(2.0)

    y_single, state_single = jax.jit(step)(state, x)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded_x = jax.device_put(x, batch)
    sharded_state = jax.device_put(state, replicated)
    y_sharded, state_sharded = jax.jit(step, out_shardings=(batch, replicated))(sharded_state, sharded_x)

    assert len(y_sharded.sharding.device_set) == 8
    np.testing.assert_allclose(y_sharded, y_single, rtol=1e-5, atol=1e-6)
    for name in ("mean", "var"):
      np.testing.assert_allclose(state_sharded["bn1"][name][...], state_single["bn1"][name][...], rtol=1e-5, atol=1e-6)
    # The statistics moved, so the comparison above compared something.
    assert not np.allclose(state_single["bn1"]["mean"][...], 0.0)
    print("sharded statistics match")
    """
)


def test_batch_statistics_global_on_mesh():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-c", SHARDED_SCRIPT],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "sharded statistics match" in result.stdout


# A (2, 4, 5) visible mask. Image 0 has row 2 and columns 0 and 4 fully masked,
# and image 1 has a single visible position.
MASK = np.zeros((2, 4, 5, 1), np.float32)
MASK[0, [0, 1, 3], 1:4] = 1.0
MASK[1, 3, 2] = 1.0


def _masked_strips(block: CoordinateAttention, x: np.ndarray, mask: np.ndarray):
  """Visible-only strip means through conv1, and which strips have a visible position, in float64."""
  x = x.astype(np.float64) * mask
  count_h = mask.sum(axis=2)
  count_w = mask.sum(axis=1)
  pooled_h = x.sum(axis=2) / np.maximum(count_h, 1.0)
  pooled_w = x.sum(axis=1) / np.maximum(count_w, 1.0)
  strips = np.concatenate([pooled_h, pooled_w], axis=1)
  hidden = strips @ np.asarray(block.conv1.kernel[...], np.float64) + np.asarray(block.conv1.bias[...])
  strip_visible = np.concatenate([count_h, count_w], axis=1)[..., 0] > 0
  return x, hidden, strip_visible


def _masked_reference(block, x, mask, mean, var):
  """Masked coordinate attention in float64 with the given BatchNorm statistics."""
  x, hidden, _ = _masked_strips(block, x, mask)
  height = x.shape[1]
  bn = block.bn1
  hidden = (hidden - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  hidden = hidden / (1.0 + np.exp(-hidden))

  def dense(layer, value):
    return value @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)

  attention_h = 1.0 / (1.0 + np.exp(-dense(block.conv_h, hidden[:, :height])))
  attention_w = 1.0 / (1.0 + np.exp(-dense(block.conv_w, hidden[:, height:])))
  return x * attention_h[:, :, None, :] * attention_w[:, None, :, :]


def test_masked_eval_matches_reference():
  block = _randomised()
  x = np.random.default_rng(5).normal(size=(2, 4, 5, 64)).astype(np.float32)
  y = np.asarray(block(jnp.asarray(x), jnp.asarray(MASK)))
  expected = _masked_reference(block, x, MASK, np.asarray(block.bn1.mean[...]), np.asarray(block.bn1.var[...]))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  assert np.all(y[np.broadcast_to(MASK == 0, y.shape)] == 0.0)


def test_masked_training_statistics_visible_strips_only():
  block = _randomised()
  old_mean = np.asarray(block.bn1.mean[...]).copy()
  old_var = np.asarray(block.bn1.var[...]).copy()
  x = np.random.default_rng(6).normal(size=(2, 4, 5, 64)).astype(np.float32)
  _, hidden, strip_visible = _masked_strips(block, x, MASK)
  counted = hidden[strip_visible]  # (strips with a visible position, m)
  # 3 rows and 3 columns of image 0, 1 row and 1 column of image 1: 8 of 18 strips.
  assert counted.shape[0] == 8
  batch_mean = counted.mean(axis=0)
  batch_var = counted.var(axis=0)

  block.train()
  y = np.asarray(block(jnp.asarray(x), jnp.asarray(MASK)))
  np.testing.assert_allclose(y, _masked_reference(block, x, MASK, batch_mean, batch_var), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(block.bn1.mean[...], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(block.bn1.var[...], 0.9 * old_var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)


def test_masked_ignores_values_under_mask():
  block = _randomised()
  block.train()
  x = np.random.default_rng(7).normal(size=(2, 4, 5, 64)).astype(np.float32)
  noisy = np.where(MASK > 0, x, 100.0).astype(np.float32)
  graphdef, state = nnx.split(block)

  def apply(x):
    return nnx.merge(graphdef, nnx.clone(state))(jnp.asarray(x), jnp.asarray(MASK))

  np.testing.assert_allclose(apply(noisy), apply(x * MASK), rtol=1e-6, atol=1e-6)


def test_masked_all_visible_equals_dense():
  block = _randomised()
  x = jax.random.normal(jax.random.key(8), (2, 4, 5, 64))
  np.testing.assert_allclose(block(x, jnp.ones((2, 4, 5, 1), bool)), block(x), rtol=1e-5, atol=1e-6)


def test_masked_gradient_finite_when_strips_empty():
  block = _randomised()
  block.train()
  x = jax.random.normal(jax.random.key(9), (2, 4, 5, 64)).at[..., 3].set(0.0)

  def loss(module, x):
    return jnp.sum(module(x, jnp.asarray(MASK)) ** 2)

  grads, input_grad = nnx.grad(loss, argnums=(0, 1))(block, x)
  assert np.all(np.isfinite(input_grad))
  for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)):
    assert np.all(np.isfinite(leaf))


def test_masked_training_empty_batch_finite():
  block = _randomised()
  block.train()
  x = jax.random.normal(jax.random.key(10), (2, 4, 5, 64))
  y = block(x, jnp.zeros((2, 4, 5, 1), bool))
  assert np.all(np.asarray(y) == 0.0)
  assert np.all(np.isfinite(block.bn1.mean[...]))
  assert np.all(np.isfinite(block.bn1.var[...]))
