"""`synthetic_ich` variants with the features of each real builder's config.

A variant named `<dataset>_<config>` (for example `cq500_slices`) stores
phantom scans under exactly the feature specs of that config of the real
builder, so a training config can be smoke-tested against any dataset's
feature layout without the licensed data.

The specs are never copied: `real_features` instantiates the real builder
with the named config at the variant's image size and reads its
`info.features`. The values come from the phantom scan through the fillers
below, converted the way the real builder stores them (PhysioNet's mask is
binary, CQ500 slices carry scan labels but no slice labels). A feature
without a filler raises `VariantFeatureError`, so a feature added to a real
builder fails the variant tests instead of a training run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax.errors import InputError
from uem_ich_jax.phantom import PhantomScan

# (dataset, config, layout of the examples) of every real builder config.
# tests/test_synthetic_variants.py checks this table against the builders'
# BUILDER_CONFIGS, so a new config of a real builder fails a test.
REAL_CONFIGS = (
    ("rsna_ich", "slices", "slices"),
    ("rsna_ich", "scans", "scans"),
    ("physionet_ct_ich", "slices", "slices"),
    ("physionet_ct_ich", "scans", "scans"),
    ("bhsd", "slices", "slices"),
    ("bhsd", "scans", "scans"),
    ("bhsd", "case_scans", "scans"),
    ("cq500", "slices", "slices"),
    ("cq500", "scans", "scans"),
)

# Size of every variant: scan i has VARIANT_SLICES + i % 3 slices, because real
# scans differ in length and the scan pipelines must pad them.
VARIANT_SCANS = 10
VARIANT_SLICES = 6
VARIANT_EXTRA_SLICES = 2
VARIANT_IMAGE_SIZE = 64

# Values of the features whose source the phantom does not model.
SYNTHETIC_SOURCE = "synthetic_ich"

# Releases whose masks mark blood without a subtype (0 or 1). PhysioNet
# CT-ICH's masks are binary; BHSD's carry the class ids 1..5.
BINARY_MASK_DATASETS = ("physionet_ct_ich",)


class VariantFeatureError(InputError):
  """A feature of a real builder that the variant cannot fill; the message names it."""


def variant_name(dataset: str, config: str) -> str:
  return f"{dataset}_{config}"


@functools.lru_cache(maxsize=None)
def real_features(dataset: str, config: str, image_size: int) -> tfds.features.FeaturesDict:
  """Return the features of config `config` of the real builder `dataset` at `image_size` px.

  The builder is instantiated on a data folder that does not exist, so no
  stored dataset_info can replace the specs that its `_info` returns.
  """
  # Importing the package registers its builder with TFDS.
  importlib.import_module(f"uem_ich_jax.datasets.{dataset}")
  builder_class = tfds.builder_cls(dataset)
  if config not in builder_class.builder_configs:
    raise VariantFeatureError(
        f"{dataset} has no config {config!r}; its configs are"
        f" {sorted(builder_class.builder_configs)}"
    )
  # TFDS rejects a custom config named like a registered one.
  real_config = dataclasses.replace(
      builder_class.builder_configs[config], name=f"{config}_{image_size}px", image_size=image_size
  )
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_hide_custom_config_warning)
  try:
    with tempfile.TemporaryDirectory() as folder:
      builder = builder_class(config=real_config, data_dir=os.path.join(folder, "absent"))
      return builder.info.features
  finally:
    absl_logger.removeFilter(_hide_custom_config_warning)


def _hide_custom_config_warning(record: logging.LogRecord) -> bool:
  # TFDS warns about every custom config; here the custom config is intended.
  return "Using custom data configuration" not in record.getMessage()


@dataclasses.dataclass(frozen=True)
class _Source:
  """The phantom scan and position from which one example's features are filled."""

  dataset: str
  config: str
  scan: PhantomScan
  windows: np.ndarray
  fold: int
  # None for a scan example.
  slice_index: int | None
  feature: Any

  @property
  def num_slices(self) -> int:
    return self.scan.mask.shape[0]

  def per_slice(self, values: np.ndarray) -> np.ndarray:
    """Return `values` (one entry per slice) at this slice, or whole for a scan example."""
    return values if self.slice_index is None else values[self.slice_index]

  def slice_only(self, name: str) -> int:
    if self.slice_index is None:
      raise VariantFeatureError(
          f"synthetic_ich variant of {self.dataset}/{self.config}: feature {name!r} is per slice,"
          " but this config stores scans"
      )
    return self.slice_index


def _scan_labels(source: _Source) -> np.ndarray:
  return np.asarray([source.scan.scan_labels[n] for n in uem_ich_jax.SLICE_LABELS], np.uint8)


def _cq500_labels(source: _Source) -> np.ndarray:
  return np.asarray([source.scan.scan_labels[n] for n in uem_ich_jax.CQ500_LABELS], np.uint8)


def _labels(source: _Source) -> np.ndarray:
  if source.slice_index is None:
    return _scan_labels(source)
  return source.scan.slice_labels[source.slice_index].astype(np.uint8)


def _mask(source: _Source) -> np.ndarray:
  mask = source.scan.mask.astype(np.uint8)
  if source.dataset in BINARY_MASK_DATASETS:
    mask = (mask > 0).astype(np.uint8)
  return source.per_slice(mask)


def _slice_fracture(source: _Source) -> np.ndarray:
  """Return 1 for every slice on which the phantom's fracture gap lies, else 0."""
  return source.scan.fracture_mask.reshape(source.num_slices, -1).any(axis=1).astype(np.uint8)


def _slice_uids(source: _Source) -> list[str]:
  return [f"{source.scan.scan_id}.{index}" for index in range(source.num_slices)]


def _boxes(source: _Source) -> np.ndarray:
  boxes = source.scan.boxes[source.slice_only("boxes")]
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def _box_classes(source: _Source) -> np.ndarray:
  return np.asarray(source.scan.box_classes[source.slice_only("box_classes")], np.int32)


def _reader_cq500_labels(source: _Source) -> np.ndarray:
  # Every reader agrees with the phantom's truth; one row per reader.
  return np.tile(_cq500_labels(source), (source.feature.shape[0], 1))


Filler = Callable[[_Source], Any]

# Fillers by feature name, shared by every dataset unless _DATASET_FILLERS
# overrides them.
_FILLERS: dict[str, Filler] = {
    "image": lambda s: s.per_slice(s.windows),
    "mask": _mask,
    "labels": _labels,
    "slice_labels": lambda s: s.scan.slice_labels.astype(np.uint8),
    "hematoma_ml": lambda s: np.asarray(
        [s.scan.hematoma_ml.get(name, 0.0) for name in uem_ich_jax.SUBTYPES], np.float32
    ),
    "cq500_labels": _cq500_labels,
    "midline_shift_mm": lambda s: np.float32(s.scan.midline_shift_mm),
    "boxes": _boxes,
    "box_classes": _box_classes,
    "spacing": lambda s: np.asarray(s.scan.volume.spacing, np.float32),
    "affine": lambda s: np.asarray(s.scan.volume.affine, np.float32),
    "slice_index": lambda s: np.int32(s.slice_only("slice_index")),
    "scan_id": lambda s: s.scan.scan_id,
    "patient_id": lambda s: s.scan.patient_id,
    "fold": lambda s: np.int32(s.fold),
}

_DATASET_FILLERS: dict[str, dict[str, Filler]] = {
    "rsna_ich": {
        "study_uid": lambda s: f"{s.scan.scan_id}.study",
        "sop_instance_uid": lambda s: _slice_uids(s)[s.slice_only("sop_instance_uid")],
        "sop_instance_uids": _slice_uids,
        # The phantom stores no modulo-4096 HU, so nothing is unwrapped.
        "hu_unwrapped": lambda s: s.per_slice(np.zeros((s.num_slices,), np.bool_)),
    },
    "physionet_ct_ich": {
        "fracture": lambda s: np.uint8(s.per_slice(_slice_fracture(s)).max()),
        "slice_fracture": _slice_fracture,
        # The CSV's SliceNumber counts from 1.
        "slice_number": lambda s: np.int32(s.slice_only("slice_number") + 1),
        "slice_numbers": lambda s: np.arange(1, s.num_slices + 1, dtype=np.int32),
        # The values the real builder writes for a patient without demographics.
        "age_years": lambda s: np.float32(math.nan),
        "gender": lambda s: "",
    },
    "bhsd": {
        "source": lambda s: SYNTHETIC_SOURCE,
        "official_split": lambda s: "",
        "num_raters": lambda s: np.int32(1),
        "in_csv": lambda s: np.bool_(True),
    },
    "cq500": {
        "scan_labels": _scan_labels,
        "reader_cq500_labels": _reader_cq500_labels,
        # The phantom boxes every bleed of at least 20 mm2 on a slice, so an
        # empty list means no such bleed.
        "boxes_known": lambda s: np.bool_(True),
        "sop_instance_uid": lambda s: _slice_uids(s)[s.slice_only("sop_instance_uid")],
        "category": lambda s: "B1",
        "series_description": lambda s: SYNTHETIC_SOURCE,
        "source_gantry_tilt_deg": lambda s: np.float32(0.0),
    },
}


def num_mask_classes(mirrors: str) -> int | None:
  """Return the mask classes of the mirrored config, background included; None without masks.

  Stored as `num_mask_classes` in the variant's metadata, where the multitask
  stage checks it against its segmentation head.
  """
  dataset, _, config = mirrors.partition("/")
  if "mask" not in real_features(dataset, config, VARIANT_IMAGE_SIZE):
    return None
  return 2 if dataset in BINARY_MASK_DATASETS else len(uem_ich_jax.SLICE_LABELS)


def known_features(dataset: str) -> set[str]:
  """Name the features that the variants of `dataset` can fill."""
  return set(_FILLERS) | set(_DATASET_FILLERS.get(dataset, {}))


def fill_example(
    features: tfds.features.FeaturesDict,
    *,
    dataset: str,
    config: str,
    scan: PhantomScan,
    windows: np.ndarray,
    fold: int,
    slice_index: int | None,
) -> dict[str, Any]:
  """Fill every feature of `features` from the phantom scan, slice `slice_index` or all of it.

  Raises:
    VariantFeatureError: a feature without a filler, named with the dataset
      and config.
  """
  fillers = {**_FILLERS, **_DATASET_FILLERS.get(dataset, {})}
  example = {}
  for name, feature in features.items():
    filler = fillers.get(name)
    if filler is None:
      raise VariantFeatureError(
          f"synthetic_ich variant of {dataset}/{config}: no filler for feature {name!r};"
          f" add one to datasets/synthetic_ich/variants.py"
      )
    source = _Source(dataset, config, scan, windows, fold, slice_index, feature)
    example[name] = filler(source)
  return example

