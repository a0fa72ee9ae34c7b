"""Load and run a model that `uem-ich export` wrote, with jax and numpy alone.

The export folder contains `manifest.json` and serialized `jax.export`
programs (StableHLO with the parameters inside as constants):

  slice_model.stablehlo  images (N, H, W, 3) float32 in [-1, 1] -> the slice
                         outputs listed in the manifest's `outputs`
  scan_head.stablehlo    with an aggregator run whose encoder equals the
                         multitask encoder: tokens (B, max_slices, h, w, C)
                         and slice_mask (B, max_slices) -> (B, K) scan
                         probabilities
  scan_model.stablehlo   with any other aggregator run: images
                         (B, max_slices, H, W, 3) and slice_mask -> (B, K)

This module imports neither Flax, Optax, Orbax nor the project's training and
model code, so a serving process needs only jax, numpy and the folder.

  model = load_exported("exported/")
  outputs = model(images)             # per slice, batched
  scan = model.predict_scan(images)   # one scan's slices, with the aggregator
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from uem_ich_jax.errors import InputError

SCHEMA_VERSION = "1.0"
MANIFEST_FILE = "manifest.json"
SLICE_MODEL_FILE = "slice_model.stablehlo"
SCAN_HEAD_FILE = "scan_head.stablehlo"
SCAN_MODEL_FILE = "scan_model.stablehlo"
# Input range when a manifest states none; exports write it as input.range.
DEFAULT_INPUT_RANGE = (-1.0, 1.0)
# Values this far outside the input range still pass, for float rounding in
# the caller's windowing and resizing. Anything further is another scaling
# (HU, 0-255 levels), on which the model's outputs mean nothing.
INPUT_RANGE_TOLERANCE = 1e-3


class ServeError(InputError):
  """An export folder or an input that the loaded model cannot use. The message names it."""


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """Read `directory/manifest.json` and check that this loader understands its schema."""
  path = pathlib.Path(directory) / MANIFEST_FILE
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError as error:
    raise ServeError(
        f"{path} not found: pass the folder that `uem-ich export` wrote"
    ) from error
  except (OSError, ValueError) as error:
    raise ServeError(f"failed to read {path}: {error}") from error
  version = str(manifest.get("schema_version", ""))
  if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
    raise ServeError(
        f"{path} has schema_version {version!r}, but this loader reads {SCHEMA_VERSION};"
        " export the run again with this version of uem-ich-jax"
    )
  return manifest


def _load_program(path: pathlib.Path, manifest: dict[str, Any]) -> jax.export.Exported:
  """Deserialize one exported program and check that it runs on this process's platform."""
  try:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
  except FileNotFoundError as error:
    raise ServeError(f"{path} not found, so the export folder is incomplete") from error
  except Exception as error:  # jax raises several types for bytes it cannot read.
    raise ServeError(
        f"failed to deserialize {path} ({type(error).__name__}: {error}); it was exported with"
        f" jax {manifest.get('jax_version')}, this process has jax {jax.__version__}"
    ) from error
  platform = jax.export.default_export_platform()
  if platform not in exported.platforms:
    raise ServeError(
        f"{path} was exported for {list(exported.platforms)}, but this process runs on"
        f" {platform}; export again with --platforms including {platform}, or set"
        " JAX_PLATFORMS to one of the exported platforms"
    )
  return exported


def check_input_values(images: np.ndarray, manifest: dict[str, Any]) -> None:
  """Raise ServeError unless every value of `images` is finite and inside the input range.

  The range is `manifest["input"]["range"]`, widened by `INPUT_RANGE_TOLERANCE`.
  """
  low, high = (manifest.get("input") or {}).get("range") or DEFAULT_INPUT_RANGE
  expected = (
      f"expected windowed images in [{low:g}, {high:g}] (see manifest[\"input\"]: each"
      " window scaled from uint8 levels to that range)"
  )
  finite = np.isfinite(images)
  if not finite.all():
    count = int(images.size - np.count_nonzero(finite))
    raise ServeError(f"images contain {count:,} NaN or infinite values; {expected}")
  smallest = float(images.min())
  largest = float(images.max())
  if smallest < low - INPUT_RANGE_TOLERANCE or largest > high + INPUT_RANGE_TOLERANCE:
    raise ServeError(f"images have values from {smallest:g} to {largest:g}; {expected}")


def even_slice_indices(num_slices: int, count: int) -> np.ndarray:
  """Pick `count` of `num_slices` slice indices, evenly spaced, first and last included.

  The same rule as `uem_ich_jax.data.pipeline.even_slice_indices`, which the
  aggregator saw in training. It is repeated here because that module imports
  the data pipeline's dependencies, which a serving process does not have.
  """
  return np.linspace(0, num_slices - 1, count).astype(np.int64)


class ExportedModel:
  """A loaded export: call it on slices, or `predict_scan` on one scan's slices.

  Attributes:
    manifest: the contents of manifest.json.
    directory: the export folder.
    batch_size: slices per call of the slice model. The last batch is padded,
      so one compiled program serves every batch.
  """

  def __init__(self, directory: pathlib.Path, manifest: dict[str, Any], batch_size: int):
    self.directory = directory
    self.manifest = manifest
    self.batch_size = batch_size
    self._slice_model = _load_program(directory / SLICE_MODEL_FILE, manifest)
    self._slice_call = jax.jit(self._slice_model.call)
    aggregator = manifest.get("aggregator")
    self._scan_call = None
    if aggregator is not None:
      scan_program = _load_program(directory / aggregator["file"], manifest)
      self._scan_call = jax.jit(scan_program.call)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(rows, columns, channels) of one slice of the model input."""
    return tuple(self.manifest["input"]["shape"][1:])

  def _check_images(self, images: Any) -> np.ndarray:
    images = np.asarray(images)
    expected = ("N", *self.image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ServeError(
          f"images have shape {tuple(images.shape)}, expected {expected}: N slices of the"
          f" model input described in {self.directory / MANIFEST_FILE} (input)"
      )
    if images.shape[0] < 1:
      raise ServeError(f"images have shape {tuple(images.shape)}, expected at least 1 slice")
    if not np.issubdtype(images.dtype, np.floating):
      raise ServeError(
          f"images have dtype {images.dtype}, expected float32 windowed to [-1, 1]"
          " (see manifest input.windows)"
      )
    images = images.astype(np.float32, copy=False)
    check_input_values(images, self.manifest)
    return images

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """Run the slice model on (N, H, W, 3) images and return the outputs with N rows each.

    Raises:
      ServeError: images of another shape than the manifest's input, not
        floats, not finite, or outside the manifest's input range.
    """
    images = self._check_images(images)
    count = images.shape[0]
    batch_size = self.batch_size
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, batch_size):
      batch = images[start : start + batch_size]
      rows = batch.shape[0]
      if rows < batch_size:
        padding = np.zeros((batch_size - rows, *batch.shape[1:]), np.float32)
        batch = np.concatenate([batch, padding])
      for name, value in self._slice_call(batch).items():
        parts.setdefault(name, []).append(np.asarray(value)[:rows])
    return {name: np.concatenate(values) for name, values in parts.items()}

  def predict_scan(self, images: Any) -> dict[str, np.ndarray]:
    """Run the slice model and the aggregator on (S, H, W, 3) slices of one scan, in scan order.

    Returns the slice outputs of `__call__`, plus `scan_probabilities` (K,)
    in the order of the manifest's `aggregator.labels` and `scan_slices_used`,
    the slice indices the aggregator saw: all of them, or `max_slices` evenly
    spaced ones for a longer scan.

    Raises:
      ServeError: the export has no aggregator, or the images do not fit.
    """
    if self._scan_call is None:
      raise ServeError(
          f"{self.directory} has no aggregator: export with --aggregator for scan labels"
      )
    images = self._check_images(images)
    outputs = self(images)
    aggregator = self.manifest["aggregator"]
    max_slices = int(aggregator["max_slices"])
    used = np.arange(images.shape[0])
    if images.shape[0] > max_slices:
      used = even_slice_indices(images.shape[0], max_slices)
    inputs = outputs["tokens"] if aggregator["input"] == "tokens" else images
    inputs = inputs[used]
    # Padded slices are masked out, so they do not change the scan's output.
    padded = np.zeros((max_slices, *inputs.shape[1:]), np.float32)
    padded[: len(used)] = inputs
    slice_mask = np.zeros((1, max_slices), bool)
    slice_mask[0, : len(used)] = True
    probabilities = np.asarray(self._scan_call(padded[None], slice_mask))[0]
    return {**outputs, "scan_probabilities": probabilities, "scan_slices_used": used}


def load_exported(directory: str | os.PathLike, *, batch_size: int | None = None) -> ExportedModel:
  """Load an export folder written by `uem-ich export`.

  `batch_size` sets the slices per slice-model call, the manifest's
  `batch_size` when None. The program takes any batch size, but each new
  one compiles again.

  Raises:
    ServeError: a missing or unreadable file, an unknown schema, or programs
      exported for other platforms than this process runs on.
  """
  directory = pathlib.Path(directory)
  manifest = read_manifest(directory)
  if batch_size is None:
    batch_size = int(manifest["batch_size"])
  if batch_size < 1:
    raise ServeError(f"batch_size is {batch_size}, expected at least 1 slice")
  return ExportedModel(directory, manifest, batch_size)
