"""`uem-ich predict`: one scan through a trained slice classifier to a JSON report and a picture.

Model input rule, the same as for the `synthetic_ich` training data. Each
slice is a square field of view of `field_of_view_mm` centred on the image,
resized to `image_size` pixels. It is then windowed (brain, subdural, bone)
through the same uint8 levels that the dataset stores. A real scan is centre-cropped or padded with
air to that square field of view using its pixel spacing, separately for rows
and columns, then resized with linear interpolation. Slices are classified as
acquired: a tilted or unevenly spaced series is not resampled, because every
slice is judged on its own.

A multitask run goes to `uem_ich_jax.infer.scan_predict`, which reuses these
helpers and adds the segmentation, boxes, blood volumes and, with an
aggregator run, scan labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import uem_ich_jax
from uem_ich_jax import compile_options
from uem_ich_jax import ct
from uem_ich_jax.ct import inspect as ct_inspect
from uem_ich_jax.ct.series_choice import read_study as read_dicom_study
from uem_ich_jax.ct.volume import AIR_HU, MAX_VOXELS
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

LABELS = uem_ich_jax.SLICE_LABELS
DEFAULT_THRESHOLD = 0.5
REPORT_FILE = "report.json"
OVERVIEW_FILE = "overview.png"


class PredictError(InputError):
  """A scan, run or output that `predict` cannot use; the message names the path."""


@dataclasses.dataclass(frozen=True)
class InputGeometry:
  """In-plane size of the model input: `image_size` pixels over `field_of_view_mm`."""

  image_size: int
  field_of_view_mm: float


def input_geometry(config: ml_collections.ConfigDict) -> InputGeometry:
  """Image size and field of view of a run's training data.

  Taken from `config.dataset` when the run's config describes its build (the
  quickstart's does); otherwise read from the first example of the run's
  dataset: its image size, and its column spacing times that size.
  """
  dataset = config.get("dataset")
  if dataset is not None and "image_size" in dataset and "field_of_view_mm" in dataset:
    return InputGeometry(int(dataset.image_size), float(dataset.field_of_view_mm))
  from uem_ich_jax.data import pipeline

  try:
    source = pipeline.load_source(
        config.data.name, split=config.data.split, data_dir=config.data.data_dir or None
    )
    example = source[0]
  except Exception as error:  # TFDS raises many types for a missing dataset.
    raise PredictError(
        f"the run's config names no input size (config.dataset) and its dataset"
        f" {config.data.name!r} in {config.data.data_dir or 'the TFDS default'} cannot be read"
        f" ({type(error).__name__}: {error})"
    ) from error
  # Slice examples store (row, column, 3) images, scan examples (slice, row, column, 3).
  size = int(np.asarray(example["image"]).shape[-2])
  column_mm = float(np.asarray(example["spacing"])[2])
  return InputGeometry(size, column_mm * size)


@dataclasses.dataclass(frozen=True)
class VoxelLimit:
  """The largest scan prediction reads, in voxels, and where that number is set (for messages)."""

  max_voxels: int
  source: str

  @classmethod
  def default(cls) -> VoxelLimit:
    return cls(MAX_VOXELS, "the default, uem_ich_jax.ct.volume.MAX_VOXELS")


def voxel_limit(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    max_voxels: int | None = None,
) -> VoxelLimit:
  """Return the size limit for reading scans with the run in `workdir`, whose config is `config`.

  `max_voxels` (the --max-voxels option) wins over the run's
  `config.data.max_voxels`. A run saved before that field existed gets
  `ct.volume.MAX_VOXELS`, the readers' default.
  """
  if max_voxels is not None:
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
      raise PredictError(f"--max-voxels {max_voxels!r} is invalid: expected a whole number >= 1")
    return VoxelLimit(max_voxels, "set by --max-voxels")
  data = config.get("data")
  value = None if data is None else data.get("max_voxels")
  if value is None:
    return VoxelLimit(
        MAX_VOXELS, f"the default, because the config of {workdir} has no data.max_voxels"
    )
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise PredictError(
        f"{workdir}: config.data.max_voxels is {value!r}, which is invalid: expected a whole"
        " number >= 1. Pass --max-voxels to override it"
    )
  return VoxelLimit(value, f"set by config.data.max_voxels of {workdir}")


def read_study(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    limit: VoxelLimit | None = None,
) -> tuple[ct.CTVolume, dict[str, Any] | None]:
  """Read a NIfTI file, or a DICOM folder or file, choosing one series of a study folder.

  Returns the volume and the report's `series_choice` section: None for a
  NIfTI file, else which series was read and why each other one was not.
  A folder with several series is read by the CQ500 rule
  (`ct.series_choice.RULE`) unless `series_uid` names one. DICOM slices
  whose negative HU are stored modulo 4096 (12-bit unsigned, as in the RSNA
  2019 release) are unwrapped, and a reader warning states it.

  `limit` (by default `VoxelLimit.default()`) is checked against the file
  headers before any pixel data is read. A larger scan raises PredictError,
  which names the file, its size and the --max-voxels option.
  """
  path = pathlib.Path(path)
  limit = limit or VoxelLimit.default()
  if not path.exists():
    raise PredictError(f"{path} does not exist")
  try:
    # A file named .nii or .nii.gz goes to the NIfTI reader even when its content is
    # not NIfTI, so the error describes what is wrong with it as NIfTI.
    named_nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if path.is_file() and (named_nifti or ct_inspect.is_nifti(path)):
      if series_uid is not None:
        raise PredictError(
            f"{path}: a series UID ({series_uid}) applies to DICOM folders, not to NIfTI files"
        )
      return ct.read_nifti(path, max_voxels=limit.max_voxels), None
    volume, choice = read_dicom_study(
        path, series_uid=series_uid, max_voxels=limit.max_voxels, unwrap_12bit=True
    )
  except ct.VolumeTooLargeError as error:
    raise PredictError(
        f"{error.description}, more than the {error.max_voxels:,} accepted ({limit.source})."
        f" To predict this scan, pass --max-voxels {error.num_voxels} or more (the max_voxels"
        " argument of predict.predict)"
    ) from error
  return volume, choice.to_json()


def read_scan(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    limit: VoxelLimit | None = None,
) -> ct.CTVolume:
  """Read a NIfTI file or a DICOM folder or file, like `read_study`, and return the volume."""
  return read_study(path, series_uid=series_uid, limit=limit)[0]


def _square_start(current: int, size: int) -> int:
  """Return the source index of square index 0 along one axis (negative when padded)."""
  if current >= size:
    return (current - size) // 2
  return -((size - current) // 2)


def _crop_or_pad(hu: np.ndarray, axis: int, size: int) -> tuple[np.ndarray, int]:
  """Centre-crop or air-pad `hu` along `axis` to `size`; returns the array and the start offset.

  The offset is the source index of new index 0 (negative when padded).
  """
  current = hu.shape[axis]
  start = _square_start(current, size)
  # Decided by the sizes, not by the sign of `start`: padding one pixel has start 0.
  if current >= size:
    return np.take(hu, np.arange(start, start + size), axis=axis), start
  widths = [(0, 0)] * hu.ndim
  widths[axis] = (-start, size - current + start)
  return np.pad(hu, widths, constant_values=AIR_HU), start


def square_pixels(volume: ct.CTVolume, field_of_view_mm: float) -> tuple[int, int]:
  """Return the side of the square field of view in source pixels, along rows and along columns."""
  return tuple(
      max(1, int(round(field_of_view_mm / volume.spacing[axis]))) for axis in (1, 2)
  )


def square_starts(volume: ct.CTVolume, field_of_view_mm: float) -> tuple[int, int]:
  """Return the source (row, column) of square pixel (0, 0); negative where the square is padded."""
  pixels = square_pixels(volume, field_of_view_mm)
  return tuple(
      _square_start(volume.shape[axis], size) for axis, size in zip((1, 2), pixels)
  )


def square_field_of_view(volume: ct.CTVolume, field_of_view_mm: float) -> ct.CTVolume:
  """Centre-crop or air-pad every slice to a `field_of_view_mm` square, keeping the spacing.

  The geometry (positions, affine) moves with the new first pixel.
  """
  hu = np.asarray(volume.hu, dtype=np.float32)
  offsets = []
  for axis, pixels in zip((1, 2), square_pixels(volume, field_of_view_mm)):
    hu, start = _crop_or_pad(hu, axis, pixels)
    offsets.append(start)
  affine = np.asarray(volume.affine, dtype=np.float64).copy()
  shift = offsets[0] * affine[:3, 1] + offsets[1] * affine[:3, 2]
  affine[:3, 3] += shift
  return dataclasses.replace(
      volume,
      hu=hu,
      positions=np.asarray(volume.positions, dtype=np.float64) + shift,
      affine=affine,
  )


def model_input(
    volume: ct.CTVolume, geometry: InputGeometry
) -> tuple[np.ndarray, ct.CTVolume]:
  """Build the float32 (slice, size, size, 3) model input of `volume`.

  Also returns the square-field-of-view volume that the overview shows.
  """
  square = square_field_of_view(volume, geometry.field_of_view_mm)
  resized = ct.resize_inplane(square, (geometry.image_size, geometry.image_size))
  # Through uint8 like the stored dataset, so the levels match training exactly.
  images = ct.uint8_to_model_input(ct.windows_uint8(resized.hu))
  return np.asarray(images, dtype=np.float32), square


def probabilities(model: nnx.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Sigmoid probabilities (slice, 6) in float32, in batches of `batch_size`.

  The last batch is padded to the full size, so one compiled program serves
  every batch.
  """
  graphdef, state = nnx.split(model)

  @compile_options.forward_jit
  def forward(state, batch):
    logits = nnx.merge(graphdef, state)(batch)
    return jax.nn.sigmoid(logits.astype(jnp.float32))

  outputs = []
  for start in range(0, images.shape[0], batch_size):
    batch = images[start : start + batch_size]
    count = batch.shape[0]
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
    outputs.append(np.asarray(forward(state, batch))[:count])
  return np.concatenate(outputs).astype(np.float32)


def resolve_step(workdir: str | os.PathLike, step: int | None) -> int:
  """`step` if the run saved it, else the run's best checkpoint."""
  from uem_ich_jax.train import checkpoint

  manager = checkpoint.run_manager(workdir)
  try:
    return checkpoint.resolve_step(manager, step, workdir=workdir)
  finally:
    manager.close()


def validation_thresholds(
    workdir: str | os.PathLike,
    step: int,
    config: ml_collections.ConfigDict,
    *,
    names: Sequence[str] = LABELS,
    section: str | None = None,
) -> tuple[dict[str, float], str]:
  """Per-label thresholds saved by `uem-ich evaluate` for `step`, and where they came from.

  The thresholds are read from `classes` of the evaluation JSON, or from
  `<section>.classes` when a stage nests its classification result (the
  multitask stage stores it under "classification"). Falls back to 0.5 for
  every label of `names`, with a source text that states it, when no
  evaluation of that step and test fold was saved.
  """
  path = pathlib.Path(workdir) / f"eval_step{step}_fold{config.data.test_fold}.json"
  if path.is_file():
    try:
      result = json.loads(path.read_text())
      classes = (result if section is None else result[section])["classes"]
      return {name: float(classes[name]["threshold"]) for name in names}, str(path)
    except (ValueError, KeyError, TypeError) as error:
      logger.warning(
          "%s contains no valid thresholds (%s), so %.1f is used", path, error, DEFAULT_THRESHOLD
      )
  return (
      {name: DEFAULT_THRESHOLD for name in names},
      f"default {DEFAULT_THRESHOLD}: no evaluation of step {step} was saved in {workdir}"
      " (run `uem-ich evaluate` to choose thresholds on the validation fold)",
  )


def finite_or_none(value: float) -> float | None:
  """Return `value` as a float, or None when it is NaN or infinite (strict JSON has neither)."""
  value = float(value)
  return value if math.isfinite(value) else None


def build_report(
    volume: ct.CTVolume,
    probs: np.ndarray,
    *,
    input_path: str,
    model_info: dict[str, Any],
    thresholds: dict[str, float],
    threshold_source: str,
    geometry: InputGeometry,
    series_choice: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Assemble the JSON report of one scan; every number is finite or None (no NaN in JSON).

  `series_choice` is the section from `read_study` (None for NIfTI).
  """
  provenance = volume.provenance
  positions = volume.slice_positions_mm
  uids = provenance.sop_instance_uids
  slices = []
  for index in range(volume.num_slices):
    slices.append({
        "index": index,
        "position_mm": finite_or_none(positions[index]),
        "sop_instance_uid": uids[index] if index < len(uids) and uids[index] else None,
        "probabilities": {name: finite_or_none(probs[index, k]) for k, name in enumerate(LABELS)},
    })
  scan = {}
  for k, name in enumerate(LABELS):
    top = int(np.argmax(probs[:, k]))
    maximum = float(probs[top, k])
    scan[name] = {
        "max_probability": finite_or_none(maximum),
        "slice": top,
        "threshold": thresholds[name],
        "positive": bool(maximum >= thresholds[name]),
    }
  top_slice = int(np.argmax(probs[:, 0]))
  tilt = float(provenance.gantry_tilt_deg)
  return {
      "input": input_path,
      "series_uid": provenance.series_uid or None,
      "series_description": provenance.series_description or None,
      "series_choice": series_choice,
      "shape": list(volume.shape),
      "spacing_mm": [float(value) for value in volume.spacing],
      "gantry_tilt_deg": finite_or_none(tilt),
      "spacing_varies": bool(provenance.spacing_varies),
      "reader_warnings": list(provenance.warnings),
      "slices_as_acquired": (
          "each slice is classified as acquired (no resampling); positions are along the slice"
          " normal" + (f"; the gantry tilt of {tilt:.1f} degrees is not corrected" if tilt else "")
      ),
      "model_input": {
          "image_size": geometry.image_size,
          "field_of_view_mm": geometry.field_of_view_mm,
          "rule": "centre-crop or air-pad each slice to a square field of view, resize linearly,"
          " window brain 40/80, subdural 80/200, bone 500/2000",
      },
      "model": model_info,
      "labels": list(LABELS),
      "thresholds_from": threshold_source,
      "scan": scan,
      "top_slice": {
          "index": top_slice,
          "position_mm": finite_or_none(positions[top_slice]),
          "any": finite_or_none(probs[top_slice, 0]),
      },
      "slices": slices,
  }


@dataclasses.dataclass(frozen=True)
class ClassifierRun:
  """A restored classification run, reused for every scan of a batch."""

  workdir: pathlib.Path
  model: nnx.Module
  config: ml_collections.ConfigDict
  step: int
  geometry: InputGeometry


def _check_stages(
    checkpoint_dir: pathlib.Path, aggregator_dir: str | os.PathLike | None
) -> str:
  """Return the stage of `checkpoint_dir`, "classification" or "multitask", or raise PredictError."""
  from uem_ich_jax.train import checkpoint

  stage = checkpoint.load_config(checkpoint_dir).stage
  if stage == "multitask":
    return stage
  if stage == "aggregator":
    raise PredictError(
        f"{checkpoint_dir} is an 'aggregator' run; pass it with --aggregator and give the"
        " multitask run whose encoder it uses as --checkpoint"
    )
  if stage != "classification":
    raise PredictError(
        f"{checkpoint_dir} is a {stage!r} run; predict needs a classification or multitask run"
        " (a pretrained encoder is used by training a classifier from it with config.init_from)"
    )
  if aggregator_dir is not None:
    raise PredictError(
        f"--aggregator {aggregator_dir} needs a multitask run as --checkpoint, but"
        f" {checkpoint_dir} is a classification run"
    )
  return stage


def restore_runs(
    checkpoint_dir: str | os.PathLike,
    *,
    step: int | None = None,
    aggregator_dir: str | os.PathLike | None = None,
    aggregator_step: int | None = None,
) -> Any:
  """Restore the runs that `predict` uses, once, to pass to it as `runs` for many scans.

  Returns a `ClassifierRun`, or for a multitask run the object of
  `scan_predict.restore_runs`.
  """
  from uem_ich_jax.train import checkpoint

  checkpoint_dir = pathlib.Path(checkpoint_dir)
  if _check_stages(checkpoint_dir, aggregator_dir) == "multitask":
    from uem_ich_jax.infer import scan_predict

    return scan_predict.restore_runs(
        checkpoint_dir, step=step, aggregator_dir=aggregator_dir, aggregator_step=aggregator_step
    )
  step = resolve_step(checkpoint_dir, step)
  model, config = checkpoint.restore_model(checkpoint_dir, step)
  return ClassifierRun(checkpoint_dir, model, config, step, input_geometry(config))


def predict(
    checkpoint_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    step: int | None = None,
    series_uid: str | None = None,
    batch_size: int | None = None,
    aggregator_dir: str | os.PathLike | None = None,
    aggregator_step: int | None = None,
    runs: Any = None,
    max_voxels: int | None = None,
) -> dict[str, Any]:
  """Run the model of `checkpoint_dir` on every slice of `input_path` and write the outputs.

  A classification run writes `output_dir/report.json` and
  `output_dir/overview.png` here. A multitask run, optionally with an
  aggregator run (`aggregator_dir`), goes through `scan_predict.predict_scan`,
  which also writes the segmentation. `runs`, from `restore_runs` with the
  same run arguments, skips restoring the runs again. `max_voxels` limits
  the scan size (see `voxel_limit`), and None takes the run's config.
  Returns the report.
  """
  from uem_ich_jax.infer import overview

  checkpoint_dir = pathlib.Path(checkpoint_dir)
  output_dir = pathlib.Path(output_dir)
  check_request(output_dir, batch_size)
  if runs is None:
    stage = _check_stages(checkpoint_dir, aggregator_dir)
  else:
    stage = "classification" if isinstance(runs, ClassifierRun) else "multitask"
  if stage == "multitask":
    from uem_ich_jax.infer import scan_predict

    return scan_predict.predict_scan(
        checkpoint_dir,
        input_path,
        output_dir,
        step=step,
        series_uid=series_uid,
        batch_size=batch_size or scan_predict.DEFAULT_BATCH_SIZE,
        aggregator_dir=aggregator_dir,
        aggregator_step=aggregator_step,
        runs=runs,
        max_voxels=max_voxels,
    )
  batch_size = batch_size or 32
  remove_earlier_outputs(output_dir)
  if runs is None:
    from uem_ich_jax.train import checkpoint

    config = checkpoint.load_config(checkpoint_dir)
  else:
    config = runs.config
  limit = voxel_limit(config, checkpoint_dir, max_voxels)
  volume, choice = read_study(input_path, series_uid=series_uid, limit=limit)
  if runs is None:
    runs = restore_runs(checkpoint_dir, step=step)
  model, config, step, geometry = runs.model, runs.config, runs.step, runs.geometry
  images, square = model_input(volume, geometry)
  probs = probabilities(model, images, batch_size=batch_size)
  thresholds, source = validation_thresholds(checkpoint_dir, step, config)
  model_info = {
      "workdir": str(checkpoint_dir),
      "step": step,
      "name": config.model.name,
      "variant": config.model.variant if config.model.name == "convnext_v2" else None,
      "width": config.model.width if config.model.name == "tiny_cnn" else None,
      "depth": config.model.get("depth", 2) if config.model.name == "tiny_cnn" else None,
      "pool": config.model.get("pool", "avg") if config.model.name == "tiny_cnn" else None,
      "stage": config.stage,
      "dataset": config.data.name,
      "config_sha256": config_sha256(checkpoint_dir),
  }
  if config.data.name.startswith("synthetic_ich"):
    model_info["note"] = (
        "trained on synthetic phantom scans only; its probabilities on a real scan are not a"
        " clinical finding"
    )
  report = build_report(
      volume,
      probs,
      input_path=str(input_path),
      model_info=model_info,
      thresholds=thresholds,
      threshold_source=source,
      geometry=geometry,
      series_choice=choice,
  )
  try:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
  except OSError as error:
    raise PredictError(f"failed to write the report to {output_dir}: {error}") from error
  overview.save_overview(
      square.hu, probs, thresholds, output_dir / OVERVIEW_FILE, title=overview_title(report)
  )
  return report


def config_sha256(workdir: pathlib.Path) -> str | None:
  """Return the SHA-256 of the run's config.json, an id of its config, or None without one."""
  from uem_ich_jax.train import checkpoint

  try:
    return hashlib.sha256((workdir / checkpoint.CONFIG_FILE).read_bytes()).hexdigest()
  except OSError:
    return None


def check_request(output_dir: pathlib.Path, batch_size: int | None) -> None:
  """Raise PredictError for an invalid batch size or an output path that is a file.

  Both entry points (`predict` and `scan_predict.predict_scan`) call this
  before any work is done.
  """
  if batch_size is not None and batch_size < 1:
    raise PredictError(f"batch_size must be a positive number of slices, got {batch_size}")
  if output_dir.exists() and not output_dir.is_dir():
    raise PredictError(f"the output path {output_dir} is a file, not a folder; pass a folder")


def output_files() -> tuple[str, ...]:
  """Return the names of every file that a prediction may write into its output folder."""
  from uem_ich_jax.infer import report_html
  from uem_ich_jax.infer import segmentation_files

  return (
      REPORT_FILE,
      OVERVIEW_FILE,
      segmentation_files.NIFTI_FILE,
      segmentation_files.DICOM_SEG_FILE,
      report_html.HTML_FILE,
  )


def remove_earlier_outputs(output_dir: pathlib.Path) -> list[str]:
  """Delete the prediction files of an earlier run in `output_dir`, and return their names.

  Without this, a classification run predicting into the folder of an earlier
  multitask prediction would leave that run's mask and report.html beside the
  new report.json. Other files in the folder are left alone.
  """
  removed = []
  for name in output_files():
    path = output_dir / name
    if path.is_file() or path.is_symlink():
      try:
        path.unlink()
      except OSError as error:
        raise PredictError(f"failed to remove {path} of an earlier prediction: {error}") from error
      removed.append(name)
  if removed:
    logger.warning("removed %s of an earlier prediction in %s", ", ".join(removed), output_dir)
  return removed


def overview_title(report: dict[str, Any]) -> str:
  """Return the overview's title line: the series, the `any` verdict and its top slice."""
  name = report["series_description"] or pathlib.Path(report["input"]).name
  verdict = "positive" if report["scan"]["any"]["positive"] else "negative"
  top = report["top_slice"]
  return (
      f"{name}: any {verdict} (max {report['scan']['any']['max_probability']:.2f} at slice"
      f" {top['index']}, threshold {report['scan']['any']['threshold']:.2f})"
  )
