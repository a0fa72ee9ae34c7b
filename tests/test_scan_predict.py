"""`uem-ich predict` with a multitask run and an aggregator run: mapping, report, files, errors."""

import dataclasses
import json
import pathlib
import re
import types

import ml_collections
import nibabel
import numpy as np
import pytest
from PIL import Image

import dicom_factory
import uem_ich_jax
from uem_ich_jax import cli, clinical, ct, phantom
from uem_ich_jax.ct import CTVolume
from uem_ich_jax.infer import predict, scan_predict, segmentation_files
from uem_ich_jax.train import aggregate, checkpoint, config_file, stages



def _volume(shape, spacing):
  """A volume with slices along z, rows along y and columns along x (LPS)."""
  affine = np.array(
      [[0, 0, spacing[2], 0], [0, spacing[1], 0, 0], [spacing[0], 0, 0, 0], [0, 0, 0, 1]],
      dtype=np.float64,
  )
  positions = np.array([[0.0, 0.0, spacing[0] * k] for k in range(shape[0])])
  return CTVolume(
      hu=np.zeros(shape, np.float32), positions=positions, affine=affine, spacing=spacing
  )


# ------------------------------------------------------------ Mapping back ---


def test_mask_to_source_inverts_cropped_input():
  # 100 x 80 pixels of 1 mm, field of view 64 mm: the square starts at (18, 8)
  # and each model pixel of a 32-pixel input covers 2 x 2 source pixels.
  volume = _volume((2, 100, 80), (5.0, 1.0, 1.0))
  grid = scan_predict.model_grid(volume, predict.InputGeometry(32, 64.0))
  assert grid.starts == (18, 8)
  assert grid.pixels == (64, 64)
  assert not grid.covers_scan
  source = np.zeros((2, 100, 80), np.uint8)
  source[0, 20:30, 10:14] = 2
  source[1, 40:82, 50:72] = 5
  square = source[:, 18:82, 8:72]
  model_mask = ct.resize_mask_inplane(square, (32, 32))
  back = scan_predict.mask_to_source(model_mask, grid)
  assert back.dtype == np.uint8
  assert back.shape == source.shape
  np.testing.assert_array_equal(back, source)


def test_mask_to_source_drops_padding():
  # 40 x 40 pixels of 2 mm in a 100 mm field of view: 5 air pixels each side.
  volume = _volume((1, 40, 40), (5.0, 2.0, 2.0))
  grid = scan_predict.model_grid(volume, predict.InputGeometry(25, 100.0))
  assert grid.starts == (-5, -5)
  assert grid.covers_scan
  model_mask = np.zeros((1, 25, 25), np.uint8)
  model_mask[0, 0, :] = 1  # Square rows 0-1: air padding only.
  model_mask[0, 3, 4] = 3  # Square rows 6-7, columns 8-9: source 1-2, 3-4.
  back = scan_predict.mask_to_source(model_mask, grid)
  assert back.shape == (1, 40, 40)
  assert np.count_nonzero(back) == 4
  np.testing.assert_array_equal(back[0, 1:3, 3:5], 3)


def test_boxes_to_source_scales_and_clips():
  volume = _volume((1, 100, 80), (5.0, 1.0, 1.0))
  grid = scan_predict.model_grid(volume, predict.InputGeometry(32, 64.0))
  boxes = np.array([[[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 32.0, 32.0]]])
  source = scan_predict.boxes_to_source(boxes, grid)
  np.testing.assert_allclose(source[0, 0], [20.0, 12.0, 28.0, 20.0])
  np.testing.assert_allclose(source[0, 1], [18.0, 8.0, 82.0, 72.0])
  padded = scan_predict.model_grid(_volume((1, 40, 40), (5.0, 2.0, 2.0)), predict.InputGeometry(25, 100.0))
  clipped = scan_predict.boxes_to_source(np.array([0.0, 0.0, 25.0, 25.0]), padded)
  np.testing.assert_allclose(clipped, [0.0, 0.0, 40.0, 40.0])


def test_aggregator_slices_evenly_spaced():
  np.testing.assert_array_equal(scan_predict.aggregator_slices(5, 8), np.arange(5))
  used = scan_predict.aggregator_slices(12, 8)
  assert len(used) == 8
  assert used[0] == 0
  assert used[-1] == 11
  assert np.all(np.diff(used) > 0)


def test_thresholds_read_from_classification_section(tmp_path):
  config = ml_collections.ConfigDict({"data": {"test_fold": 0}})
  classes = {name: {"threshold": 0.1 * (k + 1)} for k, name in enumerate(uem_ich_jax.SLICE_LABELS)}
  path = tmp_path / "eval_step7_fold0.json"
  path.write_text(json.dumps({"classification": {"classes": classes}}))
  thresholds, source = predict.validation_thresholds(
      tmp_path, 7, config, section="classification"
  )
  assert source == str(path)
  assert thresholds["any"] == pytest.approx(0.1)
  assert thresholds["subdural"] == pytest.approx(0.6)
  # Without the section, the nested result is not found and the default applies.
  thresholds, source = predict.validation_thresholds(tmp_path, 7, config)
  assert source.startswith("default 0.5")
  assert set(thresholds.values()) == {0.5}


# ------------------------------------------------------ Segmentation files ---


def _blob_mask(volume, class_id):
  """A mask with a 3 x 4 x 4 voxel block of `class_id` in the middle of `volume`."""
  mask = np.zeros(volume.shape, np.uint8)
  middle = [size // 2 for size in volume.shape]
  mask[middle[0] - 1 : middle[0] + 2, middle[1] - 2 : middle[1] + 2, middle[2] - 2 : middle[2] + 2] = (
      class_id
  )
  return mask


def _centroid_lps(mask, volume):
  """Mean LPS position (mm) of the mask's nonzero voxels, placed by each slice's own position."""
  indices = np.argwhere(mask)
  points = (
      volume.positions[indices[:, 0]]
      + indices[:, 1:2] * volume.affine[:3, 1]
      + indices[:, 2:3] * volume.affine[:3, 2]
  )
  return points.mean(axis=0)


def _with_varying_spacing(volume):
  """Mark a volume with unevenly spaced slices as the DICOM reader does."""
  provenance = dataclasses.replace(volume.provenance, spacing_varies=True)
  return dataclasses.replace(volume, affine_is_approximate=True, provenance=provenance)


def test_equalised_spacing_follows_dcm2niix():
  # The smallest gap, 3 mm, covers the series in ceil((12 - 6 / 2) / 3) = 3 slices.
  assert segmentation_files.equalised_spacing_mm([0.0, 3.0, 6.0, 12.0]) == pytest.approx(3.0)
  # A 0.5 mm gap would take ceil((15.5 - 5 / 2) / 0.5) = 26 slices, more than
  # twice the 4 source slices, so 8 slices span the 15.5 mm.
  spacing = segmentation_files.equalised_spacing_mm([15.5, 0.0, 10.5, 10.0])
  assert spacing == pytest.approx(15.5 / 7)
  with pytest.raises(ValueError, match="at least 2 slices"):
    segmentation_files.equalised_spacing_mm([4.0])


def test_output_grid_as_read_without_tilt():
  volume = dicom_factory.make_volume(num_slices=4, rows=10, columns=9)
  grid = segmentation_files.output_grid(volume)
  assert grid.kind == "as_read"
  assert grid.volume is volume
  section = grid.report()
  assert section["shape"] == [4, 10, 9]
  assert section["spacing_mm"] == pytest.approx([2.5, 0.5, 0.6])
  np.testing.assert_allclose(section["affine_lps"], volume.affine, atol=1e-6)
  assert section["tilt_removed_deg"] == 0.0
  assert section["dcm2niix_output"] == ""
  mask = _blob_mask(volume, 2)
  np.testing.assert_array_equal(segmentation_files.mask_on_grid(mask, volume, grid), mask)


def test_output_grid_removes_tilt():
  volume = dicom_factory.make_volume(
      num_slices=6, rows=12, columns=10, pixel_spacing=(1.0, 1.0), slice_spacing_mm=2.0,
      tilt_deg=15.0,
  )
  grid = segmentation_files.output_grid(volume)
  assert grid.kind == "resample_z"
  assert grid.dcm2niix_output == "_Tilt_1"
  assert grid.tilt_removed_deg == pytest.approx(15.0, abs=0.01)
  assert "gantry tilt of 15.00 degrees" in grid.why
  # The slice planes stay where they were, and rows grow to cover the shear.
  assert grid.volume.num_slices == 6
  assert grid.volume.spacing[0] == pytest.approx(2.0)
  assert grid.volume.shape[1] > volume.shape[1]
  np.testing.assert_allclose(grid.volume.affine, ct.correct_tilt(volume).affine, atol=1e-6)
  assert abs(ct.resample.gantry_tilt_deg(grid.volume.affine)) < 1e-6

  mask = _blob_mask(volume, 3)
  moved = segmentation_files.mask_on_grid(mask, volume, grid)
  assert set(np.unique(moved)) == {0, 3}
  np.testing.assert_allclose(
      _centroid_lps(moved, grid.volume), _centroid_lps(mask, volume), atol=0.6
  )


def test_output_grid_equalises_varying_spacing(tmp_path):
  volume = _with_varying_spacing(
      dicom_factory.make_volume(slice_offsets_mm=[0.0, 2.0, 4.0, 10.0], rows=8, columns=8)
  )
  grid = segmentation_files.output_grid(volume)
  assert grid.kind == "resample_z"
  assert grid.dcm2niix_output == "_Eq_1"
  assert grid.tilt_removed_deg == 0.0
  assert "varies from 2.000 to 6.000 mm" in grid.why
  # dcm2niix's rule gives the smallest gap, 2 mm, from the first to the last slice plane.
  assert grid.volume.shape == (6, 8, 8)
  np.testing.assert_allclose(
      grid.volume.slice_positions_mm - volume.slice_positions_mm[0], np.arange(6) * 2.0, atol=1e-6
  )

  mask = _blob_mask(volume, 1)
  path = tmp_path / "segmentation.nii.gz"
  segmentation_files.write_nifti(path, mask, volume, grid)
  written = ct.read_nifti(path)
  np.testing.assert_allclose(written.affine, grid.volume.affine, atol=1e-4)
  assert not written.affine_is_approximate
  stored = np.asarray(nibabel.load(path).dataobj).transpose(2, 1, 0)
  np.testing.assert_array_equal(stored, segmentation_files.mask_on_grid(mask, volume, grid))
  # Source slices 1-3 (at 2, 4 and 10 mm) contain the block. Nearest
  # neighbour copies it to every grid slice from 2 to 10 mm.
  assert [bool(stored[k].any()) for k in range(6)] == [False, True, True, True, True, True]


@pytest.fixture
def tilted_series(tmp_path):
  """A tilted 4-slice series written as DICOM and read back."""
  volume = dicom_factory.make_volume(num_slices=4, rows=16, columns=12, tilt_deg=12.0, seed=1)
  dicom_factory.write_series(tmp_path / "series", volume)
  return ct.read_dicom_series(tmp_path / "series")


def _read_seg(path, volume):
  import highdicom

  seg = highdicom.seg.segread(path)
  frames = seg.get_pixels_by_source_instance(
      source_sop_instance_uids=list(volume.provenance.sop_instance_uids), combine_segments=True
  )
  return seg, frames


def test_dicom_seg_subtypes_on_source_frames(tilted_series, tmp_path):
  volume = tilted_series
  mask = _blob_mask(volume, 2)
  mask[0, :3, :3] = 5
  section = segmentation_files.write_dicom_seg(tmp_path / "segmentation.dcm", mask, volume, 6, "uem")
  assert section["segments"] == {str(k + 1): name for k, name in enumerate(uem_ich_jax.SUBTYPES)}
  assert section["referenced_series_uid"] == volume.provenance.series_uid

  seg, frames = _read_seg(tmp_path / "segmentation.dcm", volume)
  np.testing.assert_array_equal(frames, mask)
  assert seg.StudyInstanceUID == volume.provenance.study_uid
  assert seg.SeriesInstanceUID == section["series_instance_uid"]
  assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.provenance.series_uid
  referenced = {
      item.ReferencedSOPInstanceUID
      for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
  }
  assert referenced == set(volume.provenance.sop_instance_uids)
  labels = [item.SegmentLabel for item in seg.SegmentSequence]
  assert labels == list(uem_ich_jax.SUBTYPES)


def test_dicom_seg_binary_and_empty(tilted_series, tmp_path):
  volume = tilted_series
  mask = np.zeros(volume.shape, np.uint8)
  section = segmentation_files.write_dicom_seg(tmp_path / "segmentation.dcm", mask, volume, 1, "uem")
  assert section["segments"] == {"1": "blood"}
  # An empty mask keeps every frame, all of them empty.
  assert section["frames"] == volume.num_slices
  seg, frames = _read_seg(tmp_path / "segmentation.dcm", volume)
  assert not frames.any()
  segment = seg.SegmentSequence[0]
  assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "1386000"
  assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"


def test_dicom_seg_failure_becomes_warning(tilted_series, tmp_path):
  volume = tilted_series
  # The series changes after it was read: its first slice gets a new SOP instance UID.
  dicom_factory.edit_file(
      pathlib.Path(volume.provenance.source_files[0]),
      lambda dataset: setattr(dataset, "SOPInstanceUID", "1.2.3.4"),
  )
  report = {
      "warnings": [],
      "model": {"segmentation_classes": 6, "name": "uem"},
      "segmentation": {"dicom_seg": None},
      "outputs": {"dicom_seg": None},
  }
  prediction = types.SimpleNamespace(volume=volume)
  scan_predict._write_dicom_seg(tmp_path, report, prediction, np.zeros(volume.shape, np.uint8))
  assert report["outputs"]["dicom_seg"] is None
  assert len(report["warnings"]) == 1
  assert "segmentation.dcm not written" in report["warnings"][0]
  assert "1.2.3.4" in report["warnings"][0]
  assert not (tmp_path / "segmentation.dcm").exists()


def test_dicom_seg_needs_dicom_source(tmp_path):
  volume = dicom_factory.make_volume()
  assert not segmentation_files.has_dicom_source(volume)
  with pytest.raises(segmentation_files.DicomSegError, match="not a DICOM series"):
    segmentation_files.write_dicom_seg(
        tmp_path / "segmentation.dcm", np.zeros(volume.shape, np.uint8), volume, 1, "uem"
    )


# ----------------------------------------------------------- Bad input ---


def _config_only_run(request, workdir, spec):
  """Write the config of `spec` (a configs/ file and variant) as a run without checkpoints."""
  config = config_file.load(str(request.config.rootpath / "configs" / spec), [])
  checkpoint.save_config(workdir, config)
  return workdir


@pytest.fixture
def config_only_runs(request, tmp_path):
  return {
      "multitask": _config_only_run(request, tmp_path / "mt", "multitask_synthetic.py:smoke"),
      "aggregator": _config_only_run(request, tmp_path / "ag", "aggregator_synthetic.py:smoke"),
      "classification": _config_only_run(
          request, tmp_path / "cls", "classification_synthetic.py:smoke"
      ),
  }


def test_missing_input_names_the_path(config_only_runs, tmp_path):
  missing = tmp_path / "no_scan_here"
  with pytest.raises(predict.PredictError, match="no_scan_here does not exist"):
    predict.predict(config_only_runs["multitask"], missing, tmp_path / "out")


def test_aggregator_flag_rejects_wrong_stages(config_only_runs, tmp_path):
  runs = config_only_runs
  scan = tmp_path / "scan.nii.gz"
  output = tmp_path / "out"
  with pytest.raises(
      predict.PredictError, match=re.escape(f"--aggregator {runs['multitask']} is a 'multitask' run")
  ):
    predict.predict(runs["multitask"], scan, output, aggregator_dir=runs["multitask"])
  with pytest.raises(
      predict.PredictError,
      match=re.escape(f"--aggregator {runs['aggregator']} needs a multitask run as --checkpoint"),
  ):
    predict.predict(runs["classification"], scan, output, aggregator_dir=runs["aggregator"])
  with pytest.raises(
      predict.PredictError, match=re.escape(f"{runs['aggregator']} is an 'aggregator' run")
  ):
    predict.predict(runs["aggregator"], scan, output)
  with pytest.raises(checkpoint.CheckpointError, match="nowhere"):
    predict.predict(runs["multitask"], scan, output, aggregator_dir=tmp_path / "nowhere")
  assert not output.exists()


def test_cli_names_the_bad_aggregator(config_only_runs, tmp_path, capsys):
  runs = config_only_runs
  rc = cli.main([
      "predict",
      f"--checkpoint={runs['classification']}",
      f"--aggregator={runs['aggregator']}",
      f"--output={tmp_path / 'out'}",
      str(tmp_path),
  ])
  assert rc == 2
  error = capsys.readouterr().err
  assert str(runs["aggregator"]) in error
  assert "needs a multitask run" in error


def test_max_voxels_rejects_large_dicom_series(config_only_runs, tmp_path):
  series = tmp_path / "series"
  # 3 slices of 6 x 7 pixels: 126 voxels.
  dicom_factory.write_series(series, dicom_factory.make_volume(num_slices=3, rows=6, columns=7))
  output = tmp_path / "out"
  expected = re.escape(
      f"{series}: the 3 files of the series have 126 voxels in all, more than the 100 accepted"
      " (set by --max-voxels). To predict this scan, pass --max-voxels 126 or more"
  )
  # Both stages read the scan before restoring a checkpoint, and these runs have none.
  for stage in ("multitask", "classification"):
    with pytest.raises(predict.PredictError, match=expected):
      predict.predict(config_only_runs[stage], series, output, max_voxels=100)
  assert not output.exists()


def test_max_voxels_from_run_config(config_only_runs, tmp_path):
  run = config_only_runs["multitask"]
  config = checkpoint.load_config(run)
  assert config.data.max_voxels == ct.volume.MAX_VOXELS
  config.data.max_voxels = 100
  checkpoint.save_config(run, config)
  series = tmp_path / "series"
  dicom_factory.write_series(series, dicom_factory.make_volume(num_slices=3, rows=6, columns=7))
  with pytest.raises(
      predict.PredictError,
      match=re.escape(f"more than the 100 accepted (set by config.data.max_voxels of {run})"),
  ):
    predict.predict(run, series, tmp_path / "out")
  # --max-voxels overrides the run's config.
  limit = predict.voxel_limit(config, run, 126)
  assert limit.max_voxels == 126
  assert limit.source == "set by --max-voxels"


def test_max_voxels_default_for_older_runs(config_only_runs):
  run = config_only_runs["multitask"]
  # A run saved before config.data.max_voxels existed.
  saved = json.loads((run / checkpoint.CONFIG_FILE).read_text())
  del saved["data"]["max_voxels"]
  (run / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  limit = predict.voxel_limit(checkpoint.load_config(run), run)
  assert limit.max_voxels == ct.volume.MAX_VOXELS
  assert "has no data.max_voxels" in limit.source


def test_max_voxels_invalid_config_value(config_only_runs):
  run = config_only_runs["multitask"]
  config = checkpoint.load_config(run)
  config.data.max_voxels = 0
  with pytest.raises(predict.PredictError, match=re.escape("config.data.max_voxels is 0")):
    predict.voxel_limit(config, run)


def test_cli_max_voxels_rejects_large_nifti(config_only_runs, tmp_path, capsys):
  image = tmp_path / "scan.nii.gz"
  data = np.zeros((4, 5, 3), np.int16)
  nibabel.Nifti1Image(data, np.diag([0.5, 0.5, 5.0, 1.0])).to_filename(image)
  rc = cli.main([
      "predict",
      f"--checkpoint={config_only_runs['multitask']}",
      f"--output={tmp_path / 'out'}",
      "--max-voxels=59",
      str(image),
  ])
  assert rc == 2
  error = capsys.readouterr().err
  assert f"{image}: header shape (4, 5, 3) has 60 voxels, more than the 59 accepted" in error
  assert "pass --max-voxels 60 or more" in error


def test_cli_max_voxels_must_be_positive(config_only_runs, tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main([
        "predict", f"--checkpoint={config_only_runs['multitask']}",
        f"--output={tmp_path / 'out'}", "--max-voxels=0", str(tmp_path),
    ])
  assert "--max-voxels: 0 is invalid; expected a whole number >= 1" in capsys.readouterr().err


# ------------------------------------------------------------ Trained runs ---


# `data_dir` and `runs` (the trained smoke runs) are session fixtures in conftest.py.


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
  folder = tmp_path_factory.mktemp("phantom") / "dicom"
  scan = phantom.generate_scan(
      77, (6, 48, 48), spacing_mm=(8.0, 230 / 48, 230 / 48), subtypes=("intraparenchymal",)
  )
  phantom.write_dicom(scan, folder)
  return folder


def _strict_json(path):
  return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


def _check_outputs(report, output, volume):
  """Check the report's keys, the files, and the volumes against the written mask."""
  assert report["schema_version"] == "2.1"
  assert set(report) >= {
      "input", "shape", "spacing_mm", "model", "labels", "scan", "top_slice", "slices",
      "segmentation", "detection", "aggregator", "warnings", "timings_s", "outputs",
  }
  assert set(report["timings_s"]) == set(scan_predict.STAGES) | {"total"}
  for name, seconds in report["timings_s"].items():
    assert seconds >= 0.0, name
  assert report["timings_s"]["total"] >= sum(
      report["timings_s"][name] for name in scan_predict.STAGES
  ) - 1e-6
  assert _strict_json(output / "report.json") == report
  expected_files = ["overview.png", "report.html", "report.json", "segmentation.nii.gz"]
  if report["outputs"]["dicom_seg"] is not None:
    expected_files.append("segmentation.dcm")
  assert sorted(path.name for path in output.iterdir()) == sorted(expected_files)
  # The test scans have uniform spacing and no tilt.
  assert report["segmentation"]["grid"]["kind"] == "as_read"
  assert report["segmentation"]["grid"]["shape"] == list(volume.shape)
  with Image.open(output / "overview.png") as image:
    assert image.format == "PNG"

  written = nibabel.load(output / "segmentation.nii.gz")
  assert written.get_data_dtype() == np.uint8
  mask = np.asarray(written.dataobj).transpose(2, 1, 0)
  assert mask.shape == volume.shape
  reference = ct.write_nifti(volume, output.parent / f"{output.name}_scan.nii.gz")
  np.testing.assert_allclose(written.affine, nibabel.load(reference).affine, atol=1e-4)
  np.testing.assert_allclose(ct.read_nifti(output / "segmentation.nii.gz").affine, volume.affine, atol=1e-3)

  segmentation = report["segmentation"]
  assert segmentation["voxels"] == int(np.count_nonzero(mask))
  assert sum(entry["blood_voxels"] for entry in report["slices"]) == segmentation["voxels"]
  expected = clinical.hematoma_ml(mask, volume)
  assert segmentation["volume_ml"]["any"] == pytest.approx(sum(expected.values()))
  for name in uem_ich_jax.SUBTYPES:
    assert segmentation["volume_ml"][name] == pytest.approx(expected[name])
  if segmentation["bleed_side"] is not None:
    side = segmentation["bleed_side"]
    assert side["left_ml"] + side["right_ml"] == pytest.approx(sum(expected.values()))

  assert report["detection"]["count"] == sum(len(entry["boxes"]) for entry in report["slices"])
  for entry in report["slices"]:
    for box in entry["boxes"]:
      assert box["class"] == uem_ich_jax.SUBTYPES[box["class_id"] - 1]
      assert len(box["box_model_px"]) == len(box["box_source_px"]) == 4
      assert 0.0 <= box["box_source_px"][2] <= volume.shape[1]
      assert 0.0 <= box["box_source_px"][3] <= volume.shape[2]


# The `runs` fixture trains two 2-step smoke runs. With a warm JAX cache the whole
# file took 66 s on 2 idle CPU cores, with a cold one 326 s on 2 busy cores.
@pytest.mark.slow
def test_predict_dicom_series_with_aggregator(runs, phantom_series, tmp_path):
  multitask_dir, aggregator_dir = runs
  output = tmp_path / "out"
  report = predict.predict(multitask_dir, phantom_series, output, aggregator_dir=aggregator_dir)
  _check_outputs(report, output, predict.read_scan(phantom_series))
  assert report["outputs"]["html"] == "report.html"
  assert (output / "report.html").read_text().startswith("<!DOCTYPE html>")
  assert report["model"]["stage"] == "multitask"
  assert report["model"]["detection"] is True
  assert report["warnings"] == []
  assert report["outputs"]["dicom_seg"] == "segmentation.dcm"
  assert report["segmentation"]["dicom_seg"]["referenced_series_uid"] == report["series_uid"]
  aggregator = report["aggregator"]
  assert aggregator["encoder_reused"] is True
  assert aggregator["slices_used"] == list(range(6))
  assert aggregator["labels"] == list(uem_ich_jax.SLICE_LABELS)
  for entry in aggregator["scan"].values():
    assert 0.0 <= entry["probability"] <= 1.0
  # Training alone saves no evaluation, so the thresholds are the default.
  assert report["thresholds_from"].startswith("default 0.5")


def _assert_reuse_matches_direct(slice_model, slice_config, scan_model, images):
  settings = dataclasses.replace(
      scan_predict.slice_settings(slice_config), token_features=scan_model.token_features
  )
  tokens = scan_predict.run_slice_model(slice_model, images, settings)["tokens"]
  reused = scan_predict.scan_probabilities_from_tokens(scan_model, tokens)
  direct = scan_predict.scan_probabilities_from_images(scan_model, images)
  assert reused.shape == (6,)
  np.testing.assert_allclose(reused, direct, atol=1e-5)


@pytest.mark.slow
def test_reused_tokens_match_scan_model(runs, phantom_series):
  multitask_dir, aggregator_dir = runs
  slice_model, slice_config = checkpoint.restore_model(multitask_dir)
  scan_model, scan_config = checkpoint.restore_model(aggregator_dir)
  assert scan_model.token_features == "last"
  assert scan_predict.encoder_difference(slice_model, slice_config, scan_model, scan_config) is None
  images, _ = predict.model_input(
      predict.read_scan(phantom_series), predict.input_geometry(slice_config)
  )
  _assert_reuse_matches_direct(slice_model, slice_config, scan_model, images)


@pytest.mark.slow  # three more compiles: about 60 s with a cold JAX cache on 2 busy CPU cores
def test_reused_pyramid_tokens_match_scan_model(runs, phantom_series):
  multitask_dir, aggregator_dir = runs
  slice_model, slice_config = checkpoint.restore_model(multitask_dir)
  _, scan_config = checkpoint.restore_model(aggregator_dir)
  # A "pyramid" scan model with a fresh head around the multitask encoder.
  model_config = ml_collections.ConfigDict(scan_config.model.to_dict())
  model_config.token_features = "pyramid"
  _, params, _, extra = stages.split_model(aggregate.build_model(model_config, seed=3))
  _, encoder_params, _, encoder_extra = stages.split_model(slice_model)
  params, _ = stages.copy_encoder(
      params, stages.root_encoder_arrays(encoder_params, head_prefix="head"),
      head_prefix="head", source_name="multitask encoder",
  )
  extra, _ = stages.copy_encoder(
      extra, stages.root_encoder_arrays(encoder_extra, head_prefix="head"),
      head_prefix="head", source_name="multitask encoder",
  )
  scan_model = stages.model_from_arrays(
      lambda: aggregate.build_model(model_config, seed=3), params, extra, seed=3,
      source="pyramid test model",
  )
  images, _ = predict.model_input(
      predict.read_scan(phantom_series), predict.input_geometry(slice_config)
  )
  _assert_reuse_matches_direct(slice_model, slice_config, scan_model, images)


@pytest.mark.slow
def test_changed_encoder_encodes_slices_again(runs, phantom_series, tmp_path):
  multitask_dir, aggregator_dir = runs
  # A copy of the aggregator run whose stem convolution differs from the multitask run's.
  manager = checkpoint.CheckpointManager(aggregator_dir, read_only=True)
  step = manager.latest_step()
  arrays = manager.restore_arrays(step)
  manager.close()
  arrays["params"]["stem_conv"]["kernel"] = arrays["params"]["stem_conv"]["kernel"] * 1.01
  changed = tmp_path / "changed"
  checkpoint.save_config(changed, checkpoint.load_config(aggregator_dir))
  manager = checkpoint.CheckpointManager(changed)
  manager.save(step, {"params": arrays["params"], "extra": arrays["extra"]})
  manager.close()

  report = predict.predict(multitask_dir, phantom_series, tmp_path / "out", aggregator_dir=changed)
  aggregator = report["aggregator"]
  assert aggregator["encoder_reused"] is False
  assert "params/stem_conv/kernel differs" in aggregator["encoder_note"]
  scan_model, _ = checkpoint.restore_model(changed)
  images, _ = predict.model_input(
      predict.read_scan(phantom_series), predict.input_geometry(checkpoint.load_config(multitask_dir))
  )
  expected = scan_predict.scan_probabilities_from_images(scan_model, images)
  for name, probability in zip(aggregator["labels"], expected):
    assert aggregator["scan"][name]["probability"] == pytest.approx(float(probability), abs=1e-6)


@pytest.mark.slow
def test_predict_nifti_subsamples_for_aggregator(runs, tmp_path):
  multitask_dir, aggregator_dir = runs
  # 11 slices: more than the aggregator's max_slices (8), and two batches of 8,
  # the second padded.
  scan = phantom.generate_scan(78, (11, 40, 40), spacing_mm=(9.0, 6.0, 6.0))
  image, _ = phantom.write_nifti(scan, tmp_path / "scan.nii.gz", tmp_path / "truth.nii.gz")
  output = tmp_path / "out"
  report = predict.predict(multitask_dir, image, output, aggregator_dir=aggregator_dir)
  volume = predict.read_scan(image)
  _check_outputs(report, output, volume)
  np.testing.assert_allclose(
      nibabel.load(output / "segmentation.nii.gz").affine, nibabel.load(image).affine, atol=1e-4
  )
  assert report["model"]["batch_size"] == scan_predict.DEFAULT_BATCH_SIZE
  assert len(report["aggregator"]["slices_used"]) == 8
  assert report["aggregator"]["slices_used"] == scan_predict.aggregator_slices(11, 8).tolist()
  assert any("max_slices 8" in warning for warning in report["warnings"])
  assert all(entry["sop_instance_uid"] is None for entry in report["slices"])
  assert report["outputs"]["dicom_seg"] is None
  assert report["segmentation"]["dicom_seg"] is None


@pytest.mark.slow
def test_cli_predict_multitask(runs, phantom_series, tmp_path, capsys):
  multitask_dir, _ = runs
  output = tmp_path / "out"
  rc = cli.main(["predict", f"--checkpoint={multitask_dir}", f"--output={output}", str(phantom_series)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "any:" in printed
  assert "blood:" in printed
  report = _strict_json(output / "report.json")
  assert report["aggregator"] is None
  assert report["timings_s"]["aggregator"] == 0.0


@pytest.mark.slow
def test_predict_unwraps_12bit_series(runs, tmp_path):
  multitask_dir, _ = runs
  volume = dicom_factory.make_volume(
      num_slices=3, rows=48, columns=48, pixel_spacing=(230 / 48, 230 / 48), seed=5
  )
  assert volume.hu.min() < 0
  dicom_factory.write_series(tmp_path / "plain", volume)
  dicom_factory.write_hu_modulo_4096(volume, tmp_path / "wrapped")
  plain = predict.predict(multitask_dir, tmp_path / "plain", tmp_path / "plain_out")
  wrapped = predict.predict(multitask_dir, tmp_path / "wrapped", tmp_path / "wrapped_out")
  (warning,) = [text for text in wrapped["reader_warnings"] if "modulo 4096" in text]
  assert "The wrap was undone" in warning
  assert plain["reader_warnings"] == []
  # The unwrapped series reaches the model exactly as the plain one does.
  for plain_slice, wrapped_slice in zip(plain["slices"], wrapped["slices"]):
    assert wrapped_slice["probabilities"] == plain_slice["probabilities"]
  assert wrapped["segmentation"]["voxels"] == plain["segmentation"]["voxels"]
