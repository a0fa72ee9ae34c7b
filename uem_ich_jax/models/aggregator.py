"""The upstream UEM-ICH scan aggregator: a transformer over the tokens of every slice.

Each slice's (h, w, C) feature map becomes h * w tokens, ordered slice, then
row, then column. A fixed 3D sinusoidal encoding is added, and a stack of pre-LN
transformer encoder layers (PyTorch `nn.TransformerEncoderLayer` with
`norm_first=True`, ReLU FFN) runs with a key-padding mask that hides padded
slices. A final LayerNorm follows, and the pooled output is the mean over the
tokens of the real slices.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models import layers

# PyTorch's LayerNorm epsilon, which the upstream layers keep.
LAYER_NORM_EPSILON = 1e-5
# The state-dict buffer that contains the positional encoding. Loading checks it but does not copy it.
POSITIONAL_ENCODING_KEY = "pos_encoding.pe"


def positional_encoding(max_slices: int, height: int, width: int, dim: int) -> np.ndarray:
  """Build the fixed (max_slices, height, width, dim) sinusoidal encoding.

  Channel c uses frequency w_k = 10000 ** (-6 k / dim) with k = c // 6, and
  c % 6 selects the term: 0 and 1 are sin and cos of slice * w_k, 2 and 3 of
  row * w_k, 4 and 5 of column * w_k.

  Raises:
    InputError: if `dim` is not a positive multiple of 6 or a size is not positive.
  """
  if dim <= 0 or dim % 6:
    raise InputError(f"positional encoding dim is {dim}, expected a positive multiple of 6")
  for name, size in (("max_slices", max_slices), ("height", height), ("width", width)):
    if size <= 0:
      raise InputError(f"positional encoding {name} is {size}, expected a positive size")

  k = np.arange(dim // 6, dtype=np.float64)
  omega = 10000.0 ** (-6.0 * k / dim)  # (dim // 6,)
  slices = np.arange(max_slices, dtype=np.float64)[:, None, None, None]
  rows = np.arange(height, dtype=np.float64)[None, :, None, None]
  cols = np.arange(width, dtype=np.float64)[None, None, :, None]
  shape = (max_slices, height, width, dim // 6)
  terms = [
      np.broadcast_to(np.sin(slices * omega), shape),
      np.broadcast_to(np.cos(slices * omega), shape),
      np.broadcast_to(np.sin(rows * omega), shape),
      np.broadcast_to(np.cos(rows * omega), shape),
      np.broadcast_to(np.sin(cols * omega), shape),
      np.broadcast_to(np.cos(cols * omega), shape),
  ]
  # Stacking on a new last axis and flattening gives channel 6 k + term.
  encoding = np.stack(terms, axis=-1).reshape(max_slices, height, width, dim)
  return encoding.astype(np.float32)


class SelfAttention(nnx.Module):
  """Multi-head self-attention laid out like PyTorch's `nn.MultiheadAttention`.

  One (d, 3d) input projection yields q, k and v, in that order along the
  output axis. Scores and softmax are computed in float32, and masked keys get
  -inf before the softmax.
  """

  def __init__(
      self, dim: int, num_heads: int, *, dropout: float, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    self.num_heads = num_heads
    self.dtype = dtype
    self.in_proj = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.out_proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Attend over `x` (B, T, d), with `key_mask` (B, T) True for keys that may be attended."""
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = self.in_proj(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, Dh)

    # TODO: the full (B, H, T, T) float32 score matrix is built. At the upstream size
    # (64 slices of 12 x 12 tokens, 8 heads) that is about 2.7 GB per scan, so long
    # scans need a chunked or fused attention kernel.
    scores = jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)
    ) / np.sqrt(head_dim)
    # NOTE: a batch element with no real slice has every key masked, so its
    # softmax is NaN, as in PyTorch. Callers must pass at least one real slice.
    scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = self.dropout(weights)

    context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v.astype(self.dtype))
    return self.out_proj(context.reshape(batch, tokens, dim))


class EncoderLayer(nnx.Module):
  """A pre-LN transformer encoder layer: x + attn(norm1(x)), then x + ffn(norm2(x))."""

  def __init__(
      self,
      dim: int,
      num_heads: int,
      dim_feedforward: int,
      *,
      dropout: float,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    self.self_attn = SelfAttention(dim, num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
    self.linear1 = nnx.Linear(
        dim, dim_feedforward, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )
    self.linear2 = nnx.Linear(
        dim_feedforward, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )
    self.norm1 = layers.layer_norm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
    self.norm2 = layers.layer_norm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
    # The same three dropout sites as PyTorch: after attention, inside the FFN, after the FFN.
    self.dropout1 = nnx.Dropout(dropout, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dropout2 = nnx.Dropout(dropout, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Update the float32 residual stream `x` (B, T, d)."""
    attended = self.self_attn(self.norm1(x).astype(self.dtype), key_mask)
    x = x + self.dropout1(attended).astype(jnp.float32)

    hidden = jax.nn.relu(self.linear1(self.norm2(x).astype(self.dtype)))
    ffn = self.linear2(self.dropout(hidden))
    return x + self.dropout2(ffn).astype(jnp.float32)


class ScanAggregator(nnx.Module):
  """Aggregate per-slice feature maps of one scan into a pooled vector and refined maps.

  The residual stream, LayerNorms and softmax stay in float32, and the linear
  layers compute in `dtype`. Dropout is active only when the module is in training mode
  (`model.train()`); call `model.eval()` for inference.
  """

  def __init__(
      self,
      feature_dim: int,
      num_heads: int,
      num_layers: int,
      dim_feedforward: int,
      max_slices: int,
      spatial_size: int,
      *,
      dropout: float = 0.1,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if num_heads <= 0 or feature_dim % num_heads:
      raise InputError(
          f"feature_dim {feature_dim} is not divisible by num_heads {num_heads}, "
          "expected a positive head count that divides feature_dim"
      )
    if num_layers <= 0:
      raise InputError(f"num_layers is {num_layers}, expected at least 1")
    self.feature_dim = feature_dim
    self.max_slices = max_slices
    self.spatial_size = spatial_size
    self.pos_encoding = nnx.Variable(
        jnp.asarray(positional_encoding(max_slices, spatial_size, spatial_size, feature_dim))
    )
    self.layers = nnx.List([
        EncoderLayer(
            feature_dim, num_heads, dim_feedforward, dropout=dropout, dtype=dtype, rngs=rngs
        )
        for _ in range(num_layers)
    ])
    self.norm = layers.layer_norm(feature_dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)

  def __call__(self, features: jax.Array, slice_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return (pooled (B, C), spatial (B, S, h, w, C)) for `features` (B, S, h, w, C).

    `slice_mask` (B, S) is True (or 1) for real slices. Padded slices are hidden
    as keys and left out of the pooled mean, and their spatial outputs carry no
    meaning. Every batch element needs at least one real slice.

    Raises:
      InputError: if the shapes do not fit the configured sizes.
    """
    if features.ndim != 5:
      raise InputError(f"features have shape {features.shape}, expected (B, S, h, w, C)")
    batch, slices, height, width, channels = features.shape
    expected_map = (self.spatial_size, self.spatial_size, self.feature_dim)
    if (height, width, channels) != expected_map:
      raise InputError(
          f"per-slice features have shape {(height, width, channels)}, expected {expected_map}"
      )
    if slices > self.max_slices:
      raise InputError(f"{slices} slices exceed max_slices {self.max_slices}")
    if slice_mask.shape != (batch, slices):
      raise InputError(f"slice_mask has shape {slice_mask.shape}, expected {(batch, slices)}")

    x = features.astype(jnp.float32) + self.pos_encoding[...][:slices]
    tokens_per_slice = height * width
    x = x.reshape(batch, slices * tokens_per_slice, channels)
    real = slice_mask.astype(bool)
    key_mask = jnp.repeat(real, tokens_per_slice, axis=1)  # (B, S * h * w), slice-major order

    for layer in self.layers:
      x = layer(x, key_mask)
    x = self.norm(x)

    weights = key_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x * weights, axis=1) / jnp.sum(weights, axis=1)
    spatial = x.reshape(batch, slices, height, width, channels)
    return pooled, spatial


def _linear_targets(prefix: str, linear: nnx.Linear) -> dict[str, tuple[nnx.Param, bool]]:
  """Map `prefix.weight` and `prefix.bias` to the layer's (param, transpose) pairs."""
  return {f"{prefix}.weight": (linear.kernel, True), f"{prefix}.bias": (linear.bias, False)}


def _norm_targets(prefix: str, norm: nnx.LayerNorm) -> dict[str, tuple[nnx.Param, bool]]:
  return {f"{prefix}.weight": (norm.scale, False), f"{prefix}.bias": (norm.bias, False)}


def parameter_map(model: ScanAggregator) -> dict[str, tuple[nnx.Param, bool]]:
  """Return the PyTorch key -> (parameter, whether the (out, in) weight is transposed) map."""
  targets: dict[str, tuple[nnx.Param, bool]] = {}
  for index, layer in enumerate(model.layers):
    prefix = f"transformer.layers.{index}"
    attention = layer.self_attn
    targets[f"{prefix}.self_attn.in_proj_weight"] = (attention.in_proj.kernel, True)
    targets[f"{prefix}.self_attn.in_proj_bias"] = (attention.in_proj.bias, False)
    targets.update(_linear_targets(f"{prefix}.self_attn.out_proj", attention.out_proj))
    targets.update(_linear_targets(f"{prefix}.linear1", layer.linear1))
    targets.update(_linear_targets(f"{prefix}.linear2", layer.linear2))
    targets.update(_norm_targets(f"{prefix}.norm1", layer.norm1))
    targets.update(_norm_targets(f"{prefix}.norm2", layer.norm2))
  targets.update(_norm_targets("norm", model.norm))
  return targets


def _torch_shape(param: nnx.Param, transposed: bool) -> tuple[int, ...]:
  shape = tuple(param[...].shape)
  return shape[::-1] if transposed else shape


def load_torch_state(model: ScanAggregator, state: Mapping[str, np.ndarray]) -> None:
  """Copy an upstream PyTorch state dict (as numpy arrays) into `model` in place.

  Every parameter must be present with its PyTorch shape, and no other key is
  accepted. The `pos_encoding.pe` buffer is optional; when present, it must
  equal the encoding this module computes (to 1e-5), and it is not loaded.
  Otherwise nothing is written and one InputError lists every problem.
  """
  targets = parameter_map(model)
  provided = {k: v for k, v in state.items() if k != POSITIONAL_ENCODING_KEY}
  missing = sorted(set(targets) - set(provided))
  unexpected = sorted(set(provided) - set(targets))
  problems = []
  if missing:
    problems.append(f"missing keys: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {', '.join(unexpected)}")

  wrong_shapes = []
  for key in sorted(set(targets) & set(provided)):
    expected = _torch_shape(*targets[key])
    if tuple(np.shape(provided[key])) != expected:
      wrong_shapes.append(f"{key} has shape {tuple(np.shape(provided[key]))}, expected {expected}")
  if wrong_shapes:
    problems.append(f"wrong shapes: {'; '.join(wrong_shapes)}")

  if POSITIONAL_ENCODING_KEY in state:
    stored = np.asarray(state[POSITIONAL_ENCODING_KEY])
    computed = np.asarray(model.pos_encoding[...])
    if stored.shape != computed.shape:
      problems.append(
          f"{POSITIONAL_ENCODING_KEY} has shape {stored.shape}, expected {computed.shape}"
      )
    elif not np.allclose(stored, computed, atol=1e-5, rtol=0.0):
      difference = float(np.max(np.abs(stored - computed)))
      problems.append(
          f"{POSITIONAL_ENCODING_KEY} differs from the computed encoding by up to {difference:.3g}"
      )

  if problems:
    raise InputError(
        "state dict does not fit the scan aggregator: "
        + " | ".join(problems)
        + " (check feature_dim, num_layers, dim_feedforward, max_slices and spatial_size"
        " against the checkpoint)"
    )

  for key, (param, transposed) in targets.items():
    value = np.asarray(provided[key], dtype=np.float32)
    param[...] = jnp.asarray(value.T if transposed else value)
