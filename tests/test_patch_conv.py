"""The stem and downsampling convolution as flattened patches equals the strided convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uem_ich_jax.models import layers


def _strided_conv(x, kernel, bias):
  size = kernel.shape[0]
  y = jax.lax.conv_general_dilated(
      x, kernel, (size, size), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return y + bias


@pytest.mark.parametrize(
    "shape, size, out",
    [
        ((2, 16, 12, 3), 4, 8),  # the stem: 4x4 patches of the 3 windows
        ((2, 8, 8, 6), 2, 10),  # downsampling
        ((1, 9, 7, 4), 2, 5),  # odd sizes: the last row and column are dropped
    ],
)
def test_values_and_gradients_equal_strided_conv(shape, size, out):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(size, size, shape[-1], out)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(out,)), jnp.float32)
  target = jnp.asarray(rng.normal(size=_strided_conv(x, kernel, bias).shape), jnp.float32)

  def loss(function):
    return lambda x, kernel, bias: jnp.sum((function(x, kernel, bias) - target) ** 2)

  product = lambda x, kernel, bias: layers.patch_product(x, kernel) + bias
  np.testing.assert_allclose(
      product(x, kernel, bias), _strided_conv(x, kernel, bias), rtol=1e-5, atol=1e-5
  )
  expected = jax.grad(loss(_strided_conv), argnums=(0, 1, 2))(x, kernel, bias)
  got = jax.grad(loss(product), argnums=(0, 1, 2))(x, kernel, bias)
  for name, want, have in zip(("x", "kernel", "bias"), expected, got):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4, err_msg=f"gradient of {name}")


def test_module_keeps_conv_parameters_and_values():
  """Same parameter names, shapes and initial values as nnx.Conv, and the same output.

  Both must also take as many keys from the stream, so that the layers built
  after them get the same initial values.
  """
  patch_rngs, conv_rngs = nnx.Rngs(5), nnx.Rngs(5)
  patch = layers.patch_conv(3, 8, 4, dtype=jnp.float32, rngs=patch_rngs)
  conv = nnx.Conv(
      3, 8, (4, 4), strides=(4, 4), padding="VALID", kernel_init=layers.WEIGHT_INIT,
      rngs=conv_rngs,
  )
  np.testing.assert_array_equal(
      jax.random.key_data(patch_rngs.params()), jax.random.key_data(conv_rngs.params())
  )
  patch_state, conv_state = nnx.state(patch, nnx.Param), nnx.state(conv, nnx.Param)
  assert jax.tree.structure(patch_state) == jax.tree.structure(conv_state)
  for a, b in zip(jax.tree.leaves(patch_state), jax.tree.leaves(conv_state)):
    np.testing.assert_array_equal(a, b)
  conv.bias[...] = jnp.arange(8, dtype=jnp.float32)
  patch.bias[...] = jnp.arange(8, dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 20, 3)), jnp.float32)
  np.testing.assert_allclose(patch(x), conv(x), rtol=1e-5, atol=1e-5)
