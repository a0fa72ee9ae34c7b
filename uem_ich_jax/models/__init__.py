"""Flax NNX models: the ConvNeXt-V2 encoder, coordinate attention and the heads."""

from uem_ich_jax.models.convnext_v2 import VARIANTS
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2Config
from uem_ich_jax.models.convnext_v2 import build_convnext_v2
from uem_ich_jax.models.convnext_v2 import parameter_count
from uem_ich_jax.models.coord_attention import CoordinateAttention
from uem_ich_jax.models.heads import HEAD_KINDS
from uem_ich_jax.models.heads import ClassificationHead

__all__ = [
    "HEAD_KINDS",
    "VARIANTS",
    "ClassificationHead",
    "ConvNeXtV2",
    "ConvNeXtV2Config",
    "CoordinateAttention",
    "build_convnext_v2",
    "parameter_count",
]
