"""`uem-ich export`: a multitask run (and an aggregator run) as `jax.export` programs for serving.

The run is restored as `uem-ich predict` restores it (`scan_predict`), and
the same forward functions are exported. The slice model is that of
`scan_predict.run_slice_model`: sigmoid probabilities, the mask, the decoded
boxes with the detection head, and the aggregator tokens when the aggregator
reuses the multitask encoder. The aggregator program is the aggregator's head
on those tokens, or the whole scan model when the two encoders differ. `uem_ich_jax.infer.serve` loads the folder with jax and
numpy alone.

The parameters are closed over, so they are inside each program as constants.
One file per program then serves on its own, and a serving process cannot
pair a program with the wrong parameters. The cost is size: 4 bytes per
float32 parameter, about 15 MB for the atto smoke model (3.8M parameters).
NOTE: a serialized program is a flatbuffer, and the flatbuffers Builder
(Python package 25.12) stops at 2 GiB (`Builder.MAX_BUFFER_SIZE`). A model of
more than about 500M parameters would need its parameters passed as an
argument and saved beside the program instead.

The slice model's batch dimension is symbolic, so the program takes any
number of slices. The aggregator programs take one fixed number of slices,
the aggregator's `max_slices`, with a slice mask, as in training, and a
symbolic number of scans.

manifest.json, schema 1.0:

  schema_version     "1.0"
  format             how the programs were written (jax.export, serialized)
  jax_version        the jax that exported them (an older jax may not read them)
  uem_ich_jax_version
  platforms          platforms the programs were lowered for
  batch_size         slices per slice-model call that `serve` uses by default
  input              {name, shape, dtype, range, windows, rule}: the slice
                     model's input, shape [null, H, W, 3] (null: any batch size)
  image_size         H = W of the model input, pixels
  field_of_view_mm   side of the square field of view that H pixels cover
  windows            [{name, center, width}] in HU, the input channels in order
  labels             the slice labels, in the column order of `probabilities`
  mask_classes       segmentation class id -> name
  box_classes        detection class id -> name, or null without detection
  outputs            per output of the slice model: {shape, dtype}, null = batch
  thresholds         {slice: label -> threshold, slice_from, score_threshold,
                     max_detections, box_format}
  slice_model        {file, calling_convention_version}
  source             the multitask run: {workdir, step, stage, name, variant, ...}
  aggregator         null, or {file, input ("tokens" or "images"), workdir,
                     step, label_set, labels, max_slices, token_features,
                     encoder_reused, encoder_note, thresholds, thresholds_from,
                     slice_subsampling, calling_convention_version}
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.infer import predict
from uem_ich_jax.infer import scan_predict
from uem_ich_jax.infer import serve
from uem_ich_jax.infer.predict import PredictError
from uem_ich_jax.models import layers

logger = logging.getLogger(__name__)

# Platform names of `jax.export.export(platforms=...)`.
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
EXPORTED_FILES = (
    serve.MANIFEST_FILE, serve.SLICE_MODEL_FILE, serve.SCAN_HEAD_FILE, serve.SCAN_MODEL_FILE
)


class ExportError(PredictError):
  """A run or an output folder that `export` cannot use. The message names it."""


def parse_platforms(platforms: str | Sequence[str]) -> tuple[str, ...]:
  """Return the platforms of "cpu,cuda" or a sequence of names, checked against `KNOWN_PLATFORMS`."""
  if isinstance(platforms, str):
    platforms = platforms.split(",")
  names = tuple(name.strip().lower() for name in platforms if name.strip())
  unknown = [name for name in names if name not in KNOWN_PLATFORMS]
  if unknown or not names:
    raise ExportError(
        f"platforms {list(platforms)!r} are invalid (unknown: {unknown}); give one or more of"
        f" {list(KNOWN_PLATFORMS)}, for example cpu,cuda"
    )
  return tuple(dict.fromkeys(names))


# --------------------------------------------------------------- Programs ---


def _export(
    function: Callable[..., Any], specs: Sequence[jax.ShapeDtypeStruct], platforms: tuple[str, ...]
) -> jax.export.Exported:
  # The C++ CPU kernels are custom calls that jax.export cannot serialise. The
  # wrapper is a new function object, so that no trace from jit's cache is reused.
  def program(*args):
    return function(*args)

  with layers.portable_kernels():
    return jax.export.export(jax.jit(program), platforms=platforms)(*specs)


def _export_slice_model(
    model: nnx.Module,
    settings: scan_predict.SliceModelSettings,
    image_size: int,
    platforms: tuple[str, ...],
) -> jax.export.Exported:
  """Export `scan_predict._slice_forward` with the parameters as constants and any batch size."""
  graphdef, state = nnx.split(model)

  def slice_model(images: jax.Array) -> dict[str, jax.Array]:
    return scan_predict._slice_forward(graphdef, settings, state, images)

  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), np.float32)
  return _export(slice_model, [spec], platforms)


def _export_scan_program(
    model: nnx.Module,
    item_shape: tuple[int, ...],
    tokens: bool,
    platforms: tuple[str, ...],
) -> jax.export.Exported:
  """Export the aggregator on (scans, max_slices, *item_shape) inputs and a slice mask.

  With `tokens`, the input is the slice model's tokens and only
  `ScanModel.head` runs. Otherwise the input is images and the whole
  `ScanModel` runs.
  NOTE: tests/test_export.py covers the tokens input only.
  """
  graphdef, state = nnx.split(model)
  forward = scan_predict._scan_head_forward if tokens else scan_predict._scan_model_forward

  def scan_program(inputs: jax.Array, slice_mask: jax.Array) -> jax.Array:
    return forward(graphdef, state, inputs, slice_mask)

  (scans,) = jax.export.symbolic_shape("scans")
  slices = model.max_slices
  specs = [
      jax.ShapeDtypeStruct((scans, slices, *item_shape), np.float32),
      jax.ShapeDtypeStruct((scans, slices), np.bool_),
  ]
  return _export(scan_program, specs, platforms)


def _dimension(size: Any) -> int | None:
  return None if jax.export.is_symbolic_dim(size) else int(size)


def output_specs(exported: jax.export.Exported) -> dict[str, dict[str, Any]]:
  """Return {name: {shape, dtype}} of a program's dict of outputs, with None for a symbolic size."""
  avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  return {
      name: {"shape": [_dimension(size) for size in aval.shape], "dtype": str(aval.dtype)}
      for name, aval in avals.items()
  }


# --------------------------------------------------------------- Manifest ---


def _slice_section(
    runs: scan_predict._Runs,
    checkpoint_dir: pathlib.Path,
    geometry: predict.InputGeometry,
    settings: scan_predict.SliceModelSettings,
    exported: jax.export.Exported,
) -> dict[str, Any]:
  """Return the manifest fields that describe the multitask run and its slice model."""
  source = scan_predict._model_info(
      checkpoint_dir, runs.slice_step, runs.slice_config, scan_predict.DEFAULT_BATCH_SIZE
  )
  source.pop("batch_size")
  thresholds, thresholds_from = predict.validation_thresholds(
      checkpoint_dir, runs.slice_step, runs.slice_config, section="classification"
  )
  windows = [
      {"name": name, "center": center, "width": width}
      for name, (center, width) in ct.WINDOWS.items()
  ]
  box_classes = None
  if settings.detection:
    box_classes = {str(uem_ich_jax.MASK_CLASS_IDS[name]): name for name in uem_ich_jax.SUBTYPES}
  return {
      "batch_size": scan_predict.DEFAULT_BATCH_SIZE,
      "input": {
          "name": "images",
          "shape": [None, geometry.image_size, geometry.image_size, 3],
          "dtype": "float32",
          "range": [-1.0, 1.0],
          "windows": [window["name"] for window in windows],
          "rule": (
              "each slice centre-cropped or air-padded to the square field of view, resized to"
              " image_size with linear interpolation, windowed to uint8 levels and scaled to"
              " [-1, 1] (uem_ich_jax.infer.predict.model_input)"
          ),
      },
      "image_size": geometry.image_size,
      "field_of_view_mm": geometry.field_of_view_mm,
      "windows": windows,
      "labels": list(predict.LABELS),
      "mask_classes": scan_predict._mask_classes(source["segmentation_classes"]),
      "box_classes": box_classes,
      "outputs": output_specs(exported),
      "thresholds": {
          "slice": thresholds,
          "slice_from": thresholds_from,
          "score_threshold": settings.score_threshold if settings.detection else None,
          "max_detections": settings.max_detections if settings.detection else None,
          "box_format": scan_predict.BOX_FORMAT if settings.detection else None,
      },
      "slice_model": {
          "file": serve.SLICE_MODEL_FILE,
          "calling_convention_version": exported.calling_convention_version,
      },
      "source": source,
  }


def _aggregator_section(
    runs: scan_predict._Runs, aggregator_dir: pathlib.Path, file: str, exported: jax.export.Exported
) -> dict[str, Any]:
  from uem_ich_jax.train import aggregate

  label_set = aggregate.aggregator_setting(runs.scan_config, "label_set")
  names = aggregate.label_names(label_set)
  thresholds, thresholds_from = predict.validation_thresholds(
      aggregator_dir, runs.scan_step, runs.scan_config, names=names
  )
  reused = runs.reuse_blocker is None
  return {
      "file": file,
      "input": "tokens" if reused else "images",
      "workdir": str(aggregator_dir),
      "step": runs.scan_step,
      "label_set": label_set,
      "labels": list(names),
      "max_slices": runs.scan_model.max_slices,
      "token_features": runs.scan_model.token_features,
      "encoder_reused": reused,
      "encoder_note": (
          "the program takes the slice model's tokens, because both runs hold the same encoder"
          if reused
          else f"the program encodes the slices itself, because {runs.reuse_blocker}"
      ),
      "thresholds": thresholds,
      "thresholds_from": thresholds_from,
      "slice_subsampling": (
          "a scan of S > max_slices slices is cut to the slices int(linspace(0, S - 1,"
          " max_slices)), and a shorter scan is padded to max_slices and masked"
      ),
      "calling_convention_version": exported.calling_convention_version,
  }


# ----------------------------------------------------------------- Export ---


def _write_files(out_dir: pathlib.Path, programs: dict[str, bytes], manifest: dict) -> None:
  """Write the programs, then manifest.json, and delete programs of an earlier export not rewritten."""
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPORTED_FILES:
      if name not in programs and name != serve.MANIFEST_FILE:
        (out_dir / name).unlink(missing_ok=True)
    for name, data in programs.items():
      (out_dir / name).write_bytes(data)
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    (out_dir / serve.MANIFEST_FILE).write_text(text)
  except OSError as error:
    raise ExportError(f"failed to write the export to {out_dir}: {error}") from error


def export_run(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    aggregator_dir: str | os.PathLike | None = None,
    aggregator_step: int | None = None,
    platforms: str | Sequence[str] = ("cpu",),
) -> dict[str, Any]:
  """Export a multitask run, and optionally an aggregator run, to `out_dir` for serving.

  Writes slice_model.stablehlo, scan_head.stablehlo or scan_model.stablehlo
  with an aggregator run, and manifest.json (schema in this module's
  docstring). Returns the manifest.

  Raises:
    ExportError: a run of another stage, an aggregator whose input geometry
      differs from the multitask run's, unknown platforms, or an unwritable
      `out_dir`.
    PredictError: an `aggregator_dir` that is not an aggregator run.
    CheckpointError: a run directory without a config or checkpoints.
  """
  from uem_ich_jax.train import checkpoint

  checkpoint_dir = pathlib.Path(checkpoint_dir)
  out_dir = pathlib.Path(out_dir)
  platforms = parse_platforms(platforms)
  stage = checkpoint.load_config(checkpoint_dir).stage
  if stage != "multitask":
    raise ExportError(
        f"{checkpoint_dir} is a {stage!r} run; export needs a multitask run (with an"
        " aggregator run passed as --aggregator)"
    )
  if aggregator_dir is not None:
    aggregator_dir = pathlib.Path(aggregator_dir)
    scan_predict.check_aggregator_run(aggregator_dir)

  runs = scan_predict._restore(checkpoint_dir, step, aggregator_dir, aggregator_step)
  geometry = predict.input_geometry(runs.slice_config)
  token_features = None
  if runs.scan_model is not None:
    runs.scan_geometry = scan_predict.aggregator_geometry(runs.scan_config)
    if runs.scan_geometry != geometry:
      raise ExportError(
          f"the aggregator run {aggregator_dir} takes {runs.scan_geometry.image_size} px over"
          f" {runs.scan_geometry.field_of_view_mm:g} mm, the multitask run {checkpoint_dir}"
          f" {geometry.image_size} px over {geometry.field_of_view_mm:g} mm. An export serves"
          " one model input, so export the multitask run alone"
      )
    runs.reuse_blocker = scan_predict._reuse_blocker(runs, geometry)
    if runs.reuse_blocker is None:
      token_features = runs.scan_model.token_features
  settings = scan_predict.slice_settings(runs.slice_config, token_features)

  slice_program = _export_slice_model(runs.slice_model, settings, geometry.image_size, platforms)
  programs = {serve.SLICE_MODEL_FILE: slice_program.serialize()}
  manifest: dict[str, Any] = {
      "schema_version": serve.SCHEMA_VERSION,
      "format": "jax.export.Exported.serialize (StableHLO, parameters as constants)",
      "jax_version": jax.__version__,
      "uem_ich_jax_version": uem_ich_jax.__version__,
      "platforms": list(platforms),
  }
  manifest.update(_slice_section(runs, checkpoint_dir, geometry, settings, slice_program))

  manifest["aggregator"] = None
  if runs.scan_model is not None:
    if token_features is not None:
      file = serve.SCAN_HEAD_FILE
      item_shape = tuple(manifest["outputs"]["tokens"]["shape"][1:])
    else:
      file = serve.SCAN_MODEL_FILE
      item_shape = (geometry.image_size, geometry.image_size, 3)
    scan_program = _export_scan_program(
        runs.scan_model, item_shape, token_features is not None, platforms
    )
    programs[file] = scan_program.serialize()
    manifest["aggregator"] = _aggregator_section(runs, aggregator_dir, file, scan_program)

  _write_files(out_dir, programs, manifest)
  logger.info(
      "exported %s step %d for %s to %s (%s)",
      checkpoint_dir, runs.slice_step, ",".join(platforms), out_dir,
      ", ".join(f"{name} {len(data) / 1e6:.1f} MB" for name, data in programs.items()),
  )
  return manifest
