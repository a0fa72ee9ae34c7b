"""Coordinate attention (Hou, Zhou and Feng, CVPR 2021) as the upstream UEM-ICH uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax.models import layers


def hidden_channels(channels: int, reduction: int = 32, min_channels: int = 8) -> int:
  """Return the width m of the shared 1x1 conv: max(min_channels, channels // reduction)."""
  return max(min_channels, channels // reduction)


class CoordinateAttention(nnx.Module):
  """Reweight an NHWC map by one attention vector per row and one per column.

  The map is averaged along W (one vector per row) and along H (one per column),
  the two strips are concatenated and go through a shared 1x1 conv C -> m with
  bias, BatchNorm and SiLU; they are split again, and two 1x1 convs m -> C with
  sigmoid give a_h and a_w. The output is x * a_h * a_w, with no residual.

  The norm is BatchNorm with running statistics, because the upstream checkpoints
  carry them (PyTorch defaults: momentum 0.1, epsilon 1e-5). Its statistics are
  over the batch and the H + W strip positions. Under `jax.jit` with a
  batch-sharded `NamedSharding`, that mean is a global mean because XLA inserts
  the all-reduce. So training on a data mesh needs no `axis_name`. Only inside
  `shard_map` must `axis_name` name the batch axis.

  Pooling, BatchNorm and the sigmoids are computed in float32; the 1x1 convs and
  the output use `dtype`.

  With a visible `mask` (SparK masking), each strip mean averages the visible
  positions of its row or column only (0 when none is visible), and training
  BatchNorm statistics cover only strips with at least one visible position.
  Masked positions of `x` are zeroed first, so they stay 0 in the output.
  """

  def __init__(
      self,
      channels: int,
      *,
      reduction: int = 32,
      min_channels: int = 8,
      dtype: jnp.dtype = jnp.float32,
      axis_name: str | None = None,
      rngs: nnx.Rngs,
  ):
    hidden = hidden_channels(channels, reduction, min_channels)
    self.dtype = dtype
    self.conv1 = layers.linear(channels, hidden, dtype=dtype, rngs=rngs)
    # NOTE: Flax updates the running variance with the biased batch variance,
    # PyTorch with the unbiased one (factor n / (n - 1), n = batch * (H + W)).
    # Evaluation with loaded statistics is identical, but training drifts.
    self.bn1 = nnx.BatchNorm(
        hidden,
        momentum=0.9,
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        use_running_average=True,
        axis_name=axis_name,
        rngs=rngs,
    )
    self.conv_h = layers.linear(hidden, channels, dtype=dtype, rngs=rngs)
    self.conv_w = layers.linear(hidden, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Reweight `x` (N, H, W, C), with `mask` None or the (N, H, W, 1) visible map (0/1 or bool)."""
    height = x.shape[1]
    x32 = x.astype(jnp.float32)
    if mask is None:
      pooled_h = jnp.mean(x32, axis=2)  # (N, H, C): one vector per row
      pooled_w = jnp.mean(x32, axis=1)  # (N, W, C): one vector per column
      strip_visible = None
    else:
      x32 = layers.zero_masked(x32, mask)
      visible = (mask > 0).astype(jnp.float32)
      count_h = jnp.sum(visible, axis=2)  # (N, H, 1)
      count_w = jnp.sum(visible, axis=1)  # (N, W, 1)
      # A strip with no visible position has a zero sum, so dividing it by 1
      # keeps its mean at 0 and its gradient finite.
      pooled_h = jnp.sum(x32, axis=2) / jnp.maximum(count_h, 1.0)
      pooled_w = jnp.sum(x32, axis=1) / jnp.maximum(count_w, 1.0)
      strip_visible = jnp.concatenate([count_h, count_w], axis=1) > 0
      # NOTE: a batch with no visible position at all would give BatchNorm an
      # empty mask and NaN statistics. It then counts every strip, which only
      # carry conv1's bias, so the running statistics stay finite.
      strip_visible = strip_visible | ~jnp.any(strip_visible)
    strips = jnp.concatenate([pooled_h, pooled_w], axis=1).astype(self.dtype)

    hidden = self.conv1(strips)
    hidden = jax.nn.silu(self.bn1(hidden.astype(jnp.float32), mask=strip_visible))
    hidden = hidden.astype(self.dtype)
    hidden_h, hidden_w = hidden[:, :height], hidden[:, height:]

    attention_h = jax.nn.sigmoid(self.conv_h(hidden_h).astype(jnp.float32))
    attention_w = jax.nn.sigmoid(self.conv_w(hidden_w).astype(jnp.float32))
    y = x32 * attention_h[:, :, None, :] * attention_w[:, None, :, :]
    return y.astype(self.dtype)
