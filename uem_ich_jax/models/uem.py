"""The UEM-ICH multi-task model: one ConvNeXt-V2 encoder, slice classification,
segmentation and (optionally) detection heads.

Parameter layout: the encoder and its classification head sit exactly where
they sit in `ConvNeXtV2` (encoder at the root, classifier under `head`), so
weights move by path between the classification model, this model and the
encoder exports. The other heads live under names that start with "head"
(`head_segmentation`, `head_detection`). An encoder export contains
everything outside the "head" prefix, so it never contains them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from uem_ich_jax.errors import InputError
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2
from uem_ich_jax.models.convnext_v2 import ConvNeXtV2Config
from uem_ich_jax.models.segformer_head import SegFormerHead

# The stride of the segmentation neck, where the detection head runs.
NECK_STRIDE = 4


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """The heads beside the classifier.

  Attributes:
    segmentation_classes: background + subtypes (6), or 1 for a binary
      foreground head.
    embed_dim: width of the SegFormer neck (the upstream uses 256).
    classify_at_stride4: classify segmentation at stride 4 and upsample the
      logits (faster, not the upstream order; see `SegFormerHead`).
    detection: build the FCOS detection head on the neck.
    detection_classes: box classes of the detection head (the five subtypes).
    detection_tower_depth: conv layers in each FCOS tower.
    detection_groups: GroupNorm groups of the FCOS towers.
  """

  segmentation_classes: int = 6
  embed_dim: int = 64
  classify_at_stride4: bool = False
  detection: bool = False
  detection_classes: int = 5
  detection_tower_depth: int = 4
  detection_groups: int = 32


class UEM(ConvNeXtV2):
  """ConvNeXt-V2 (with its classification head) plus segmentation and detection heads.

  `__call__` returns a dict of float32 outputs: `class_logits` (N, 6),
  `segmentation` (N, H, W, K) and `segmentation_aux` (4 maps of that shape),
  and with detection the FCOS outputs under `detection`. `classify` runs the
  encoder and the classifier only.
  """

  def __init__(self, config: ConvNeXtV2Config, heads: HeadsConfig, *, rngs: nnx.Rngs):
    if config.head is None:
      raise InputError(
          "config.model.head is None, but the multi-task model needs a classification head;"
          " set it to one of uem_ich_jax.models.heads.HEAD_KINDS"
      )
    super().__init__(config, rngs=rngs)
    self.heads = heads
    self.head_segmentation = SegFormerHead(
        config.widths,
        heads.embed_dim,
        heads.segmentation_classes,
        classify_at_stride4=heads.classify_at_stride4,
        dtype=config.dtype,
        depthwise=config.depthwise,
        rngs=rngs,
    )
    if heads.detection:
      # Imported here so that models without detection do not need the module.
      from uem_ich_jax.models import detection

      self.head_detection = detection.FCOSHead(
          heads.embed_dim,
          heads.detection_classes,
          tower_depth=heads.detection_tower_depth,
          num_groups=heads.detection_groups,
          dtype=config.dtype,
          rngs=rngs,
      )
    else:
      self.head_detection = None

  def classify(self, x: jax.Array) -> jax.Array:
    """Return (N, num_classes) float32 slice logits, skipping the other heads."""
    return ConvNeXtV2.__call__(self, x)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    outputs, _ = self.outputs_and_features(x)
    return outputs

  def outputs_and_features(
      self, x: jax.Array
  ) -> tuple[dict[str, jax.Array], tuple[jax.Array, ...]]:
    """Return the outputs of `__call__` and the four encoder stage maps they came from."""
    features = self.features(x)
    logits, aux, neck = self.head_segmentation.decode(features, tuple(x.shape[1:3]))
    outputs = {
        "class_logits": self.head(features[-1]).astype(jnp.float32),
        "segmentation": logits,
        "segmentation_aux": aux,
    }
    if self.head_detection is not None:
      outputs["detection"] = self.head_detection(neck, NECK_STRIDE)
    return outputs, features
