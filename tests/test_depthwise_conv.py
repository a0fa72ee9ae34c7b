"""The depthwise convolution's implementations agree with each other, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uem_ich_jax import native
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


def _record_calls(monkeypatch):
  calls = []
  for name, label in (
      ("_depthwise_native", "native"),
      ("_depthwise_shifted", "shifted"),
      ("_depthwise_lax_conv", "conv"),
  ):
    monkeypatch.setattr(layers, name, lambda x, k, label=label: calls.append(label) or x)
  return calls


def test_auto_picks_native_on_cpu(monkeypatch):
  # The suite's conftest sets the override, while users get the C++ kernels.
  monkeypatch.delenv(layers.CPU_DEPTHWISE_VARIABLE, raising=False)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(native, "kernels_ready", lambda: True)
  calls = _record_calls(monkeypatch)
  x, kernel, bias = _inputs((1, 4, 4, 2), (3, 3))
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  layers.depthwise_conv(x, kernel, bias)
  # The kernels take neither bfloat16 maps nor even kernels.
  layers.depthwise_conv(x.astype(jnp.bfloat16), kernel, bias)
  layers.depthwise_conv(x, kernel[:2, :2], bias)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  layers.depthwise_conv(x, kernel, bias)
  assert calls == ["native", "shifted", "shifted", "conv"]


def test_auto_falls_back_to_shifted(monkeypatch):
  monkeypatch.delenv(layers.CPU_DEPTHWISE_VARIABLE, raising=False)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(native, "kernels_ready", lambda: False)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  calls = _record_calls(monkeypatch)
  x, kernel, bias = _inputs((1, 4, 4, 2), (3, 3))
  layers.depthwise_conv(x, kernel, bias)
  assert calls == ["shifted"]


@pytest.mark.parametrize(
    "shape, kernel_size",
    [
        ((2, 9, 11, 5), (7, 7)),  # odd, non-square map; fewer channels than a block
        ((2, 6, 5, 96), (7, 7)),  # one full block of 64 channels and 32 more
        ((1, 3, 3, 4), (7, 7)),  # kernel larger than the map
        ((3, 8, 8, 128), (3, 3)),  # the SegFormer MixFFN's kernel, two full blocks
        ((1, 1, 1, 3), (7, 7)),  # a single pixel: only the centre tap
    ],
)
def test_native_matches_lax_conv(shape, kernel_size):
  x, kernel, bias = _inputs(shape, kernel_size, seed=4)
  target = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def loss(implementation):
    def value(x, kernel, bias):
      y = layers.depthwise_conv(x, kernel, bias, implementation=implementation)
      return jnp.sum((y - target) ** 2), y

    return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2), has_aux=True))(x, kernel, bias)

  (_, conv), conv_grads = loss("conv")
  (_, ours), our_grads = loss("native")
  assert ours.shape == shape
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)
  for name, theirs, mine in zip(("x", "kernel", "bias"), conv_grads, our_grads):
    scale = float(jnp.max(jnp.abs(theirs)))
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_native_kernel_gradient_deterministic():
  # Each thread sums its own rows, and the partial sums are added in a fixed
  # order, so repeated runs must give the same bits.
  x, kernel, bias = _inputs((4, 24, 24, 70), (7, 7), seed=6)
  def loss(kernel):
    return jnp.sum(layers.depthwise_conv(x, kernel, bias, implementation="native") ** 2)

  grad = jax.jit(jax.grad(loss))
  first = np.asarray(grad(kernel))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(grad(kernel)), first)


def test_native_vmap_matches_loop():
  x, kernel, bias = _inputs((2, 6, 6, 8), (7, 7), seed=7)
  stack = jnp.stack([x, 2.0 * x, -x])

  def convolve(images):
    return layers.depthwise_conv(images, kernel, bias, implementation="native")

  batched = jax.vmap(convolve)(stack)
  for index in range(stack.shape[0]):
    np.testing.assert_allclose(batched[index], convolve(stack[index]), rtol=1e-6, atol=1e-6)


def test_native_rejected_on_accelerator(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x, kernel, bias = _inputs((1, 4, 4, 2), (3, 3))
  with pytest.raises(ValueError, match="CPU only"):
    layers.depthwise_conv(x, kernel, bias, implementation="native")


def test_unknown_implementation_is_rejected():
  x, kernel, bias = _inputs((1, 4, 4, 2), (3, 3))
  with pytest.raises(ValueError, match="depthwise implementation"):
    layers.depthwise_conv(x, kernel, bias, implementation="fft")


def test_cpu_override_of_auto(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "conv")
  assert layers.auto_depthwise_implementation() == "conv"
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "shifted")
  assert layers.auto_depthwise_implementation() == "shifted"
  monkeypatch.delenv(layers.CPU_DEPTHWISE_VARIABLE)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert layers.auto_depthwise_implementation() == "native"
  # The C++ kernels are one custom call, which XLA cannot split over devices.
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert layers.auto_depthwise_implementation() == "shifted"
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert layers.auto_depthwise_implementation() == "native"
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "fft")
  with pytest.raises(ValueError, match="UEM_ICH_CPU_DEPTHWISE"):
    layers.auto_depthwise_implementation()
  # Accelerators always use lax.conv.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.auto_depthwise_implementation() == "conv"


def test_portable_kernels_avoid_custom_calls(monkeypatch):
  monkeypatch.setenv(layers.CPU_DEPTHWISE_VARIABLE, "native")
  x, kernel, bias = _inputs((1, 6, 6, 4), (7, 7))

  def program(x):
    return layers.depthwise_conv(x, kernel, bias) + layers.spatial_sum_of_squares(x)

  native_program = jax.jit(lambda x: program(x))
  assert "stablehlo.custom_call" in native_program.lower(x).as_text()
  with layers.portable_kernels():
    exported = jax.export.export(jax.jit(lambda x: program(x)), platforms=("cpu",))(x)
  assert "stablehlo.custom_call" not in exported.mlir_module()
  np.testing.assert_allclose(exported.call(x), native_program(x), rtol=1e-5, atol=1e-5)
