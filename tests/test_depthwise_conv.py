"""The depthwise convolution's implementations agree with each other, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uem_ich_jax.models import layers


def _inputs(shape, kernel_size, seed=0):
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(*kernel_size, 1, channels)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(channels,)), jnp.float32)
  return x, kernel, bias


@pytest.mark.parametrize(
    "shape, kernel_size",
    [
        ((2, 9, 11, 5), (7, 7)),  # ConvNeXt's kernel on an odd, non-square map
        ((1, 3, 3, 4), (7, 7)),  # kernel larger than the map: mostly padding
        ((2, 8, 8, 3), (3, 3)),  # the SegFormer MixFFN's kernel
        ((1, 6, 7, 2), (2, 4)),  # even kernels put their extra padding last
    ],
)
def test_shifted_equals_lax_conv(shape, kernel_size):
  x, kernel, bias = _inputs(shape, kernel_size)
  conv = layers.depthwise_conv(x, kernel, bias, implementation="conv")
  shifted = layers.depthwise_conv(x, kernel, bias, implementation="shifted")
  assert shifted.shape == shape
  np.testing.assert_allclose(shifted, conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, kernel_size",
    [
        ((2, 10, 10, 6), (7, 7)),  # rows not a multiple of the gradient's row tile
        ((2, 12, 9, 6), (7, 7)),  # rows in tiles of 4
        ((1, 3, 3, 4), (7, 7)),  # kernel larger than the map
        ((1, 8, 7, 2), (2, 4)),  # even kernels pad unevenly
    ],
)
def test_shifted_gradients_equal_lax_conv(shape, kernel_size):
  x, kernel, bias = _inputs(shape, kernel_size, seed=1)
  target = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def loss(implementation):
    def value(x, kernel, bias):
      y = layers.depthwise_conv(x, kernel, bias, implementation=implementation)
      return jnp.sum((y - target) ** 2)

    return jax.grad(value, argnums=(0, 1, 2))(x, kernel, bias)

  for conv, shifted in zip(loss("conv"), loss("shifted")):
    np.testing.assert_allclose(shifted, conv, rtol=1e-4, atol=1e-4)


def test_shifted_in_bfloat16_stays_close():
  x, kernel, bias = _inputs((1, 12, 12, 8), (7, 7), seed=3)
  reference = layers.depthwise_conv(x, kernel, bias, implementation="conv")
  low = layers.depthwise_conv(x.astype(jnp.bfloat16), kernel, bias, implementation="shifted")
  assert low.dtype == jnp.bfloat16
  # bfloat16 keeps 8 bits of mantissa; 49 taps of unit-scale terms.
  np.testing.assert_allclose(np.asarray(low, np.float32), reference, atol=0.25)


def test_auto_picks_shifted_on_cpu(monkeypatch):
  # The suite's conftest sets the override; users get the shifted form.
  monkeypatch.delenv(layers.CPU_DEPTHWISE_VARIABLE, raising=False)
  calls = []
  monkeypatch.setattr(layers, "_depthwise_shifted", lambda x, k: calls.append("shifted") or x)
  monkeypatch.setattr(layers, "_depthwise_lax_conv", lambda x, k: calls.append("conv") or x)
  x, kernel, bias = _inputs((1, 4, 4, 2), (3, 3))
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  layers.depthwise_conv(x, kernel, bias)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  layers.depthwise_conv(x, kernel, bias)
  assert calls == ["shifted", "conv"]


def test_unknown_implementation_is_rejected():
  x, kernel, bias = _inputs((1, 4, 4, 2), (3, 3))
  with pytest.raises(ValueError, match="depthwise implementation"):
    layers.depthwise_conv(x, kernel, bias, implementation="fft")


def test_cpu_override_of_auto(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "conv")
  assert layers.auto_depthwise_implementation() == "conv"
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "fft")
  with pytest.raises(ValueError, match="UEM_ICH_CPU_DEPTHWISE"):
    layers.auto_depthwise_implementation()
  # Accelerators always use lax.conv.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.auto_depthwise_implementation() == "conv"
