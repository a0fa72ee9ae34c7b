"""`uem-ich predict` with a multitask run: labels, blood mask, boxes and volumes of one scan.

Stages, each timed with `time.perf_counter` and logged:

  restore      restore the multitask run (and the aggregator run), and compare
               their encoders once
  read         read the DICOM series or NIfTI file (`predict.read_study`), after
               checking its size from the headers (`predict.voxel_limit`)
  preprocess   the model input of `predict.model_input`: each slice centre-cropped
               or air-padded to the training data's square field of view,
               resized to its image size, windowed through uint8
  slice_model  the multitask model (encoder and heads) in batches of a fixed
               size, the last batch padded, so one compiled program serves
               every batch of every scan: sigmoid slice probabilities, the
               segmentation (binary head: sigmoid > 0.5; 6 classes: argmax),
               and the decoded boxes when the run has the detection head
  aggregator   scan label probabilities from the aggregator run (see below)
  postprocess  the mask mapped back onto the scan's grid as read, blood volumes
               per subtype (`clinical.hematoma_ml`) and the bleed side
               (`clinical.bleed_side`), boxes in source pixels, and the grid
               of segmentation.nii.gz (`segmentation_files.output_grid`)
  write        segmentation.nii.gz, segmentation.dcm (DICOM input only),
               overview.png and report.html (`report_html`)

The aggregator reuses the multitask encoder when both runs' encoder arrays are
equal (as when the aggregator trained on the multitask run's frozen encoder
export) and their input geometry is the same. The slice model then also
returns each slice's tokens, built as `ScanModel.scan_features` builds them,
and only the aggregator and its head run. Otherwise `ScanModel` encodes the
slices again. A scan with more slices than the aggregator's `max_slices` is
cut to that many evenly spaced slices, and a warning in the report states it.

Mapping back: model pixel i covers the square field of view's pixels q with
floor((q + 0.5) * image_size / square_pixels) = i, which is nearest neighbour
under the resize's pixel-centre convention (`ct.resize_inplane`). Source
pixels outside the square field of view get class 0. Volumes are therefore
measured in the scan's real geometry, slice by slice (uneven spacing and
gantry tilt included, see `uem_ich_jax.clinical`).

Files: segmentation.nii.gz contains uint8 class ids on the grid of the series as
read when its spacing is uniform and it has no gantry tilt, and otherwise on
the tilt-free, evenly spaced grid of `ct.resample_z` that dcm2niix's
corrected conversion uses (`segmentation_files` says which spacing and how it
matches dcm2niix). segmentation.dcm, for DICOM input, is a DICOM SEG on the
source frames as read. Volumes and voxel counts are always measured on the
grid as read.

report.json, schema 2.1. Every number is finite or null. Schema 2.1 adds
`segmentation.grid`, `segmentation.dicom_seg` and `outputs.dicom_seg` to 2.0.

  schema_version      "2.1"
  input               the input path as given
  series_uid          DICOM SeriesInstanceUID, or null (NIfTI)
  series_description  DICOM SeriesDescription, or null
  series_choice       null for NIfTI, else {chosen_by, rule, chosen, series_candidates}:
                      the series read from the folder and why each other one was
                      not (`predict.read_study`)
  shape               [slices, rows, columns] of the scan as read
  spacing_mm          [slice, row, column] spacing, mm
  gantry_tilt_deg     measured gantry tilt, degrees
  spacing_varies      whether the slice spacing varies
  reader_warnings     what the reader noticed, as text
  slices_as_acquired  how slices are treated (no resampling, tilt not corrected)
  model_input         {image_size, field_of_view_mm, rule}: the multitask model's input
  model               the multitask run: {workdir, step, stage, name, variant,
                      segmentation_classes, detection, classify_at_stride4, dtype,
                      batch_size, dataset, config_sha256 (of the run's config.json,
                      an id of its config)}, and `note` for runs trained on phantoms
  labels              the slice labels, in column order
  thresholds_from     where the slice thresholds come from (an evaluation file or
                      the default)
  scan                per slice label: {max_probability, slice, threshold, positive}
  top_slice           {index, position_mm, any}: the slice with the highest `any`
  slices              per slice, in scan order: {index, position_mm,
                      sop_instance_uid, probabilities (label -> p), blood_voxels
                      (on the scan's grid), blood_ml, boxes}. `boxes` is absent
                      without the detection head, else a list of {class,
                      class_id, score, box_model_px, box_source_px}
  segmentation        {file, classes (id -> name), head, field_of_view_covers_scan,
                      voxels, volume_ml, bleed_side, grid, dicom_seg}. `voxels`
                      and `volume_ml` are measured on the grid as read.
                      `volume_ml` maps "any" and, for a 6-class head, every
                      subtype to mL. `bleed_side` is {side, left_ml, right_ml,
                      midline_normal_lps} or null when the midline cannot be
                      estimated
    grid              the grid of segmentation.nii.gz: {kind ("as_read" or
                      "resample_z"), spacing_mm [slice, row, column], shape
                      [slices, rows, columns], affine_lps (4x4, voxel (slice,
                      row, column) to LPS mm; the file stores the same map as
                      NIfTI (column, row, slice) to RAS), tilt_removed_deg,
                      dcm2niix_output (the suffix of dcm2niix's conversion on
                      the same grid: "" for its plain output, "_Tilt_1",
                      "_Eq_1" or "_Tilt_Eq_1"), why}
    dicom_seg         null without segmentation.dcm (NIfTI input, or a warning
                      says why it failed), else {file, sop_instance_uid,
                      series_instance_uid, referenced_series_uid,
                      segmentation_type ("BINARY"), frames, segments (segment
                      number -> label; the number is the class id)}
  detection           null without the detection head, else {score_threshold,
                      max_detections, box_format, count}
  aggregator          null without an aggregator run, else {workdir, step,
                      label_set, labels, token_features, max_slices,
                      encoder_reused, encoder_note, slices_used, thresholds_from,
                      scan (label -> {probability, threshold, positive})}
  warnings            what the prediction noticed (cropped field of view,
                      subsampled slices, why segmentation.dcm was not
                      written), as text
  timings_s           seconds of restore, read, preprocess, slice_model,
                      aggregator (0 without one), postprocess, write, and total
                      (all stages; report.json itself is written after the
                      timings are taken)
  outputs             {report, segmentation, overview, html, dicom_seg}: file names in the
                      output folder; `dicom_seg` is null when segmentation.dcm
                      was not written
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import uem_ich_jax
from uem_ich_jax import clinical
from uem_ich_jax import compile_options
from uem_ich_jax import ct
from uem_ich_jax.errors import InputError
from uem_ich_jax.infer import predict
from uem_ich_jax.infer import report_html
from uem_ich_jax.infer import segmentation_files
from uem_ich_jax.infer.predict import PredictError
from uem_ich_jax.infer.predict import finite_or_none

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "2.1"
SEGMENTATION_FILE = segmentation_files.NIFTI_FILE
DICOM_SEG_FILE = segmentation_files.DICOM_SEG_FILE
# Slices per call of the slice model. Every call has this many, so a scan of
# any length reuses one compiled program.
DEFAULT_BATCH_SIZE = 8
STAGES = ("restore", "read", "preprocess", "slice_model", "aggregator", "postprocess", "write")
BOX_FORMAT = (
    "(row_min, column_min, row_max, column_max) on pixel edges: pixel i spans [i, i + 1)"
)


# ------------------------------------------------------------ Slice model ---


@dataclasses.dataclass(frozen=True)
class SliceModelSettings:
  """Outputs of the slice model beyond probabilities and the mask, static under `jax.jit`.

  Attributes:
    detection: decode the detection head's boxes.
    score_threshold: boxes below this score are dropped.
    max_detections: boxes kept per slice, after NMS.
    token_features: "last" or "pyramid" to also return each slice's aggregator
      tokens (see `ScanModel`), None for no tokens.
  """

  detection: bool = False
  score_threshold: float = 0.05
  max_detections: int = 20
  token_features: str | None = None


def slice_settings(
    config: ml_collections.ConfigDict, token_features: str | None = None
) -> SliceModelSettings:
  """Return the slice model settings of a multitask run: its own detection decoding settings."""
  from uem_ich_jax.train import multitask

  return SliceModelSettings(
      detection=bool(multitask.setting(config, "detection")),
      score_threshold=float(multitask.setting(config, "score_threshold")),
      max_detections=int(multitask.setting(config, "max_detections")),
      token_features=token_features,
  )


def _slice_forward(
    graphdef: nnx.GraphDef, settings: SliceModelSettings, state: nnx.State, images: jax.Array
) -> dict[str, jax.Array]:
  """Run `UEM` on a batch of slices and decode its outputs."""
  from uem_ich_jax.models import detection
  from uem_ich_jax.models import scan_model
  from uem_ich_jax.models import uem
  from uem_ich_jax.train import multitask

  model = nnx.merge(graphdef, state)
  outputs, maps = model.outputs_and_features(images)
  decoded = {
      "probabilities": jax.nn.sigmoid(outputs["class_logits"]),
      "mask": multitask.predicted_mask(outputs["segmentation"]),
  }
  if settings.detection:
    boxes = detection.decode(
        outputs["detection"],
        uem.NECK_STRIDE,
        score_threshold=settings.score_threshold,
        max_detections=settings.max_detections,
    )
    decoded.update({f"box_{key}": value for key, value in boxes.items()})
  if settings.token_features is not None:
    decoded["tokens"] = scan_model.tokens_from_maps(maps, settings.token_features)
  return decoded


# Module level, with the graph and settings static, so that every prediction
# in a process reuses the compiled program of its shapes.
_slice_forward_jit = compile_options.forward_jit(_slice_forward, static_argnums=(0, 1))


def run_slice_model(
    model: nnx.Module,
    images: np.ndarray,
    settings: SliceModelSettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, np.ndarray]:
  """Run the multitask model over (S, H, W, 3) slices in batches of exactly `batch_size`.

  Returns numpy arrays with S rows: `probabilities` (S, 6) float32, `mask`
  (S, H, W) uint8 class ids, with detection `box_boxes` (S, D, 4),
  `box_scores`, `box_classes` and `box_valid` (S, D), and with token
  features `tokens` (S, h, w, C).
  """
  if batch_size < 1:
    raise InputError(f"batch_size is {batch_size}, expected at least 1 slice")
  graphdef, state = nnx.split(model)
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, images.shape[0], batch_size):
    batch = images[start : start + batch_size]
    count = batch.shape[0]
    if count < batch_size:
      padding = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
      batch = np.concatenate([batch, padding])
    outputs = _slice_forward_jit(graphdef, settings, state, batch)
    for key, value in outputs.items():
      parts.setdefault(key, []).append(np.asarray(value)[:count])
  return {key: np.concatenate(values) for key, values in parts.items()}


# ------------------------------------------------------------- Aggregator ---


def _scan_head_forward(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, slice_mask: jax.Array
) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return jax.nn.sigmoid(model.head(tokens, slice_mask).astype(jnp.float32))


def _scan_model_forward(
    graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, slice_mask: jax.Array
) -> jax.Array:
  model = nnx.merge(graphdef, state)
  return jax.nn.sigmoid(model(images, slice_mask).astype(jnp.float32))


_scan_head_jit = compile_options.forward_jit(_scan_head_forward, static_argnums=0)
_scan_model_jit = compile_options.forward_jit(_scan_model_forward, static_argnums=0)


def scan_probabilities_from_tokens(scan_model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
  """Return one scan's (K,) probabilities from its (S, h, w, C) tokens via `ScanModel.head`."""
  graphdef, state = nnx.split(scan_model)
  slice_mask = np.ones((1, tokens.shape[0]), bool)
  return np.asarray(_scan_head_jit(graphdef, state, tokens[None], slice_mask))[0]


def scan_probabilities_from_images(scan_model: nnx.Module, images: np.ndarray) -> np.ndarray:
  """Return one scan's (K,) probabilities from its (S, H, W, 3) images via the whole `ScanModel`."""
  graphdef, state = nnx.split(scan_model)
  slice_mask = np.ones((1, images.shape[0]), bool)
  return np.asarray(_scan_model_jit(graphdef, state, images[None], slice_mask))[0]


def aggregator_slices(num_slices: int, max_slices: int) -> np.ndarray:
  """Return the slice indices passed to the aggregator: all, or `max_slices` evenly spaced ones."""
  if num_slices <= max_slices:
    return np.arange(num_slices)
  from uem_ich_jax.data import pipeline

  return pipeline.even_slice_indices(num_slices, max_slices)


def _comparable_encoder(config: Any) -> Any:
  """Return `config` with the fields that do not change encoder outputs in evaluation mode reset."""
  return dataclasses.replace(
      config,
      head=None,
      num_classes=0,
      head_dropout=None,
      drop_path_rate=0.0,
      depthwise="auto",
      remat="none",
  )


def _encoder_arrays(model: nnx.Module, head_prefix: str) -> dict[str, np.ndarray]:
  from uem_ich_jax.train import stages

  _, params, _, extra = stages.split_model(model)
  arrays = {}
  for kind, tree in (("params", params), ("extra", extra)):
    encoder = stages.root_encoder_arrays(tree, head_prefix=head_prefix)
    arrays.update({f"{kind}/{name}": value for name, value in stages.flatten(encoder).items()})
  return arrays


def encoder_difference(
    slice_model: nnx.Module,
    slice_config: ml_collections.ConfigDict,
    scan_model: nnx.Module,
    scan_config: ml_collections.ConfigDict,
) -> str | None:
  """Return why the two runs' encoders differ, or None when they compute the same maps.

  Compares the encoder settings that change outputs, then every encoder
  parameter and BatchNorm statistic (all arrays outside each run's
  `config.optim.head_prefix`) for exact equality.
  """
  if _comparable_encoder(slice_model.config) != _comparable_encoder(scan_model.config):
    return (
        f"the encoder settings differ: {_comparable_encoder(slice_model.config)} and"
        f" {_comparable_encoder(scan_model.config)}"
    )
  slice_arrays = _encoder_arrays(slice_model, slice_config.optim.head_prefix)
  scan_arrays = _encoder_arrays(scan_model, scan_config.optim.head_prefix)
  if set(slice_arrays) != set(scan_arrays):
    differing = sorted(set(slice_arrays) ^ set(scan_arrays))
    return f"the encoders hold different arrays, for example {differing[:3]}"
  for name, value in slice_arrays.items():
    other = scan_arrays[name]
    value, other = np.asarray(value), np.asarray(other)
    if value.shape != other.shape or not np.array_equal(value, other):
      return f"the encoder array {name} differs"
  return None


# ---------------------------------------------------------- Mapping back ---


@dataclasses.dataclass(frozen=True)
class ModelGrid:
  """Position of the model input's pixels on the scan's grid as read.

  Attributes:
    image_size: rows and columns of the model input.
    starts: source (row, column) of square-field-of-view pixel (0, 0);
      negative where the square was padded with air.
    pixels: side of the square field of view in source pixels, (rows, columns).
    source_shape: rows and columns of the scan as read.
  """

  image_size: int
  starts: tuple[int, int]
  pixels: tuple[int, int]
  source_shape: tuple[int, int]

  @property
  def covers_scan(self) -> bool:
    """Whether the square field of view contains every source pixel (nothing was cropped)."""
    return all(
        start <= 0 and start + pixels >= length
        for start, pixels, length in zip(self.starts, self.pixels, self.source_shape)
    )


def model_grid(volume: ct.CTVolume, geometry: predict.InputGeometry) -> ModelGrid:
  """Return the `ModelGrid` of `predict.model_input(volume, geometry)`."""
  return ModelGrid(
      image_size=geometry.image_size,
      starts=predict.square_starts(volume, geometry.field_of_view_mm),
      pixels=predict.square_pixels(volume, geometry.field_of_view_mm),
      source_shape=(volume.shape[1], volume.shape[2]),
  )


def _nearest_model_index(
    length: int, start: int, pixels: int, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Return each source pixel's nearest model pixel along one axis, and whether it is inside."""
  square = np.arange(length) - start
  inside = (square >= 0) & (square < pixels)
  index = np.floor((square + 0.5) * image_size / pixels).astype(np.int64)
  return np.clip(index, 0, image_size - 1), inside


def mask_to_source(mask: np.ndarray, grid: ModelGrid) -> np.ndarray:
  """Map a (S, image_size, image_size) model-input mask onto the source grid by nearest neighbour.

  Source pixels outside the square field of view get 0.
  """
  rows, rows_inside = _nearest_model_index(
      grid.source_shape[0], grid.starts[0], grid.pixels[0], grid.image_size
  )
  columns, columns_inside = _nearest_model_index(
      grid.source_shape[1], grid.starts[1], grid.pixels[1], grid.image_size
  )
  source = np.asarray(mask)[:, rows[:, None], columns[None, :]]
  source[:, ~(rows_inside[:, None] & columns_inside[None, :])] = 0
  return source.astype(np.uint8)


def mask_to_square(mask: np.ndarray, grid: ModelGrid) -> np.ndarray:
  """Map a model-input mask onto the square field of view (the grid the overview shows)."""
  square = dataclasses.replace(grid, starts=(0, 0), source_shape=grid.pixels)
  return mask_to_source(mask, square)


def boxes_to_source(boxes: np.ndarray, grid: ModelGrid) -> np.ndarray:
  """Map (..., 4) model-input boxes (row_min, column_min, row_max, column_max) to source pixels.

  Coordinates are on pixel edges (pixel i spans [i, i + 1)), so a model edge
  e lies at source edge start + e * pixels / image_size. Boxes
  are clipped to the scan's rows and columns, because the padded part of the
  square has no source pixels.
  """
  boxes = np.asarray(boxes, np.float64)
  scale = np.array(grid.pixels * 2, np.float64) / grid.image_size
  offset = np.array(grid.starts * 2, np.float64)
  limit = np.array(grid.source_shape * 2, np.float64)
  return np.clip(boxes * scale + offset, 0.0, limit)


# ------------------------------------------------------------------ Timing ---


class StageTimer:
  """Wall-clock seconds per named stage (`time.perf_counter`), each logged when it ends."""

  def __init__(self) -> None:
    self.seconds = {name: 0.0 for name in STAGES}
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def stage(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start
      logger.info("predict %s: %.2f s", name, self.seconds[name])

  def report(self) -> dict[str, float]:
    """Return every stage's seconds and the total since the timer started."""
    return {**self.seconds, "total": time.perf_counter() - self._start}


# ------------------------------------------------------------ Runs ---------


@dataclasses.dataclass
class _Runs:
  """The restored runs of one prediction."""

  slice_model: nnx.Module
  slice_config: ml_collections.ConfigDict
  slice_step: int
  scan_model: nnx.Module | None = None
  scan_config: ml_collections.ConfigDict | None = None
  scan_step: int | None = None
  scan_geometry: predict.InputGeometry | None = None
  # Why the aggregator does not reuse the multitask encoder, or None when it does.
  reuse_blocker: str | None = None


def check_aggregator_run(aggregator_dir: pathlib.Path) -> None:
  """Raise PredictError unless `aggregator_dir` is the work directory of an aggregator run."""
  from uem_ich_jax.train import checkpoint

  stage = checkpoint.load_config(aggregator_dir).stage
  if stage != "aggregator":
    raise PredictError(
        f"--aggregator {aggregator_dir} is a {stage!r} run; it needs the work directory of an"
        " 'aggregator' run (configs/aggregator_synthetic.py)"
    )


def aggregator_geometry(config: ml_collections.ConfigDict) -> predict.InputGeometry:
  """Return an aggregator run's input geometry; its size must be `config.model.image_size`."""
  geometry = predict.input_geometry(config)
  if geometry.image_size != int(config.model.image_size):
    raise PredictError(
        f"the aggregator run's data has {geometry.image_size}-pixel slices, but its model was"
        f" built for config.model.image_size {config.model.image_size}"
    )
  return geometry


def _restore(
    checkpoint_dir: pathlib.Path,
    step: int | None,
    aggregator_dir: pathlib.Path | None,
    aggregator_step: int | None,
) -> _Runs:
  from uem_ich_jax.train import checkpoint

  slice_step = predict.resolve_step(checkpoint_dir, step)
  slice_model, slice_config = checkpoint.restore_model(checkpoint_dir, slice_step)
  runs = _Runs(slice_model, slice_config, slice_step)
  if aggregator_dir is not None:
    runs.scan_step = predict.resolve_step(aggregator_dir, aggregator_step)
    runs.scan_model, runs.scan_config = checkpoint.restore_model(aggregator_dir, runs.scan_step)
  return runs


def restore_runs(
    checkpoint_dir: str | os.PathLike,
    *,
    step: int | None = None,
    aggregator_dir: str | os.PathLike | None = None,
    aggregator_step: int | None = None,
) -> _Runs:
  """Restore the multitask run (and the aggregator run) once, for `predict_scan(runs=...)`."""
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  if aggregator_dir is not None:
    aggregator_dir = pathlib.Path(aggregator_dir)
    check_aggregator_run(aggregator_dir)
  runs = _restore(checkpoint_dir, step, aggregator_dir, aggregator_step)
  if runs.scan_model is not None:
    runs.scan_geometry = aggregator_geometry(runs.scan_config)
    runs.reuse_blocker = _reuse_blocker(runs, predict.input_geometry(runs.slice_config))
  return runs


def _reuse_blocker(runs: _Runs, slice_geometry: predict.InputGeometry) -> str | None:
  """Return why the aggregator cannot reuse the multitask encoder's maps, or None when it can."""
  scan_geometry = runs.scan_geometry
  if scan_geometry != slice_geometry:
    return (
        f"the aggregator's input ({scan_geometry.image_size} px over"
        f" {scan_geometry.field_of_view_mm} mm) differs from the multitask run's"
        f" ({slice_geometry.image_size} px over {slice_geometry.field_of_view_mm} mm)"
    )
  return encoder_difference(runs.slice_model, runs.slice_config, runs.scan_model, runs.scan_config)


# ------------------------------------------------------------------ Report ---


def _model_info(
    checkpoint_dir: pathlib.Path, step: int, config: ml_collections.ConfigDict, batch_size: int
) -> dict[str, Any]:
  from uem_ich_jax.train import multitask

  model = config.model
  info = {
      "workdir": str(checkpoint_dir),
      "step": step,
      "stage": config.stage,
      "name": model.name,
      "variant": model.get("variant"),
      "segmentation_classes": int(
          model.get("segmentation_classes", multitask.HEAD_DEFAULTS["segmentation_classes"])
      ),
      "detection": bool(multitask.setting(config, "detection")),
      "classify_at_stride4": bool(model.get("classify_at_stride4", False)),
      "dtype": str(model.get("dtype", "float32")),
      "batch_size": batch_size,
      "dataset": config.data.name,
      "config_sha256": predict.config_sha256(checkpoint_dir),
  }
  if config.data.name.startswith("synthetic_ich"):
    info["note"] = (
        "trained on synthetic phantom scans only; its outputs on a real scan are not a clinical"
        " finding"
    )
  return info


def _mask_classes(segmentation_classes: int) -> dict[str, str]:
  if segmentation_classes == 1:
    return {"0": "background", "1": "blood (any subtype)"}
  classes = {"0": "background"}
  classes.update({str(uem_ich_jax.MASK_CLASS_IDS[name]): name for name in uem_ich_jax.SUBTYPES})
  return classes


def _volume_ml(
    mask: np.ndarray, volume: ct.CTVolume, segmentation_classes: int, warnings: list[str]
) -> dict[str, float | None]:
  """Return the mL of "any" and, for a 6-class head, of every subtype (None: bad geometry)."""
  names = ("any",) if segmentation_classes == 1 else ("any",) + uem_ich_jax.SUBTYPES
  try:
    per_class = clinical.hematoma_ml(mask, volume)
  except InputError as error:
    warnings.append(f"blood volumes not measured: {error}")
    return {name: None for name in names}
  # A binary mask contains id 1 only, which hematoma_ml reports under the first subtype.
  volumes = {"any": finite_or_none(sum(per_class.values()))}
  if segmentation_classes != 1:
    volumes.update({name: finite_or_none(per_class[name]) for name in uem_ich_jax.SUBTYPES})
  return volumes


def _bleed_side(mask: np.ndarray, volume: ct.CTVolume, warnings: list[str]) -> dict | None:
  try:
    side = clinical.bleed_side(mask, volume)
  except InputError as error:
    warnings.append(f"bleed side not estimated: {error}")
    return None
  return {
      "side": side["side"],
      "left_ml": finite_or_none(side["left_ml"]),
      "right_ml": finite_or_none(side["right_ml"]),
      "midline_normal_lps": [finite_or_none(value) for value in side["midline"].normal],
  }


def _slice_voxels(mask: np.ndarray, volume: ct.CTVolume) -> tuple[np.ndarray, np.ndarray | None]:
  """Return blood voxels per slice, and mL per slice (None when the geometry is invalid)."""
  voxels = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
  try:
    return voxels, voxels * clinical.voxel_volume_ml(volume)
  except InputError:
    return voxels, None


def _boxes(outputs: dict[str, np.ndarray], index: int, grid: ModelGrid) -> list[dict[str, Any]]:
  valid = np.asarray(outputs["box_valid"][index], bool)
  boxes = np.asarray(outputs["box_boxes"][index])[valid]
  source = boxes_to_source(boxes, grid)
  scores = np.asarray(outputs["box_scores"][index])[valid]
  classes = np.asarray(outputs["box_classes"][index])[valid]
  entries = []
  for box, source_box, score, class_id in zip(boxes, source, scores, classes):
    entries.append({
        "class": uem_ich_jax.SUBTYPES[int(class_id) - 1],
        "class_id": int(class_id),
        "score": finite_or_none(score),
        "box_model_px": [finite_or_none(value) for value in box],
        "box_source_px": [finite_or_none(value) for value in source_box],
    })
  return entries


def _aggregator_section(
    runs: _Runs,
    aggregator_dir: pathlib.Path,
    probabilities: np.ndarray,
    used: np.ndarray,
) -> dict[str, Any]:
  from uem_ich_jax.train import aggregate

  config = runs.scan_config
  label_set = aggregate.aggregator_setting(config, "label_set")
  names = aggregate.label_names(label_set)
  thresholds, source = predict.validation_thresholds(
      aggregator_dir, runs.scan_step, config, names=names
  )
  scan = {}
  for name, probability in zip(names, probabilities):
    scan[name] = {
        "probability": finite_or_none(probability),
        "threshold": thresholds[name],
        "positive": bool(probability >= thresholds[name]),
    }
  return {
      "workdir": str(aggregator_dir),
      "step": runs.scan_step,
      "label_set": label_set,
      "labels": list(names),
      "token_features": runs.scan_model.token_features,
      "max_slices": runs.scan_model.max_slices,
      "encoder_reused": runs.reuse_blocker is None,
      "encoder_note": (
          "the multitask encoder's maps were reused, because both runs hold the same encoder"
          if runs.reuse_blocker is None
          else f"the slices were encoded again, because {runs.reuse_blocker}"
      ),
      "slices_used": [int(index) for index in used],
      "thresholds_from": source,
      "scan": scan,
  }


# ------------------------------------------------------------------ Predict ---


def _scan_label_probabilities(
    runs: _Runs,
    volume: ct.CTVolume,
    images: np.ndarray,
    geometry: predict.InputGeometry,
    tokens: np.ndarray | None,
    warnings: list[str],
) -> tuple[np.ndarray, np.ndarray]:
  """Return the aggregator's (K,) scan probabilities and the slice indices it was given."""
  used = aggregator_slices(volume.num_slices, runs.scan_model.max_slices)
  if len(used) < volume.num_slices:
    warnings.append(
        f"the scan has {volume.num_slices} slices, more than the aggregator's max_slices"
        f" {runs.scan_model.max_slices}; it saw {len(used)} evenly spaced slices"
        " (aggregator.slices_used)"
    )
  if tokens is not None:
    return scan_probabilities_from_tokens(runs.scan_model, tokens[used]), used
  if runs.scan_geometry != geometry:
    images, _ = predict.model_input(volume, runs.scan_geometry)
  return scan_probabilities_from_images(runs.scan_model, images[used]), used


@dataclasses.dataclass
class _Prediction:
  """Outputs of the model stages for one scan, before the report is assembled."""

  checkpoint_dir: pathlib.Path
  input_path: str
  batch_size: int
  volume: ct.CTVolume
  geometry: predict.InputGeometry
  grid: ModelGrid
  settings: SliceModelSettings
  outputs: dict[str, np.ndarray]
  aggregator: dict[str, Any] | None
  warnings: list[str]
  # The grid segmentation.nii.gz is written on; chosen in the postprocess stage.
  nifti_grid: segmentation_files.OutputGrid | None = None


def _assemble_report(
    runs: _Runs, prediction: _Prediction, source_mask: np.ndarray
) -> tuple[dict[str, Any], dict[str, float]]:
  """Build the report (without timings) and return it with the slice thresholds."""
  volume, outputs, warnings = prediction.volume, prediction.outputs, prediction.warnings
  model_info = _model_info(
      prediction.checkpoint_dir, runs.slice_step, runs.slice_config, prediction.batch_size
  )
  segmentation_classes = model_info["segmentation_classes"]
  volume_ml = _volume_ml(source_mask, volume, segmentation_classes, warnings)
  side = _bleed_side(source_mask, volume, warnings)
  voxels, slice_ml = _slice_voxels(source_mask, volume)
  thresholds, threshold_source = predict.validation_thresholds(
      prediction.checkpoint_dir, runs.slice_step, runs.slice_config, section="classification"
  )
  report = predict.build_report(
      volume,
      outputs["probabilities"],
      input_path=prediction.input_path,
      model_info=model_info,
      thresholds=thresholds,
      threshold_source=threshold_source,
      geometry=prediction.geometry,
  )
  detection = prediction.settings.detection
  for index, entry in enumerate(report["slices"]):
    entry["blood_voxels"] = int(voxels[index])
    entry["blood_ml"] = None if slice_ml is None else finite_or_none(slice_ml[index])
    if detection:
      entry["boxes"] = _boxes(outputs, index, prediction.grid)

  report = {"schema_version": SCHEMA_VERSION, **report}
  report["segmentation"] = {
      "file": SEGMENTATION_FILE,
      "classes": _mask_classes(segmentation_classes),
      "head": "binary (sigmoid > 0.5)" if segmentation_classes == 1 else "6 classes (argmax)",
      "field_of_view_covers_scan": prediction.grid.covers_scan,
      "voxels": int(voxels.sum()),
      "volume_ml": volume_ml,
      "bleed_side": side,
      "grid": prediction.nifti_grid.report(),
      # Filled in when segmentation.dcm is written.
      "dicom_seg": None,
  }
  report["detection"] = None
  if detection:
    report["detection"] = {
        "score_threshold": prediction.settings.score_threshold,
        "max_detections": prediction.settings.max_detections,
        "box_format": BOX_FORMAT,
        "count": sum(len(entry["boxes"]) for entry in report["slices"]),
    }
  report["aggregator"] = prediction.aggregator
  report["warnings"] = warnings
  report["outputs"] = {
      "report": predict.REPORT_FILE,
      "segmentation": SEGMENTATION_FILE,
      "overview": predict.OVERVIEW_FILE,
      "html": report_html.HTML_FILE,
      "dicom_seg": None,
  }
  return report, thresholds


def _write_dicom_seg(
    output_dir: pathlib.Path,
    report: dict[str, Any],
    prediction: _Prediction,
    source_mask: np.ndarray,
) -> None:
  """Write segmentation.dcm for a DICOM input and record it in `report`.

  A failure caused by the source data becomes a report warning, so the other
  outputs are still written.
  """
  if not segmentation_files.has_dicom_source(prediction.volume):
    return
  try:
    section = segmentation_files.write_dicom_seg(
        output_dir / DICOM_SEG_FILE,
        source_mask,
        prediction.volume,
        report["model"]["segmentation_classes"],
        report["model"]["name"],
    )
  except segmentation_files.DicomSegError as error:
    logger.warning("%s not written: %s", DICOM_SEG_FILE, error)
    report["warnings"].append(f"{DICOM_SEG_FILE} not written: {error}")
    return
  report["segmentation"]["dicom_seg"] = section
  report["outputs"]["dicom_seg"] = DICOM_SEG_FILE


def _write_outputs(
    output_dir: pathlib.Path,
    report: dict[str, Any],
    prediction: _Prediction,
    source_mask: np.ndarray,
    square: ct.CTVolume,
    thresholds: dict[str, float],
) -> None:
  """Write segmentation.nii.gz, segmentation.dcm, overview.png and report.html.

  report.json is written last, by the caller.
  """
  from uem_ich_jax.infer import overview

  try:
    output_dir.mkdir(parents=True, exist_ok=True)
    segmentation_files.write_nifti(
        output_dir / SEGMENTATION_FILE, source_mask, prediction.volume, prediction.nifti_grid
    )
  except (OSError, ValueError) as error:
    raise PredictError(f"failed to write the segmentation to {output_dir}: {error}") from error
  _write_dicom_seg(output_dir, report, prediction, source_mask)
  title = predict.overview_title(report)
  blood = report["segmentation"]["volume_ml"]["any"]
  if blood is not None:
    title += f"; blood {blood:.1f} mL"
  aggregator = report["aggregator"]
  if aggregator is not None:
    first = aggregator["labels"][0]
    scan_label = aggregator["scan"][first]
    if scan_label["probability"] is not None:
      verdict = "positive" if scan_label["positive"] else "negative"
      title += f"; scan {first} {verdict} ({scan_label['probability']:.2f}, aggregator)"
  overview.save_overview(
      square.hu,
      prediction.outputs["probabilities"],
      thresholds,
      output_dir / predict.OVERVIEW_FILE,
      title=title,
      mask=mask_to_square(prediction.outputs["mask"], prediction.grid),
      boxes=_square_boxes(report, prediction.grid),
  )
  report_html.write_report_html(
      output_dir / report_html.HTML_FILE, report, square.hu, prediction.outputs["mask"]
  )


def _square_boxes(report: dict[str, Any], grid: ModelGrid) -> list[np.ndarray] | None:
  """Return each slice's boxes on the square field of view's pixels, or None without detection."""
  if report["detection"] is None:
    return None
  rows, columns = (pixels / grid.image_size for pixels in grid.pixels)
  scale = np.array([rows, columns, rows, columns])
  boxes = []
  for entry in report["slices"]:
    model_px = [
        [np.nan if value is None else value for value in box["box_model_px"]]
        for box in entry["boxes"]
    ]
    boxes.append(np.array(model_px, np.float64).reshape(-1, 4) * scale)
  return boxes


def predict_scan(
    checkpoint_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    step: int | None = None,
    series_uid: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    aggregator_dir: str | os.PathLike | None = None,
    aggregator_step: int | None = None,
    runs: _Runs | None = None,
    max_voxels: int | None = None,
) -> dict[str, Any]:
  """Predict one scan with a multitask run and, optionally, an aggregator run.

  Writes report.json (schema in this module's docstring), segmentation.nii.gz
  (uint8 class ids on the grid in `segmentation.grid`), for DICOM input
  segmentation.dcm (a DICOM SEG of the source frames), and overview.png into
  `output_dir`, and returns the report. `runs`, from `restore_runs` with the
  same run arguments, skips the restore (a batch restores once).
  `max_voxels` is the largest scan read, in voxels; None takes the multitask
  run's `config.data.max_voxels` (see `predict.voxel_limit`).

  Raises:
    PredictError: a missing input, a scan larger than the voxel limit, a run
      of the wrong stage, or an output that cannot be written. The message
      names the path.
    CheckpointError: a run directory without a config or checkpoints.
  """
  from uem_ich_jax.train import checkpoint

  timer = StageTimer()
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  output_dir = pathlib.Path(output_dir)
  predict.check_request(output_dir, batch_size)
  if aggregator_dir is not None:
    aggregator_dir = pathlib.Path(aggregator_dir)
    check_aggregator_run(aggregator_dir)
  warnings: list[str] = []
  predict.remove_earlier_outputs(output_dir)

  with timer.stage("read"):
    # The config alone, read as JSON, so that a scan too large fails before the restore.
    slice_config = checkpoint.load_config(checkpoint_dir) if runs is None else runs.slice_config
    limit = predict.voxel_limit(slice_config, checkpoint_dir, max_voxels)
    volume, series_choice = predict.read_study(input_path, series_uid=series_uid, limit=limit)
  # TODO: restoring takes about 3.7 s for a tiny multitask and aggregator run,
  # most of it in nnx.eval_shape of the model builders (stages.model_from_arrays).
  with timer.stage("restore"):
    if runs is None:
      runs = restore_runs(
          checkpoint_dir, step=step, aggregator_dir=aggregator_dir, aggregator_step=aggregator_step
      )
    elif (runs.scan_model is None) != (aggregator_dir is None):
      raise PredictError(
          f"the restored runs {'include' if runs.scan_model is not None else 'lack'} an"
          f" aggregator run, but aggregator_dir is {aggregator_dir}; pass the arguments given to"
          " restore_runs"
      )
    geometry = predict.input_geometry(runs.slice_config)
  reuse = runs.scan_model is not None and runs.reuse_blocker is None

  with timer.stage("preprocess"):
    images, square = predict.model_input(volume, geometry)
    grid = model_grid(volume, geometry)
  if not grid.covers_scan:
    warnings.append(
        f"the scan is wider than the {geometry.field_of_view_mm:g} mm field of view of the"
        " model input; voxels outside it are not segmented (class 0)"
    )

  with timer.stage("slice_model"):
    token_features = runs.scan_model.token_features if reuse else None
    settings = slice_settings(runs.slice_config, token_features)
    outputs = run_slice_model(runs.slice_model, images, settings, batch_size=batch_size)

  aggregator = None
  if runs.scan_model is not None:
    with timer.stage("aggregator"):
      scan_probs, used = _scan_label_probabilities(
          runs, volume, images, geometry, outputs.get("tokens"), warnings
      )
      aggregator = _aggregator_section(runs, aggregator_dir, scan_probs, used)

  prediction = _Prediction(
      checkpoint_dir=checkpoint_dir,
      input_path=str(input_path),
      batch_size=batch_size,
      volume=volume,
      geometry=geometry,
      grid=grid,
      settings=settings,
      outputs=outputs,
      aggregator=aggregator,
      warnings=warnings,
  )
  with timer.stage("postprocess"):
    source_mask = mask_to_source(outputs["mask"], grid)
    prediction.nifti_grid = segmentation_files.output_grid(volume)
    report, thresholds = _assemble_report(runs, prediction, source_mask)
    report["series_choice"] = series_choice
  with timer.stage("write"):
    _write_outputs(output_dir, report, prediction, source_mask, square, thresholds)

  report["timings_s"] = {name: finite_or_none(value) for name, value in timer.report().items()}
  try:
    (output_dir / predict.REPORT_FILE).write_text(
        json.dumps(report, indent=2, allow_nan=False) + "\n"
    )
  except OSError as error:
    raise PredictError(f"failed to write the report to {output_dir}: {error}") from error
  return report
