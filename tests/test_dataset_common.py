"""Tests of the parts the dataset builders share: folds, the bad-file report, square slices."""

import numpy as np
import pytest

from uem_ich_jax import ct
from uem_ich_jax.datasets import common
from uem_ich_jax.errors import InputError


def test_patient_folds_are_balanced_and_ignore_input_order():
  patients = [f"patient-{index:03d}" for index in range(23)]
  folds = common.patient_folds(patients, num_folds=5, seed=3)
  assert set(folds) == set(patients)
  sizes = np.bincount(list(folds.values()), minlength=5)
  assert sizes.max() - sizes.min() <= 1
  # Repeated ids (several scans of a patient) and another order change nothing.
  shuffled = list(reversed(patients)) + patients[:4]
  assert common.patient_folds(shuffled, num_folds=5, seed=3) == folds
  assert common.patient_folds(patients, num_folds=5, seed=4) != folds


def test_patient_folds_reject_zero_folds():
  with pytest.raises(ValueError, match="num_folds"):
    common.patient_folds(["a"], num_folds=0)


def test_fold_ranges_run_length():
  assert common.fold_ranges([1, 1, 0, 0, 0, 1]) == [[0, 2, 1], [2, 5, 0], [5, 6, 1]]
  assert common.fold_ranges([]) == []


def test_build_report_counts_reasons_and_lists_files():
  report = common.BuildReport("demo")
  assert report.summary() == "demo: no bad or odd files"
  report.skip("a.dcm", "unreadable DICOM: truncated PixelData")
  report.skip("b.dcm", "unreadable DICOM: no pixel data")
  report.note("c.nii", "all-zero mask of a positive case")
  assert report.counts() == {"unreadable DICOM": 2, "all-zero mask of a positive case": 1}
  metadata = report.to_metadata()
  assert metadata["skipped"] == 2
  assert metadata["kept"] == 1
  assert metadata["files"][0] == {
      "path": "a.dcm", "reason": "unreadable DICOM: truncated PixelData", "kept": False
  }
  assert metadata["listed_all"]
  assert "2 files left out, 1 odd files kept" in report.summary()


def test_build_report_caps_the_listed_files(monkeypatch):
  monkeypatch.setattr(common, "MAX_LISTED_BAD_FILES", 2)
  report = common.BuildReport("demo")
  for index in range(3):
    report.skip(f"{index}.dcm", "unreadable")
  metadata = report.to_metadata()
  assert len(metadata["files"]) == 2
  assert not metadata["listed_all"]
  assert metadata["counts"] == {"unreadable": 3}


def _volume(rows, columns):
  hu = np.arange(2 * rows * columns, dtype=np.float32).reshape(2, rows, columns)
  affine = np.array(
      [[0.0, 0.0, 0.7, -50.0], [0.0, 0.8, 0.0, -40.0], [5.0, 0.0, 0.0, 10.0], [0, 0, 0, 1]]
  )
  positions = np.array([affine[:3, 3], affine[:3, 3] + affine[:3, 0]])
  return ct.CTVolume(hu=hu, positions=positions, affine=affine, spacing=(5.0, 0.8, 0.7))


def _patient_mm(volume, index):
  return (volume.affine @ np.array([*index, 1.0]))[:3]


def test_square_inplane_pads_with_air():
  volume = _volume(rows=4, columns=8)
  mask = np.zeros(volume.shape, np.uint8)
  mask[1, 3, 5] = 2
  square, square_mask = common.square_inplane(volume, mask, image_size=8)
  assert square.shape == (2, 8, 8)
  # Two rows of air above and below; the source pixel (1, 3, 5) is now (1, 5, 5).
  np.testing.assert_array_equal(square.hu[:, :2], ct.AIR_HU)
  np.testing.assert_array_equal(square.hu[:, 6:], ct.AIR_HU)
  np.testing.assert_array_equal(square.hu[:, 2:6], volume.hu)
  assert square_mask[1, 5, 5] == 2
  assert np.count_nonzero(square_mask) == 1
  np.testing.assert_allclose(_patient_mm(square, (1, 5, 5)), _patient_mm(volume, (1, 3, 5)))
  np.testing.assert_allclose(square.positions[1], _patient_mm(square, (1, 0, 0)))


def test_square_inplane_resizes_after_padding():
  volume = _volume(rows=8, columns=4)
  square, square_mask = common.square_inplane(volume, None, image_size=4)
  assert square.shape == (2, 4, 4)
  assert square_mask is None
  assert square.spacing[1:] == pytest.approx((1.6, 1.4))
  # The field of view keeps its outer edges: pixel (0, 0)'s corner stays put.
  corner = _patient_mm(volume, (0, -0.5, -2.5))
  np.testing.assert_allclose(_patient_mm(square, (0, -0.5, -0.5)), corner, atol=1e-6)


def test_square_inplane_rejects_a_mask_of_another_shape():
  volume = _volume(rows=4, columns=4)
  with pytest.raises(ValueError, match="mask shape"):
    common.square_inplane(volume, np.zeros((2, 4, 5), np.uint8), image_size=4)


def test_split_nifti_suffix_variants():
  assert common.split_nifti_suffix("ID_a_ID_b.nii.gz") == ("ID_a_ID_b", True)
  assert common.split_nifti_suffix("049.nii") == ("049", True)
  assert common.split_nifti_suffix("051.NII.GZ") == ("051", True)
  assert common.split_nifti_suffix("ID_a_ID_b") == ("ID_a_ID_b", False)
  assert common.split_nifti_suffix("ID_a_ID_b.gz") == ("ID_a_ID_b.gz", False)


def test_find_file_ignoring_case(tmp_path):
  (tmp_path / "Patient_demographics.csv").write_text("x")
  (tmp_path / "reads.csv").mkdir()  # A folder of that name is not the file.
  found = common.find_file_ignoring_case(tmp_path, "patient_demographics.csv")
  assert found == tmp_path / "Patient_demographics.csv"
  assert common.find_file_ignoring_case(tmp_path, "reads.csv") is None
  assert common.find_file_ignoring_case(tmp_path / "missing", "reads.csv") is None


def test_find_file_ignoring_case_ambiguous(tmp_path):
  (tmp_path / "Reads.csv").write_text("x")
  (tmp_path / "reads.csv").write_text("y")
  if len(list(tmp_path.iterdir())) < 2:
    pytest.skip("the file system ignores case")
  with pytest.raises(InputError, match="Reads.csv, reads.csv"):
    common.find_file_ignoring_case(tmp_path, "READS.CSV")


def test_store_build_metadata_keys():
  report = common.BuildReport("test")
  report.skip("a.dcm", "unreadable DICOM: truncated")
  metadata = {}
  common.store_build_metadata(metadata, num_folds=3, folds=[2, 2, 0], report=report)
  assert metadata["num_folds"] == 3
  assert metadata["fold_ranges"] == {"train": [[0, 2, 2], [2, 3, 0]]}
  assert metadata["bad_files"]["skipped"] == 1
  assert metadata["bad_files"]["counts"] == {"unreadable DICOM": 1}


def test_release_not_found_is_input_error():
  assert issubclass(common.ReleaseNotFoundError, InputError)
