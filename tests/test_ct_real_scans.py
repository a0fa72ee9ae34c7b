"""The DICOM reader on the real GE and Philips head CT series, checked against dcm2niix."""

import json
import pathlib
import random
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

import dicom_factory
from uem_ich_jax import cli
from uem_ich_jax.ct import AIR_HU
from uem_ich_jax.ct.dicom import read_dicom_series

GE = "ge_head_tilt_variable_spacing"
PHILIPS = "philips_head_phantom_tilt"
GE_PADDING_HU = -1500.0  # PixelPaddingValue of the GE series, with intercept 0.
DCM2NIIX = pathlib.Path(__file__).resolve().parents[1] / ".venv" / "bin" / "dcm2niix"


@pytest.fixture(scope="module")
def volumes(real_ct_dir):
  return {name: read_dicom_series(real_ct_dir / name) for name in (GE, PHILIPS)}


@pytest.fixture(scope="module")
def dcm2niix_output(real_ct_dir, tmp_path_factory):
  """Run dcm2niix on each series; return its stdout and the untilted, unresampled image."""
  binary = shutil.which("dcm2niix") or (str(DCM2NIIX) if DCM2NIIX.exists() else None)
  if binary is None:
    pytest.skip("dcm2niix binary not found (pip install dcm2niix)")
  outputs = {}
  for name in (GE, PHILIPS):
    out = tmp_path_factory.mktemp(name)
    result = subprocess.run(
        [binary, "-z", "n", "-f", "%s_%d", "-o", str(out), str(real_ct_dir / name)],
        capture_output=True, text=True, check=True,
    )
    # Besides the plain image, dcm2niix writes tilt-corrected ("_Tilt_") and
    # equalised ("_Eq_") copies; only the plain one keeps the DICOM voxels.
    plain = [path for path in out.glob("*.nii") if "_Tilt" not in path.name and "_Eq" not in path.name]
    assert len(plain) == 1, sorted(path.name for path in out.iterdir())
    outputs[name] = (result.stdout, nib.load(plain[0]))
  return outputs


@pytest.mark.parametrize("name", [GE, PHILIPS])
def test_hu_matches_dcm2niix(volumes, dcm2niix_output, name):
  volume = volumes[name]
  _, image = dcm2niix_output[name]
  theirs = dicom_factory.nifti_in_volume_order(image, volume)
  assert theirs.shape == volume.shape
  not_padding = theirs != GE_PADDING_HU if name == GE else np.ones(theirs.shape, dtype=bool)
  assert not_padding.mean() > 0.2
  np.testing.assert_array_equal(volume.hu[not_padding], theirs[not_padding])
  assert np.all(volume.hu[~not_padding] == AIR_HU)


@pytest.mark.parametrize("name, tilt", [(GE, 18.5), (PHILIPS, -16.5)])
def test_tilt_matches_dcm2niix(volumes, dcm2niix_output, name, tilt):
  stdout, _ = dcm2niix_output[name]
  assert f"estimated from slice vector {tilt}" in stdout
  assert volumes[name].provenance.gantry_tilt_deg == pytest.approx(tilt, abs=0.01)
  assert any("gantry tilt" in warning for warning in volumes[name].provenance.warnings)


def test_ge_variable_spacing(volumes):
  volume = volumes[GE]
  distances = np.diff(volume.slice_positions_mm)
  np.testing.assert_allclose(distances[:13], 4.0, atol=0.01)
  assert distances[13] == pytest.approx(1.08, abs=0.01)
  np.testing.assert_allclose(distances[14:], 7.0, atol=0.01)
  assert volume.provenance.spacing_varies
  assert volume.affine_is_approximate
  assert volume.spacing[0] == pytest.approx(np.median(distances))
  assert volume.spacing[1:] == pytest.approx((0.4882812, 0.4882812))


def test_philips_uniform_spacing(volumes):
  volume = volumes[PHILIPS]
  assert not volume.provenance.spacing_varies
  assert not volume.affine_is_approximate
  # 2.5 mm table steps through a 16.5 degree tilt: 2.5 * cos(16.5 deg) between planes.
  assert volume.spacing[0] == pytest.approx(2.5 * np.cos(np.radians(16.5)), abs=1e-3)
  slice_indices = np.c_[np.arange(volume.num_slices), np.zeros((volume.num_slices, 2))]
  np.testing.assert_allclose(
      slice_indices @ volume.affine[:3, :3].T + volume.affine[:3, 3], volume.positions, atol=1e-3
  )


def test_philips_order_not_by_file_name(volumes):
  names = [pathlib.Path(path).name for path in volumes[PHILIPS].provenance.source_files]
  assert names[:3] == ["I10", "I20", "I30"]
  assert sorted(names) != names  # "I100" sorts before "I20".


def test_order_despite_reversed_instance_numbers(volumes, real_ct_dir, tmp_path):
  reference = volumes[PHILIPS]
  shuffled = list(reference.provenance.source_files)
  random.Random(3).shuffle(shuffled)
  for index, source in enumerate(shuffled):
    dataset = pydicom.dcmread(source)
    dataset.InstanceNumber = 1000 - int(dataset.InstanceNumber)
    dataset.save_as(tmp_path / f"ID_{index:03d}.dcm")
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, reference.hu)
  np.testing.assert_array_equal(read.positions, reference.positions)


@pytest.mark.parametrize("name", [GE, PHILIPS])
def test_positions_ascend(volumes, name):
  assert np.all(np.diff(volumes[name].slice_positions_mm) > 0)


def test_provenance(volumes):
  volume = volumes[PHILIPS]
  first = pydicom.dcmread(volume.provenance.source_files[0], stop_before_pixels=True)
  assert volume.provenance.series_uid == first.SeriesInstanceUID
  assert volume.provenance.study_uid == first.StudyInstanceUID
  assert volume.provenance.series_description == "STEREOTAXIS"
  assert volume.provenance.kernel == "UB"
  assert volume.provenance.modality == "CT"
  assert volume.provenance.window_center == 40.0
  assert volume.provenance.window_width == 80.0
  assert volume.provenance.sop_instance_uids[0] == first.SOPInstanceUID
  assert len(volume.provenance.sop_instance_uids) == volume.num_slices
  assert volumes[GE].provenance.kernel == "STD+"


def test_inspect_command_ge(real_ct_dir, dcm2niix_output, capsys):
  assert cli.main(["inspect", str(real_ct_dir / GE)]) == 0
  report = json.loads(capsys.readouterr().out)
  assert set(report) == {
      "series_uid", "series_description", "num_slices", "shape", "spacing_mm",
      "spacing_varies", "gantry_tilt_deg", "slice_positions_mm", "hu_percentiles", "warnings",
  }
  assert report["num_slices"] == 28
  assert report["shape"] == [28, 512, 512]
  assert report["spacing_mm"][0] == pytest.approx(4.0, abs=0.01)
  assert report["spacing_mm"][1:] == pytest.approx([0.4882812, 0.4882812])
  assert report["spacing_varies"] is True
  assert report["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.01)
  assert len(report["slice_positions_mm"]) == 28
  assert np.all(np.diff(report["slice_positions_mm"]) > 0)
  assert len(report["warnings"]) == 2

  # Percentiles from dcm2niix's voxels with the padding made air, computed independently.
  _, image = dcm2niix_output[GE]
  theirs = image.get_fdata()
  theirs[theirs == GE_PADDING_HU] = AIR_HU
  expected = np.percentile(theirs, [1, 50, 99])
  percentiles = report["hu_percentiles"]
  assert [percentiles["p1"], percentiles["p50"], percentiles["p99"]] == pytest.approx(expected)
  assert percentiles["p1"] == AIR_HU  # Not the -1500 HU padding.


def test_inspect_command_two_series_error(real_ct_dir, capsys):
  assert cli.main(["inspect", str(real_ct_dir)]) == 2
  message = capsys.readouterr().err
  assert "2 series found" in message
  assert "'STEREOTAXIS', 58 files" in message


def test_inspect_command_chooses_series(real_ct_dir, volumes, capsys):
  uid = volumes[PHILIPS].provenance.series_uid
  assert cli.main(["inspect", str(real_ct_dir), "--series", uid]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["series_uid"] == uid
  assert report["num_slices"] == 58
  assert report["gantry_tilt_deg"] == pytest.approx(-16.5, abs=0.01)
  assert report["spacing_varies"] is False
