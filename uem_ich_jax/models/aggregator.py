"""The upstream UEM-ICH scan aggregator: a transformer over the tokens of every slice.

Each slice's (h, w, C) feature map becomes h * w tokens, ordered slice, then
row, then column. A fixed 3D sinusoidal encoding is added, and a stack of pre-LN
transformer encoder layers (PyTorch `nn.TransformerEncoderLayer` with
`norm_first=True`, ReLU FFN) runs with a key-padding mask that hides padded
slices. A final LayerNorm follows, and the pooled output is the mean over the
tokens of the real slices. `ScanHead` maps that pooled vector to scan labels.
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
  output axis. Without attention dropout (eval mode, or a rate of 0) the
  attention runs through `jax.nn.dot_product_attention`, where
  `implementation="cudnn"` selects NVIDIA's fused kernel (None means XLA in
  jax 0.10.2). `jax.nn.dot_product_attention` has no dropout, so in training
  with a nonzero rate the scores, softmax and dropout are written out. Either
  way logits and softmax are float32 on the XLA path.

  `attention_chunk` > 0 processes the queries in chunks of that many tokens
  with `lax.map`, and each chunk is rematerialised in the backward pass. The
  score memory is then O(T * chunk) instead of O(T^2), in the forward and the
  backward pass, for the same outputs.
  """

  def __init__(
      self,
      dim: int,
      num_heads: int,
      *,
      dropout: float,
      dtype: jnp.dtype,
      attention_chunk: int = 0,
      implementation: str | None = None,
      rngs: nnx.Rngs,
  ):
    self.num_heads = num_heads
    self.dtype = dtype
    self.attention_chunk = attention_chunk
    self.implementation = implementation
    self.in_proj = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.out_proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def _attend(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      mask: jax.Array,
      dropout_key: jax.Array | None,
  ) -> jax.Array:
    """Attend from `query` (B, Tq, H, Dh) to `key` and `value` (B, T, H, Dh)."""
    if dropout_key is None:
      # TODO: the cuDNN path with this boolean key mask is untested (no GPU was
      # available). When real slices come first, `key_value_seq_lengths` would
      # give cuDNN its native padding mask instead.
      return jax.nn.dot_product_attention(
          query, key, value, mask=mask, implementation=self.implementation
      )

    head_dim = query.shape[-1]
    scores = jnp.einsum(
        "bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32
    ) / np.sqrt(head_dim)
    # A finite fill, as jax.nn.dot_product_attention uses: a row whose keys are
    # all masked gets uniform weights instead of NaN.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    weights = self.dropout(weights, rngs=dropout_key)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Attend over `x` (B, T, d), with `key_mask` (B, T) True for keys that may be attended."""
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = self.in_proj(x).astype(self.dtype).reshape(batch, tokens, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, Dh)
    mask = key_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries

    dropout_active = self.dropout.rate > 0 and not self.dropout.deterministic
    dropout_key = self.dropout.rngs() if dropout_active else None

    chunk = self.attention_chunk
    if chunk <= 0 or tokens <= chunk:
      context = self._attend(query, key, value, mask, dropout_key)
    else:
      # The queries are padded to whole chunks, and the padded rows are dropped afterwards.
      num_chunks = -(-tokens // chunk)
      padded = jnp.pad(query, ((0, 0), (0, num_chunks * chunk - tokens), (0, 0), (0, 0)))
      blocks = padded.reshape(batch, num_chunks, chunk, self.num_heads, head_dim).swapaxes(0, 1)
      chunk_keys = None if dropout_key is None else jax.random.split(dropout_key, num_chunks)

      @jax.checkpoint
      def attend_chunk(inputs):
        block, block_key = inputs
        return self._attend(block, key, value, mask, block_key)

      context = jax.lax.map(attend_chunk, (blocks, chunk_keys))  # (n, B, chunk, H, Dh)
      context = context.swapaxes(0, 1).reshape(batch, num_chunks * chunk, self.num_heads, head_dim)
      context = context[:, :tokens]

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
      attention_dropout: float | None = None,
      attention_chunk: int = 0,
      implementation: str | None = None,
      rngs: nnx.Rngs,
  ):
    self.self_attn = SelfAttention(
        dim,
        num_heads,
        dropout=dropout if attention_dropout is None else attention_dropout,
        dtype=dtype,
        attention_chunk=attention_chunk,
        implementation=implementation,
        rngs=rngs,
    )
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
  layers compute in `dtype`. Like every nnx module it is built in training
  mode, so dropout is on until `model.eval()` is called.

  Memory options, all keyword-only and off by default (the defaults reproduce
  the upstream module):
    attention_chunk: queries per attention chunk (0 = all at once); see
      `SelfAttention`. The outputs do not change.
    remat: rematerialise each encoder layer in the backward pass, so a training
      step stores only the layer inputs. The outputs and gradients do not change.
    token_pool: average-pool each slice's h x w token map by k x k before the
      transformer, which divides the token count by k^2. The positional code is
      then built on the pooled (h / k, w / k) grid and `spatial` comes out at
      that grid. Upstream weights still load, but the outputs are no longer the
      upstream's.
    attention_dropout: dropout rate on the attention weights (None = `dropout`,
      as upstream). 0 keeps training on `jax.nn.dot_product_attention`, so the
      fused kernel can serve training too.
    attention_implementation: passed to `jax.nn.dot_product_attention`: None
      lets JAX choose (XLA in jax 0.10.2), and "cudnn" selects the fused GPU
      kernel, which takes float16, bfloat16 or float8 inputs only.
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
      attention_chunk: int = 0,
      remat: bool = False,
      token_pool: int = 1,
      attention_dropout: float | None = None,
      attention_implementation: str | None = None,
      rngs: nnx.Rngs,
  ):
    if num_heads <= 0 or feature_dim % num_heads:
      raise InputError(
          f"feature_dim {feature_dim} is not divisible by num_heads {num_heads}, "
          "expected a positive head count that divides feature_dim"
      )
    if num_layers <= 0:
      raise InputError(f"num_layers is {num_layers}, expected at least 1")
    if attention_chunk < 0:
      raise InputError(f"attention_chunk is {attention_chunk}, expected 0 (off) or a positive size")
    if token_pool < 1 or spatial_size % token_pool:
      raise InputError(
          f"token_pool is {token_pool}, expected a positive divisor of spatial_size {spatial_size}"
      )
    self.feature_dim = feature_dim
    self.max_slices = max_slices
    self.spatial_size = spatial_size
    self.token_pool = token_pool
    self.remat = remat
    grid = spatial_size // token_pool
    self.pos_encoding = nnx.Variable(
        jnp.asarray(positional_encoding(max_slices, grid, grid, feature_dim))
    )
    self.layers = nnx.List([
        EncoderLayer(
            feature_dim,
            num_heads,
            dim_feedforward,
            dropout=dropout,
            dtype=dtype,
            attention_dropout=attention_dropout,
            attention_chunk=attention_chunk,
            implementation=attention_implementation,
            rngs=rngs,
        )
        for _ in range(num_layers)
    ])
    self.norm = layers.layer_norm(feature_dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)

  def __call__(self, features: jax.Array, slice_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return (pooled (B, C), spatial (B, S, h', w', C)) for `features` (B, S, h, w, C).

    h' = h / token_pool and w' = w / token_pool. `slice_mask` (B, S) is True
    (or 1) for real slices. Padded slices are hidden as keys and left out of
    the pooled mean. Padding a scan with more slices therefore leaves `pooled`
    and the real slices' `spatial` unchanged, while the padded slices' spatial
    outputs carry no meaning. A batch element with no real slice gets a zero
    pooled vector.

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

    x = features.astype(jnp.float32)
    pool = self.token_pool
    if pool > 1:
      height, width = height // pool, width // pool
      x = x.reshape(batch, slices, height, pool, width, pool, channels).mean(axis=(3, 5))
    x = x + self.pos_encoding[...][:slices]
    tokens_per_slice = height * width
    x = x.reshape(batch, slices * tokens_per_slice, channels)
    real = slice_mask.astype(bool)
    key_mask = jnp.repeat(real, tokens_per_slice, axis=1)  # (B, S * h' * w'), slice-major order

    if self.remat:
      x = self._run_layers_rematerialised(x, key_mask)
    else:
      for layer in self.layers:
        x = layer(x, key_mask)
    x = self.norm(x)

    weights = key_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    spatial = x.reshape(batch, slices, height, width, channels)
    return pooled, spatial


  def _run_layers_rematerialised(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Run the encoder layers as a `lax.scan` of one checkpointed step over their stacked states.

    Gradients then keep only each layer's input and recompute the rest. A
    Python loop of checkpointed layers lets the compiler hoist all the
    recomputation ahead of the backward pass. XLA's CPU backend did that with
    jax 0.10.2 and saved no temporary memory, while a scan runs the steps in
    order. Every layer keeps its own parameters and dropout stream, so values,
    gradients and dropout masks equal the plain loop's.
    """
    graphdef = None
    params, rest = [], []
    for layer in self.layers:
      graphdef, layer_params, layer_rest = nnx.split(layer, nnx.Param, ...)
      params.append(layer_params)
      rest.append(layer_rest)
    stacked_params = jax.tree.map(lambda *values: jnp.stack(values), *params)
    stacked_rest = jax.tree.map(lambda *values: jnp.stack(values), *rest)

    def step(x: jax.Array, layer_state):
      layer = nnx.merge(graphdef, *layer_state)
      x = layer(x, key_mask)
      _, _, layer_rest = nnx.split(layer, nnx.Param, ...)
      return x, layer_rest

    step = jax.checkpoint(step, prevent_cse=False)
    x, new_rest = jax.lax.scan(step, x, (stacked_params, stacked_rest))
    # Write the advanced dropout RNG counters back, as the plain loop would.
    for index, layer in enumerate(self.layers):
      nnx.update(layer, jax.tree.map(lambda value: value[index], new_rest))
    return x


def pad_slices(
    features: jax.Array, slice_mask: jax.Array, num_slices: int
) -> tuple[jax.Array, jax.Array]:
  """Pad a scan batch (B, S, h, w, C) and its mask (B, S) with masked slices up to `num_slices`.

  Padding scans to a few fixed slice counts lets scans of any length share
  compiled shapes.

  Raises:
    InputError: if the scan already has more than `num_slices` slices.
  """
  slices = features.shape[1]
  if slices > num_slices:
    raise InputError(f"scan has {slices} slices, more than the requested {num_slices}")
  extra = num_slices - slices
  features = jnp.pad(features, ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0)))
  slice_mask = jnp.pad(jnp.asarray(slice_mask).astype(bool), ((0, 0), (0, extra)))
  return features, slice_mask


class ScanHead(nnx.Module):
  """The upstream scan head: feature_dim -> hidden (feature_dim // 2), GELU, Dropout 0.4, -> classes.

  It maps the aggregator's pooled vector to per-scan logits (6 classes for MBH,
  14 for CQ500 upstream). Like every nnx module it is built in training mode,
  so dropout is on until `model.eval()` is called.
  """

  # TODO: upstream scan-head weights cannot be loaded yet, because the key names
  # in the upstream `best_aggregator.pth` are not known (no fixture covers them).

  def __init__(
      self,
      feature_dim: int,
      num_classes: int,
      *,
      hidden_dim: int | None = None,
      dropout: float = 0.4,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    hidden = feature_dim // 2 if hidden_dim is None else hidden_dim
    if feature_dim <= 0 or num_classes <= 0 or hidden <= 0:
      raise InputError(
          f"scan head sizes are feature_dim {feature_dim}, hidden_dim {hidden}, "
          f"num_classes {num_classes}, expected positive sizes"
      )
    self.feature_dim = feature_dim
    self.dtype = dtype
    self.fc1 = nnx.Linear(feature_dim, hidden, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, pooled: jax.Array) -> jax.Array:
    """Map pooled scan features (B, C) to (B, K) float32 logits.

    Raises:
      InputError: if `pooled` is not (B, feature_dim).
    """
    if pooled.ndim != 2 or pooled.shape[-1] != self.feature_dim:
      raise InputError(
          f"pooled features have shape {pooled.shape}, expected (B, {self.feature_dim})"
      )
    hidden = layers.gelu(self.fc1(pooled.astype(self.dtype)))
    return self.fc2(self.dropout(hidden)).astype(jnp.float32)


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
    # The upstream buffer is at the full token grid, also when this model pools tokens.
    size = model.spatial_size
    computed = positional_encoding(model.max_slices, size, size, model.feature_dim)
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
