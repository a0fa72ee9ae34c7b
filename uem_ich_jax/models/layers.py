"""Building blocks shared by the encoder and the heads (NHWC throughout)."""

from __future__ import annotations

import contextlib
import os
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax import native

# timm draws conv and linear weights from a normal with std 0.02 cut at +-2 in
# absolute value, which never triggers. JAX's truncated normal cuts at +-2 std
# and rescales so the std is still 0.02; only tests of init statistics notice.
WEIGHT_INIT = nnx.initializers.truncated_normal(stddev=0.02)
ZEROS = nnx.initializers.zeros_init()

# ConvNeXt's LayerNorm epsilon (timm and the official code).
LAYER_NORM_EPSILON = 1e-6

# The constant timm adds to the channel mean in GRN's divisor.
GRN_EPSILON = 1e-6


def zero_masked(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Set `x` to exactly 0 wherever `mask` is 0, keeping the values elsewhere.

  `mask` is a (N, H, W, 1) map of 0 and 1 (or bool) that broadcasts over the
  channels. A select, not a product, so inf or NaN under the mask also become 0.
  """
  return jnp.where(mask > 0, x, jnp.zeros((), x.dtype))


def gelu(x: jax.Array) -> jax.Array:
  """Apply the exact (erf) GELU, as PyTorch's `nn.GELU()` does by default."""
  return jax.nn.gelu(x, approximate=False)


def layer_norm(
    features: int,
    *,
    epsilon: float = LAYER_NORM_EPSILON,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
  """Build a channel LayerNorm with two-pass variance, as PyTorch computes it.

  Flax takes the statistics in float32 even when `dtype` is bfloat16.
  """
  return nnx.LayerNorm(
      features,
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      rngs=rngs,
  )


def batch_norm(
    features: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs
) -> nnx.BatchNorm:
  """Build a BatchNorm with PyTorch's defaults (momentum 0.1, epsilon 1e-5), in evaluation mode.

  Flax's `momentum` is the decay, 1 minus PyTorch's. `.train()` switches it to
  batch statistics.
  """
  # TODO: in training Flax updates the running variance with the biased batch
  # variance and PyTorch with the unbiased one (larger by n / (n - 1), n the
  # positions per channel), so statistics fine-tuned here drift from PyTorch's.
  return nnx.BatchNorm(
      features,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      use_running_average=True,
      rngs=rngs,
  )


def linear(
    in_features: int,
    out_features: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """Build a Linear layer (also used for 1x1 convs) with ConvNeXt's init."""
  return nnx.Linear(
      in_features,
      out_features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=WEIGHT_INIT,
      bias_init=ZEROS,
      rngs=rngs,
  )


def patch_conv(
    in_features: int, out_features: int, size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
) -> "PatchConv":
  """Create the non-overlapping size x size, stride-size convolution of the stem and downsampling."""
  return PatchConv(in_features, out_features, size, dtype=dtype, rngs=rngs)


class PatchConv(nnx.Module):
  """Convolution with a size x size kernel and stride `size`, no padding: one product per patch.

  The parameters are those of `nnx.Conv` (`kernel` (size, size, in, out) HWIO
  and `bias`), so checkpoints and weight conversion see no difference. On CPU
  each patch is flattened and multiplied with the flattened kernel. The
  windows do not overlap, so that is the same sum, and its gradients are
  matrix products too. XLA's CPU gradient of the strided convolution took
  1.6x as long for the 2x2 downsampling of tiny at 384 px (96 to 192
  channels, batch 4). Other backends use `lax.conv_general_dilated`.
  """

  def __init__(
      self, in_features: int, out_features: int, size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    self.kernel = nnx.Param(WEIGHT_INIT(rngs.params(), (size, size, in_features, out_features), jnp.float32))
    # A key for the zero bias too, as nnx.Conv draws one: every later layer of
    # a model then gets the same initial values as with nnx.Conv.
    self.bias = nnx.Param(ZEROS(rngs.params(), (out_features,), jnp.float32))
    self.size = size
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    if jax.default_backend() == "cpu":
      y = patch_product(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(
          x,
          kernel,
          window_strides=(self.size, self.size),
          padding="VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    return y + self.bias[...].astype(self.dtype)


def patch_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Apply a (s, s, C, D) kernel with stride s to NHWC `x` as flattened patches times the flattened kernel.

  Rows and columns beyond the last whole patch are dropped, as VALID padding does.
  """
  size, _, channels, _ = kernel.shape
  batch, rows, columns, _ = x.shape
  rows, columns = rows // size, columns // size
  x = x[:, : rows * size, : columns * size, :]
  patches = x.reshape(batch, rows, size, columns, size, channels).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(batch, rows, columns, size * size * channels)
  return patches @ kernel.reshape(size * size * channels, -1)


# Ways to compute a depthwise convolution; see `depthwise_conv`.
DEPTHWISE_IMPLEMENTATIONS = ("auto", "conv", "shifted", "native")
# Environment variable naming what "auto" picks on CPU ("conv", "shifted" or
# "native"), on one device or several.
CPU_DEPTHWISE_VARIABLE = "UEM_ICH_CPU_DEPTHWISE"


_portable = threading.local()


@contextlib.contextmanager
def portable_kernels():
  """Trace without the C++ CPU kernels inside this block, for programs that leave the process.

  `jax.export` rejects custom calls that have no compatibility guarantee, and
  another process would lack the kernels anyway. Inside the block "auto"
  gives the shifted sum where it would give "native". jit's cache does not
  know of the block: trace a function object that was not traced outside it.
  """
  previous = getattr(_portable, "active", False)
  _portable.active = True
  try:
    yield
  finally:
    _portable.active = previous


def auto_depthwise_implementation() -> str:
  """Return what "auto" means here: "native" on one CPU device, "shifted" on several, else "conv".

  On CPU, `UEM_ICH_CPU_DEPTHWISE` ("conv", "shifted" or "native") overrides
  the choice. `depthwise_conv` still falls back from "native" to "shifted"
  where the C++ kernels cannot run.
  """
  if jax.default_backend() != "cpu":
    return "conv"
  choice = os.environ.get(CPU_DEPTHWISE_VARIABLE) or None
  if getattr(_portable, "active", False) and choice in (None, "native"):
    return "shifted"
  if choice is None:
    # TODO: XLA cannot split a custom call over a mesh, so on several CPU
    # devices the C++ kernels would gather the whole batch onto each device.
    # Partitioning rules (jax.experimental.custom_partitioning) would fix it.
    return "native" if jax.device_count() == 1 else "shifted"
  if choice not in ("conv", "shifted", "native"):
    raise ValueError(
        f"invalid {CPU_DEPTHWISE_VARIABLE}={choice!r}: set it to 'conv', 'shifted' or 'native',"
        " or unset it"
    )
  return choice


def _depthwise_lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1, 1),
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1],
  )


def _same_padding(kernel_rows: int, kernel_columns: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # SAME padding as lax: the odd pixel of an even kernel's padding goes last.
  top, left = (kernel_rows - 1) // 2, (kernel_columns - 1) // 2
  return (top, kernel_rows - 1 - top), (left, kernel_columns - 1 - left)


def _shifted_sum(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  """Sum kh * kw shifted copies of the padded input, each times one kernel tap.

  XLA fuses the sum into one loop over the output, on CPU many times faster
  than its grouped convolution (see experiments/bench_depthwise.py).
  """
  kernel_rows, kernel_columns = kernel.shape[:2]
  rows, columns = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  taps = kernel[:, :, 0, :]
  y = padded[:, :rows, :columns, :] * taps[0, 0]
  for i in range(kernel_rows):
    for j in range(kernel_columns):
      if i or j:
        y = y + padded[:, i : i + rows, j : j + columns, :] * taps[i, j]
  return y


# Output rows per step of the kernel gradient's loop: a tile of a few rows
# stays in cache while all kh * kw taps are summed over it.
_KERNEL_GRADIENT_ROWS = 4


def _shifted_kernel_gradient(padded: jax.Array, grad: jax.Array) -> jax.Array:
  """Return d(loss)/d(kernel) (kh, kw, 1, C) from the padded input and the output gradient.

  Tap (i, j) is the sum over batch and positions of padded[h + i, w + j] *
  grad[h, w]. Summed over whole maps, each of the kh * kw products would read
  both arrays from memory. A loop over row tiles keeps them in cache instead.
  """
  _, padded_rows, padded_columns, channels = padded.shape
  rows, columns = grad.shape[1:3]
  kernel_rows, kernel_columns = padded_rows - rows + 1, padded_columns - columns + 1
  tile = _KERNEL_GRADIENT_ROWS if rows % _KERNEL_GRADIENT_ROWS == 0 else 1

  def add_tile(total, index):
    start = index * tile
    window = jax.lax.dynamic_slice_in_dim(padded, start, tile + kernel_rows - 1, axis=1)
    grad_tile = jax.lax.dynamic_slice_in_dim(grad, start, tile, axis=1)
    taps = [
        [
            jnp.sum(
                (window[:, i : i + tile, j : j + columns, :] * grad_tile).astype(jnp.float32),
                axis=(0, 1, 2),
            )
            for j in range(kernel_columns)
        ]
        for i in range(kernel_rows)
    ]
    return total + jnp.stack([jnp.stack(row) for row in taps]), None

  zeros = jnp.zeros((kernel_rows, kernel_columns, channels), jnp.float32)
  total, _ = jax.lax.scan(add_tile, zeros, jnp.arange(rows // tile))
  return total[:, :, None, :]


@jax.custom_vjp
def _depthwise_shifted(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise SAME convolution as a shifted sum, with a hand-written backward pass.

  Differentiating the shifted sum directly gave a backward pass about 15x
  slower than the forward one on CPU (measured at stage 1 of tiny at 384 px),
  most of it in the kernel gradient.
  """
  return _shifted_sum(x, kernel, _same_padding(*kernel.shape[:2]))


def _depthwise_shifted_forward(x, kernel):
  return _depthwise_shifted(x, kernel), (x, kernel)


def _depthwise_shifted_backward(residuals, grad):
  x, kernel = residuals
  (top, bottom), (left, right) = padding = _same_padding(*kernel.shape[:2])
  # The input gradient correlates the output gradient with the kernel turned
  # by 180 degrees, padded on the opposite sides.
  grad_x = _shifted_sum(grad, kernel[::-1, ::-1], ((bottom, top), (right, left)))
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  grad_kernel = _shifted_kernel_gradient(padded, grad).astype(kernel.dtype)
  return grad_x, grad_kernel


_depthwise_shifted.defvjp(_depthwise_shifted_forward, _depthwise_shifted_backward)


@jax.custom_vjp
def _depthwise_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Convolve depthwise with SAME padding by the C++ kernels of `uem_ich_jax.native`.

  Takes float32 maps and odd square kernels.
  """
  return native.depthwise_forward(x, kernel[:, :, 0, :])


def _depthwise_native_forward(x, kernel):
  return _depthwise_native(x, kernel), (x, kernel)


def _depthwise_native_backward(residuals, grad):
  x, kernel = residuals
  # With odd kernels the padding is the same on every side, so the input
  # gradient is the forward pass with the kernel turned by 180 degrees.
  grad_x = native.depthwise_forward(grad, kernel[::-1, ::-1, 0, :])
  grad_kernel = native.depthwise_kernel_gradient(x, grad, kernel.shape[0])
  return grad_x, grad_kernel[:, :, None, :]


_depthwise_native.defvjp(_depthwise_native_forward, _depthwise_native_backward)


def _native_fits(x: jax.Array, kernel: jax.Array) -> bool:
  rows, columns = kernel.shape[:2]
  return x.dtype == jnp.float32 and rows == columns and rows % 2 == 1


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, *, implementation: str = "auto"
) -> jax.Array:
  """Convolve each channel of NHWC `x` with its own kernel, SAME padding, stride 1.

  Every depthwise convolution in the models goes through this function. The
  three implementations give the same values up to float rounding:

  - "conv" is `lax.conv_general_dilated` with one group per channel, fast where
    the accelerator's convolution library is (cuDNN, the TPU).
  - "shifted" sums shifted multiply-adds, which XLA's CPU backend runs far
    faster than its grouped convolution.
  - "native" calls the C++ CPU kernels of `uem_ich_jax.native`, faster still.
    They take float32 and odd square kernels, and "shifted" is used otherwise.

  "auto" picks "native" on one CPU device, "shifted" on several and "conv" on
  accelerators (see `auto_depthwise_implementation`). It falls back to
  "shifted" when the kernels cannot be built, and logs a warning once.

  Args:
    x: (N, H, W, C).
    kernel: (kh, kw, 1, C), HWIO with one input channel per group.
    bias: (C,).
    implementation: one of `DEPTHWISE_IMPLEMENTATIONS`.
  """
  if implementation not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(
        f"depthwise implementation must be one of {DEPTHWISE_IMPLEMENTATIONS}, got {implementation!r}"
    )
  if implementation == "auto":
    implementation = auto_depthwise_implementation()
    if implementation == "native" and not native.kernels_ready():
      implementation = "shifted"
  elif implementation == "native":
    if jax.default_backend() != "cpu":
      raise ValueError(
          f"invalid depthwise implementation 'native' on {jax.default_backend()}: it runs on"
          " CPU only, so use 'auto' or 'conv'"
      )
    native.ensure_kernels()
  kernel = kernel.astype(x.dtype)
  if implementation == "native" and not _native_fits(x, kernel):
    implementation = "shifted"
  if implementation == "native":
    y = _depthwise_native(x, kernel)
  elif implementation == "shifted":
    y = _depthwise_shifted(x, kernel)
  else:
    y = _depthwise_lax_conv(x, kernel)
  return y + bias.astype(x.dtype)


class DepthwiseConv(nnx.Module):
  """Depthwise convolution with bias; the parameters of `depthwise_conv`."""

  def __init__(
      self,
      channels: int,
      kernel_size: int = 7,
      *,
      dtype: jnp.dtype = jnp.float32,
      implementation: str = "auto",
      rngs: nnx.Rngs,
  ):
    if implementation not in DEPTHWISE_IMPLEMENTATIONS:
      raise ValueError(
          f"depthwise implementation must be one of {DEPTHWISE_IMPLEMENTATIONS}, got {implementation!r}"
      )
    self.kernel = nnx.Param(WEIGHT_INIT(rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.dtype = dtype
    self.implementation = implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    return depthwise_conv(
        x.astype(self.dtype), self.kernel[...], self.bias[...], implementation=self.implementation
    )


@jax.custom_vjp
def _native_sum_of_squares(x: jax.Array) -> jax.Array:
  return native.spatial_sum_of_squares(x)[:, None, None, :]


def _native_sum_of_squares_forward(x):
  return _native_sum_of_squares(x), x


def _native_sum_of_squares_backward(x, grad):
  return (2.0 * x * grad,)


_native_sum_of_squares.defvjp(_native_sum_of_squares_forward, _native_sum_of_squares_backward)


def spatial_sum_of_squares(x: jax.Array) -> jax.Array:
  """Return the (N, 1, 1, C) sums over rows and columns of the squares of NHWC `x`.

  Where the depthwise convolutions run the C++ kernels (see
  `auto_depthwise_implementation`), so does this sum for float32 `x`.
  """
  if (
      x.dtype == jnp.float32
      and auto_depthwise_implementation() == "native"
      and native.kernels_ready()
  ):
    return _native_sum_of_squares(x)
  return jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True)


class GRN(nnx.Module):
  """Global response normalisation (ConvNeXt-V2), computed as timm does.

  For each sample and channel, G is the L2 norm over H and W with no epsilon
  inside the root, N = G / (mean of G over channels + 1e-6), and the output is
  gamma * x * N + beta + x. The root is taken only where the sum of squares is
  positive, so an all-zero channel (or image) gives G = 0 with a zero gradient
  instead of NaN; that equals PyTorch's norm backward at zero. The statistics and
  the output are computed in float32 and cast back to `dtype`.

  With a `mask` (N, H, W, 1), masked positions are zeroed before the sums, so G
  covers visible positions only. N is a ratio of such norms, so it needs no count
  of visible positions. The output is zeroed at masked positions, where beta
  would otherwise refill them.
  """

  def __init__(self, channels: int, *, dtype: jnp.dtype = jnp.float32):
    self.gamma = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.beta = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if mask is not None:
      x32 = zero_masked(x32, mask)
    sum_of_squares = spatial_sum_of_squares(x32)
    positive = sum_of_squares > 0
    safe_sum = jnp.where(positive, sum_of_squares, 1.0)
    norm = jnp.where(positive, jnp.sqrt(safe_sum), 0.0)
    ratio = norm / (jnp.mean(norm, axis=-1, keepdims=True) + GRN_EPSILON)
    y = self.gamma[...] * (x32 * ratio) + self.beta[...] + x32
    if mask is not None:
      y = zero_masked(y, mask)
    return y.astype(self.dtype)


def drop_path(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
  """Build per-sample stochastic depth for NHWC residual branches.

  One keep/drop draw per sample, survivors scaled by 1 / (1 - rate). It starts
  in evaluation mode (identity); `model.train()` turns it on.
  """
  return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=True, rngs=rngs)
