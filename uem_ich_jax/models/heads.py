"""Slice classification heads on the encoder's last stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax.models import layers

# Head layouts:
#   "timm": LayerNorm (eps 1e-6), Linear C -> K; timm's ConvNeXt head, for
#     parity with timm classifiers.
#   "multitask": Dropout 0.1, Linear C -> 256, GELU, Dropout 0.1, Linear -> K;
#     the upstream multitask stage and its k-fold evaluations.
#   "stage2": LayerNorm, Dropout 0.3, Linear C -> C/2, GELU, LayerNorm,
#     Dropout 0.3, Linear -> K; the upstream supervised classification stage.
HEAD_KINDS = ("timm", "multitask", "stage2")

# PyTorch's `nn.LayerNorm` default; the upstream stage-2 head does not set one.
TORCH_LAYER_NORM_EPSILON = 1e-5


class ClassificationHead(nnx.Module):
  """Global average pool, then one of `HEAD_KINDS`; returns float32 logits.

  Dropout starts in evaluation mode; `model.train()` turns it on.
  """

  def __init__(
      self,
      in_features: int,
      num_classes: int = 6,
      *,
      kind: str = "multitask",
      hidden_features: int | None = None,
      dropout_rate: float | None = None,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if kind not in HEAD_KINDS:
      raise ValueError(f"unknown classification head kind {kind!r}; expected one of {HEAD_KINDS}")
    self.kind = kind
    self.dtype = dtype

    if kind == "timm":
      self.norm = layers.layer_norm(in_features, dtype=dtype, rngs=rngs)
      self.fc = layers.linear(in_features, num_classes, dtype=dtype, rngs=rngs)
      return

    if kind == "multitask":
      hidden = hidden_features or 256
      rate = 0.1 if dropout_rate is None else dropout_rate
      self.dropout1 = nnx.Dropout(rate, deterministic=True, rngs=rngs)
      self.fc1 = layers.linear(in_features, hidden, dtype=dtype, rngs=rngs)
      self.dropout2 = nnx.Dropout(rate, deterministic=True, rngs=rngs)
      self.fc2 = layers.linear(hidden, num_classes, dtype=dtype, rngs=rngs)
      return

    hidden = hidden_features or in_features // 2
    rate = 0.3 if dropout_rate is None else dropout_rate
    self.norm1 = layers.layer_norm(in_features, epsilon=TORCH_LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate, deterministic=True, rngs=rngs)
    self.fc1 = layers.linear(in_features, hidden, dtype=dtype, rngs=rngs)
    self.norm2 = layers.layer_norm(hidden, epsilon=TORCH_LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate, deterministic=True, rngs=rngs)
    self.fc2 = layers.linear(hidden, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Map an NHWC feature map (or pooled (N, C) features) to (N, K) float32 logits."""
    if x.ndim == 4:
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = x.astype(self.dtype)

    if self.kind == "timm":
      logits = self.fc(self.norm(x))
    elif self.kind == "multitask":
      x = layers.gelu(self.fc1(self.dropout1(x)))
      logits = self.fc2(self.dropout2(x))
    else:
      x = layers.gelu(self.fc1(self.dropout1(self.norm1(x))))
      logits = self.fc2(self.dropout2(self.norm2(x)))
    return logits.astype(jnp.float32)
