"""DICOM writer and reader on synthetic series with quirks, and on pydicom's test files."""

import dataclasses
import logging
import os
import random
import re
import shutil
import subprocess
import threading

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pydicom.datadict
import pydicom.fileset
import pytest
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000Lossless, RLELossless

import dcm2niix_tool
import dicom_factory
from uem_ich_jax.ct import AIR_HU, CTReadError
from uem_ich_jax.ct import dicom
from uem_ich_jax.ct import nifti
from uem_ich_jax.ct.dicom import list_dicom_series, read_dicom_series
from uem_ich_jax.ct.dicom_write import write_dicom_series
from uem_ich_jax.ct import inspect as ct_inspect
from uem_ich_jax.ct.inspect import inspect_path
from uem_ich_jax.ct.volume import apply_air_floor


# -- Writer -------------------------------------------------------------------


def test_writer_round_trip_exact(tmp_path):
  volume = dicom_factory.make_volume(num_slices=5, tilt_deg=12.0)
  paths = write_dicom_series(volume, tmp_path, series_description="round trip", kernel="H30s")
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  np.testing.assert_allclose(read.positions, volume.positions, atol=1e-6)
  np.testing.assert_allclose(read.affine, volume.affine, atol=1e-6)
  np.testing.assert_allclose(read.spacing, volume.spacing, atol=1e-6)
  assert read.provenance.gantry_tilt_deg == pytest.approx(12.0, abs=1e-4)
  assert read.provenance.series_description == "round trip"
  assert read.provenance.kernel == "H30s"
  assert read.provenance.source_files == tuple(str(path) for path in paths)


def test_writer_header_fields(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3, tilt_deg=-7.5)
  paths = write_dicom_series(
      volume, tmp_path, patient_id="P7", study_uid="1.2.3", series_uid="1.2.3.4", window=(35, 90)
  )
  datasets = [pydicom.dcmread(path) for path in paths]
  assert [int(item.InstanceNumber) for item in datasets] == [1, 2, 3]
  first = datasets[0]
  assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
  assert first.SOPClassUID == pydicom.uid.CTImageStorage
  assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
  assert first.Modality == "CT"
  assert first.PatientID == "P7"
  assert first.StudyInstanceUID == "1.2.3"
  assert first.SeriesInstanceUID == "1.2.3.4"
  assert float(first.GantryDetectorTilt) == pytest.approx(-7.5)
  assert float(first.SliceThickness) == pytest.approx(2.5)
  assert [float(value) for value in first.PixelSpacing] == [0.5, 0.6]
  assert float(first.WindowCenter) == 35.0
  assert float(first.WindowWidth) == 90.0
  assert len({item.SOPInstanceUID for item in datasets}) == 3


def test_writer_fresh_uids_differ(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  first = pydicom.dcmread(write_dicom_series(volume, tmp_path / "a")[0])
  second = pydicom.dcmread(write_dicom_series(volume, tmp_path / "b")[0])
  assert first.SeriesInstanceUID != second.SeriesInstanceUID
  assert first.StudyInstanceUID != second.StudyInstanceUID


def test_writer_same_uids_same_headers(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  uids = {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_instance_uids": ["1.5", "1.6"]}
  first = pydicom.dcmread(write_dicom_series(volume, tmp_path / "a", **uids)[1])
  second = pydicom.dcmread(write_dicom_series(volume, tmp_path / "b", **uids)[1])
  assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
  assert first.SOPInstanceUID == "1.6"
  for dataset in (first, second):
    for keyword in ("StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime"):
      delattr(dataset, keyword)
  assert first == second


def test_writer_picks_signed_storage(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  hu = volume.hu.copy()
  hu[0, 0, 0] = -3000.0  # Below the intercept: needs signed stored values.
  signed = dataclasses.replace(volume, hu=hu)
  paths = write_dicom_series(signed, tmp_path / "signed")
  assert pydicom.dcmread(paths[0]).PixelRepresentation == 1
  unsigned = write_dicom_series(volume, tmp_path / "unsigned")
  assert pydicom.dcmread(unsigned[0]).PixelRepresentation == 0
  raw = dicom.stored_values(pydicom.dcmread(paths[0]))
  assert raw[0, 0] == -3000 + 1024


def test_writer_rejects_out_of_range_hu(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  hu = volume.hu.copy()
  hu[0, 0, 0] = 70000.0
  with pytest.raises(ValueError, match="does not fit"):
    write_dicom_series(dataclasses.replace(volume, hu=hu), tmp_path)


def test_writer_output_read_by_dcm2niix(tmp_path):
  binary = dcm2niix_tool.binary()
  volume = dicom_factory.make_volume(num_slices=4, rows=8, columns=9, tilt_deg=10.0)
  write_dicom_series(volume, tmp_path / "dicom", series_description="tilted")
  out = tmp_path / "nifti"
  out.mkdir()
  result = subprocess.run(
      [binary, "-z", "n", "-f", "%s_%d", "-o", str(out), str(tmp_path / "dicom")],
      capture_output=True, text=True, check=True,
  )
  estimate = re.search(r"estimated from slice vector (-?[\d.]+)", result.stdout)
  assert estimate is not None, result.stdout
  assert float(estimate.group(1)) == pytest.approx(10.0, abs=1e-3)
  # dcm2niix also writes a tilt-corrected copy; the plain file is the raw one.
  plain = [path for path in out.glob("*.nii") if "Tilt" not in path.name]
  assert len(plain) == 1
  ours = dicom_factory.nifti_in_volume_order(nib.load(plain[0]), volume)
  np.testing.assert_array_equal(ours, volume.hu)


# -- Stored values and HU -------------------------------------------------------


@pytest.mark.parametrize("pixel_representation", [0, 1])
def test_twelve_bit_garbage_high_bits(tmp_path, pixel_representation):
  volume = dicom_factory.make_volume(num_slices=2, rows=4, columns=5)
  paths = write_dicom_series(volume, tmp_path)
  rng = np.random.default_rng(1)
  low = -2048 if pixel_representation else 0
  high = 2047 if pixel_representation else 4095
  stored = {}
  for index, path in enumerate(paths):
    values = rng.integers(low, high + 1, size=(4, 5))
    values[0, 0], values[0, 1] = low, high
    stored[index] = values

    def edit(dataset, values=values):
      dicom_factory.set_stored_values(
          dataset, values, bits_stored=12, pixel_representation=pixel_representation
      )
      dataset.RescaleIntercept = "-1024" if pixel_representation == 0 else "0"

    dicom_factory.edit_file(path, edit)
  raw = np.frombuffer(pydicom.dcmread(paths[0]).PixelData, "<u2")
  assert np.any(raw >= 4096)  # The junk bits are really there.
  read = read_dicom_series(tmp_path)
  intercept = -1024.0 if pixel_representation == 0 else 0.0
  for index in range(2):
    expected = np.maximum(stored[index] + intercept, AIR_HU)
    np.testing.assert_array_equal(read.hu[index], expected)


def test_high_bit_not_at_top_of_stored_bits(tmp_path):
  volume = dicom_factory.make_volume(num_slices=1, rows=2, columns=2)
  (path,) = write_dicom_series(volume, tmp_path)

  def edit(dataset):
    values = np.array([[1, 2], [3, 4095]])
    dataset.BitsStored = 12
    dataset.HighBit = 13  # Stored bits 2..13.
    dataset.PixelRepresentation = 0
    dataset.PixelData = ((values << 2) | 0b11 | 0xC000).astype("<u2").tobytes()

  dicom_factory.edit_file(path, edit)
  np.testing.assert_array_equal(
      dicom.stored_values(pydicom.dcmread(path)), [[1, 2], [3, 4095]]
  )


def test_pixel_padding_value_becomes_air(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2, rows=3, columns=3)
  hu = volume.hu.copy()
  hu[:, 0, 0] = -1000.0  # Stored 24: the padding value below.
  hu[:, 1, 1] = 0.0
  paths = write_dicom_series(dataclasses.replace(volume, hu=hu), tmp_path)
  for path in paths:
    dicom_factory.edit_file(path, lambda dataset: dicom_factory.set_pixel_padding(dataset, 24))
  read = read_dicom_series(tmp_path)
  assert np.all(read.hu[:, 0, 0] == AIR_HU)
  assert np.all(read.hu[:, 1, 1] == 0.0)


def test_pixel_padding_range_limit(tmp_path):
  volume = dicom_factory.make_volume(num_slices=1, rows=1, columns=4)
  hu = np.array([[[-1014.0, -1004.0, -1003.0, 100.0]]], dtype=np.float32)  # Stored 10, 20, 21.
  (path,) = write_dicom_series(dataclasses.replace(volume, hu=hu), tmp_path)

  dicom_factory.edit_file(path, lambda dataset: dicom_factory.set_pixel_padding(dataset, 10, 20))
  read = read_dicom_series(path)
  np.testing.assert_array_equal(read.hu[0, 0], [AIR_HU, AIR_HU, -1003.0, 100.0])


def test_out_of_field_below_air_becomes_air(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2, rows=2, columns=2)
  hu = np.array([[[-1500.0, -2000.0], [-1024.0, 40.0]]] * 2, dtype=np.float32)
  write_dicom_series(dataclasses.replace(volume, hu=hu), tmp_path)
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu[0], [[AIR_HU, AIR_HU], [AIR_HU, 40.0]])


def test_rescale_slope_applied(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2, rows=2, columns=2)
  hu = np.array([[[-1000.0, 0.0], [500.0, 1500.0]]] * 2, dtype=np.float32)
  write_dicom_series(
      dataclasses.replace(volume, hu=hu), tmp_path,
      rescale_slope=0.5, rescale_intercept=-1024.0,
  )
  np.testing.assert_array_equal(read_dicom_series(tmp_path).hu, hu)


def test_monochrome1_keeps_hu(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  paths = write_dicom_series(volume, tmp_path)
  for path in paths:
    dicom_factory.edit_file(
        path, lambda dataset: setattr(dataset, "PhotometricInterpretation", "MONOCHROME1")
    )
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert read.provenance.photometric_interpretation == "MONOCHROME1"


@pytest.mark.parametrize(
    "center, width, expected",
    [
        (["40", "400"], ["80", "2000"], (40.0, 80.0)),
        ("40.5", "80.25", (40.5, 80.25)),
        (["-600.0", "40"], ["1500.00", "80"], (-600.0, 1500.0)),
    ],
)
def test_window_tags_tolerated(tmp_path, center, width, expected):
  volume = dicom_factory.make_volume(num_slices=2)

  def edit(dataset, index):
    dataset.WindowCenter = center
    dataset.WindowWidth = width

  write_dicom_series(volume, tmp_path, edit_dataset=edit)
  read = read_dicom_series(tmp_path)
  assert (read.provenance.window_center, read.provenance.window_width) == expected


# -- Slice order, duplicates, series ------------------------------------------------


def test_order_by_position_not_instance_number(tmp_path):
  volume = dicom_factory.make_volume(num_slices=6)
  names = [f"ID_{random.Random(index).getrandbits(40):010x}.dcm" for index in range(6)]

  def edit(dataset, index):
    dataset.InstanceNumber = 6 - index  # Reversed against position.

  paths = write_dicom_series(volume, tmp_path, edit_dataset=edit)
  for path, name in zip(paths, names):
    path.rename(tmp_path / name)
  assert sorted(names) != names  # The file names do not follow position either.
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert np.all(np.diff(read.slice_positions_mm) > 0)
  assert read.provenance.source_files == tuple(str(tmp_path / name) for name in names)


def test_exact_duplicate_dropped(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)
  shutil.copy(paths[1], tmp_path / "copy.dcm")
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  assert read.num_slices == 3
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert any("duplicate" in message for message in read.provenance.warnings)
  assert "duplicate" in caplog.text


def test_different_duplicate_rejected(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)
  other = dicom_factory.make_volume(num_slices=3, seed=5)
  write_dicom_series(
      other, tmp_path / "other", series_uid=pydicom.dcmread(paths[0]).SeriesInstanceUID
  )
  with pytest.raises(CTReadError, match="same slice position"):
    read_dicom_series(tmp_path)


def test_flat_folder_two_series(tmp_path):
  head = dicom_factory.make_volume(num_slices=3, seed=1)
  bone = dicom_factory.make_volume(num_slices=4, seed=2)
  head_paths = write_dicom_series(head, tmp_path, series_description="head", file_name="ID_a{index}.dcm")
  write_dicom_series(bone, tmp_path, series_description="bone", file_name="ID_b{index}.dcm")
  head_uid = str(pydicom.dcmread(head_paths[0]).SeriesInstanceUID)
  (tmp_path / "README").write_text("not DICOM\n")
  (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" * 10)

  with pytest.raises(CTReadError, match="2 series found") as error:
    read_dicom_series(tmp_path)
  assert head_uid in str(error.value)
  assert "'head', 3 files" in str(error.value)
  assert "'bone', 4 files" in str(error.value)

  read = read_dicom_series(tmp_path, series_uid=head_uid)
  np.testing.assert_array_equal(read.hu, head.hu)

  series = {item.description: item for item in list_dicom_series(tmp_path)}
  assert set(series) == {"head", "bone"}
  assert series["head"].num_files == 3
  assert series["bone"].num_files == 4
  assert series["head"].series_uid == head_uid
  assert set(series["head"].files) == set(head_paths)


def test_list_series_reads_headers_only(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3, rows=32, columns=32)
  paths = write_dicom_series(volume, tmp_path, series_description="cut")
  for path in paths:
    dicom_factory.truncate_file(path, 0.9)  # Pixel data cut short, header intact.
  (series,) = list_dicom_series(tmp_path)
  assert series.description == "cut"
  assert series.modality == "CT"
  assert series.files == tuple(sorted(paths))
  with pytest.raises(CTReadError, match="truncated"):
    read_dicom_series(tmp_path)


def test_unknown_series_uid_rejected(tmp_path):
  write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path)
  with pytest.raises(CTReadError, match="series 9.9.9 not found"):
    read_dicom_series(tmp_path, series_uid="9.9.9")


def test_nested_folders_searched(tmp_path):
  volume = dicom_factory.make_volume(num_slices=4)
  paths = write_dicom_series(volume, tmp_path / "a" / "b")
  paths[0].rename(tmp_path / "a" / paths[0].name)
  np.testing.assert_array_equal(read_dicom_series(tmp_path).hu, volume.hu)


# -- Geometry -----------------------------------------------------------------


def test_uniform_spacing_exact_affine(tmp_path):
  volume = dicom_factory.make_volume(num_slices=5, slice_spacing_mm=3.0)
  write_dicom_series(volume, tmp_path)
  read = read_dicom_series(tmp_path)
  assert not read.affine_is_approximate
  assert not read.provenance.spacing_varies
  assert read.spacing[0] == pytest.approx(3.0)
  homogeneous = np.c_[np.arange(5), np.zeros((5, 2)), np.ones(5)]
  np.testing.assert_allclose((read.affine @ homogeneous.T)[:3].T, read.positions, atol=1e-6)


def test_varying_spacing_median_affine(tmp_path, caplog):
  offsets = [0.0, 4.0, 8.0, 9.0, 16.0, 23.0]
  volume = dicom_factory.make_volume(slice_offsets_mm=offsets, tilt_deg=15.0)
  write_dicom_series(volume, tmp_path, edit_dataset=lambda dataset, index: setattr(
      dataset, "SliceThickness", "5.0"))
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  assert read.affine_is_approximate
  assert read.provenance.spacing_varies
  assert read.spacing[0] == pytest.approx(np.median(np.diff(offsets)))  # Not SliceThickness.
  np.testing.assert_allclose(np.diff(read.slice_positions_mm), np.diff(offsets), atol=1e-6)
  step = read.affine[:3, 0]
  assert float(step @ read.slice_normal) == pytest.approx(read.spacing[0])
  assert read.provenance.gantry_tilt_deg == pytest.approx(15.0, abs=1e-4)
  assert any("spacing varies" in message for message in read.provenance.warnings)
  assert "spacing varies" in caplog.text


def test_spacing_within_tolerance_is_uniform(tmp_path):
  offsets = [0.0, 5.0, 10.02, 15.0]  # 0.02 mm off: under 1 % of 5 mm.
  write_dicom_series(dicom_factory.make_volume(slice_offsets_mm=offsets), tmp_path)
  read = read_dicom_series(tmp_path)
  assert not read.provenance.spacing_varies
  assert read.spacing[0] == pytest.approx(5.0)


@pytest.mark.parametrize("tilt_deg", [20.0, -16.5])
def test_tilt_measured_from_geometry(tmp_path, tilt_deg, caplog):
  volume = dicom_factory.make_volume(num_slices=4, tilt_deg=tilt_deg)

  def edit(dataset, index):
    dataset.GantryDetectorTilt = "0"  # The reader must not trust the tag.

  write_dicom_series(volume, tmp_path, edit_dataset=edit)
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  assert read.provenance.gantry_tilt_deg == pytest.approx(tilt_deg, abs=1e-4)
  assert any("gantry tilt" in message for message in read.provenance.warnings)
  assert "gantry tilt" in caplog.text
  # The slice column of the affine carries the shear: it is the z step.
  np.testing.assert_allclose(read.affine[:3, 0], read.positions[1] - read.positions[0], atol=1e-6)


def test_untilted_has_no_tilt_warning(tmp_path):
  write_dicom_series(dicom_factory.make_volume(num_slices=3), tmp_path)
  read = read_dicom_series(tmp_path)
  assert read.provenance.gantry_tilt_deg == 0.0
  assert read.provenance.warnings == ()


# -- Bad input ----------------------------------------------------------------


@pytest.mark.parametrize("keep_fraction", [0.1, 0.3, 0.8])
def test_truncated_single_file_rejected(tmp_path, keep_fraction):
  (path,) = write_dicom_series(dicom_factory.make_volume(num_slices=1, rows=32, columns=32), tmp_path)
  dicom_factory.truncate_file(path, keep_fraction)
  with pytest.raises(CTReadError, match=str(path.name)):
    read_dicom_series(path)


def test_truncated_file_in_series_skipped(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=4, rows=32, columns=32)
  paths = write_dicom_series(volume, tmp_path)
  dicom_factory.truncate_file(paths[2], 0.8)
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  assert read.num_slices == 3
  np.testing.assert_array_equal(read.hu, volume.hu[[0, 1, 3]])
  assert any(paths[2].name in message for message in read.provenance.warnings)
  assert paths[2].name in caplog.text


def test_header_truncated_file_skipped(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)
  dicom_factory.truncate_file(paths[0], 0.3)
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu[1:])


def test_folder_without_dicom_rejected(tmp_path):
  (tmp_path / "notes.txt").write_text("nothing here\n")
  with pytest.raises(CTReadError, match="no DICOM images found"):
    read_dicom_series(tmp_path)


def test_missing_path_rejected(tmp_path):
  with pytest.raises(CTReadError, match="no such file"):
    read_dicom_series(tmp_path / "absent")


def test_non_ct_modality_rejected(tmp_path):
  write_dicom_series(
      dicom_factory.make_volume(num_slices=2), tmp_path,
      edit_dataset=lambda dataset, index: setattr(dataset, "Modality", "MR"),
  )
  with pytest.raises(CTReadError, match="modality MR is not CT"):
    read_dicom_series(tmp_path)


def test_single_slice_and_min_slices(tmp_path):
  volume = dicom_factory.make_volume(num_slices=1)
  (path,) = write_dicom_series(volume, tmp_path)
  read = read_dicom_series(path)
  assert read.shape == (1, 6, 7)
  assert read.spacing[0] == pytest.approx(2.5)  # From SliceThickness, with a warning.
  assert any("single slice" in message for message in read.provenance.warnings)
  with pytest.raises(CTReadError, match="at least 2 needed"):
    read_dicom_series(tmp_path, min_slices=2)


def test_mixed_image_sizes_rejected(tmp_path):
  small = dicom_factory.make_volume(num_slices=2, rows=6, columns=7)
  uid = pydicom.dcmread(write_dicom_series(small, tmp_path)[0]).SeriesInstanceUID
  large = dicom_factory.make_volume(slice_offsets_mm=[10.0], rows=8, columns=7)
  write_dicom_series(large, tmp_path / "more", series_uid=uid)
  with pytest.raises(CTReadError, match="image size"):
    read_dicom_series(tmp_path)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_tag_skips_file(tmp_path, keyword):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)
  dicom_factory.edit_file(paths[1], lambda dataset: delattr(dataset, keyword))
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu[[0, 2]])
  assert any(
      paths[1].name in message and f"{keyword} is missing" in message
      for message in read.provenance.warnings
  )


def test_missing_position_everywhere_rejected(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path)
  for path in paths:
    dicom_factory.edit_file(path, lambda dataset: delattr(dataset, "ImagePositionPatient"))
  with pytest.raises(CTReadError, match="none of the 2 files .*\n.*ImagePositionPatient is missing"):
    read_dicom_series(tmp_path)


def test_mixed_orientation_rejected(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=3), tmp_path)
  dicom_factory.edit_file(
      paths[1], lambda dataset: setattr(dataset, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1])
  )
  with pytest.raises(CTReadError, match="ImageOrientationPatient"):
    read_dicom_series(tmp_path)


# -- Compressed pixel data ------------------------------------------------------


def _compressed_twin(tmp_path, transfer_syntax):
  volume = dicom_factory.make_volume(num_slices=3, rows=64, columns=64)
  plain = write_dicom_series(volume, tmp_path / "plain")
  (tmp_path / "packed").mkdir()
  for path in plain:
    dataset = pydicom.dcmread(path)
    dataset.compress(transfer_syntax)
    dataset.save_as(tmp_path / "packed" / path.name, enforce_file_format=True)
  return volume


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_same_hu(tmp_path, transfer_syntax):
  volume = _compressed_twin(tmp_path, transfer_syntax)
  packed = pydicom.dcmread(next((tmp_path / "packed").iterdir()))
  assert packed.file_meta.TransferSyntaxUID == transfer_syntax
  np.testing.assert_array_equal(read_dicom_series(tmp_path / "packed").hu, volume.hu)


def test_missing_decoder_rejected(tmp_path, monkeypatch):
  _compressed_twin(tmp_path, RLELossless)
  # Pretend no RLE plugin is installed, as on a machine without the plugins.
  monkeypatch.setattr(get_decoder(RLELossless), "_available", {})
  with pytest.raises(CTReadError, match="no decoder installed for transfer syntax RLE"):
    read_dicom_series(tmp_path / "packed")


def test_pydicom_ct_small():
  path = pydicom.data.get_testdata_file("CT_small.dcm")
  dataset = pydicom.dcmread(path)
  read = read_dicom_series(path)
  expected = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(
      dataset.RescaleIntercept
  )
  np.testing.assert_array_equal(read.hu[0], np.maximum(expected, AIR_HU))
  assert read.provenance.series_uid == dataset.SeriesInstanceUID
  np.testing.assert_allclose(read.positions[0], [float(v) for v in dataset.ImagePositionPatient])


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_pydicom_twins_same_stored_values(twin):
  reference = dicom.stored_values(pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm")))
  other = dicom.stored_values(pydicom.dcmread(pydicom.data.get_testdata_file(twin)))
  np.testing.assert_array_equal(other, reference)


# -- inspect ------------------------------------------------------------------


def test_inspect_synthetic_series(tmp_path):
  offsets = [0.0, 2.0, 4.0, 10.0]
  volume = dicom_factory.make_volume(slice_offsets_mm=offsets, tilt_deg=-8.0)
  write_dicom_series(volume, tmp_path, series_description="inspected")
  report = inspect_path(tmp_path)
  assert set(report) == {
      "series_uid", "series_description", "num_slices", "shape", "spacing_mm",
      "spacing_varies", "gantry_tilt_deg", "slice_positions_mm", "hu_percentiles", "warnings",
  }
  assert report["series_description"] == "inspected"
  assert report["num_slices"] == 4
  assert report["shape"] == [4, 6, 7]
  assert report["spacing_mm"] == pytest.approx([2.0, 0.5, 0.6])
  assert report["spacing_varies"] is True
  assert report["gantry_tilt_deg"] == pytest.approx(-8.0, abs=1e-4)
  relative = np.array(report["slice_positions_mm"]) - report["slice_positions_mm"][0]
  np.testing.assert_allclose(relative, offsets, atol=1e-6)
  assert report["hu_percentiles"]["p50"] == pytest.approx(np.percentile(volume.hu, 50))
  assert len(report["warnings"]) == 2


def _nifti_image(nifti_class=nib.Nifti1Image):
  data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3) - 30
  return nifti_class(data, np.diag([-0.5, -0.6, 2.0, 1.0]))


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("nifti_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_is_nifti_by_content(tmp_path, gzipped, nifti_class):
  plain = tmp_path / ("scan.nii.gz" if gzipped else "scan.nii")
  nib.save(_nifti_image(nifti_class), plain)
  renamed = plain.rename(tmp_path / "scan.dat")  # No telling suffix.
  assert ct_inspect.is_nifti(renamed)


def test_is_nifti_rejects_dicom_and_text(tmp_path):
  (path,) = write_dicom_series(dicom_factory.make_volume(num_slices=1), tmp_path)
  assert not ct_inspect.is_nifti(path)
  text = tmp_path / "scan.nii"
  text.write_text("not an image\n" * 50)
  assert not ct_inspect.is_nifti(text)
  assert not ct_inspect.is_nifti(tmp_path)


def test_inspect_nifti_file(tmp_path):
  path = tmp_path / "scan.nii.gz"
  nib.save(_nifti_image(), path)
  report = inspect_path(path.rename(tmp_path / "scan"))
  assert report["num_slices"] == 3
  assert sorted(report["shape"]) == [3, 4, 5]
  assert report["spacing_mm"][0] == pytest.approx(2.0)


def test_inspect_nifti_rejects_series_option(tmp_path):
  path = tmp_path / "scan.nii"
  nib.save(_nifti_image(), path)
  with pytest.raises(CTReadError, match="--series"):
    inspect_path(path, series_uid="1.2.3")


def test_read_files_of_listed_series(tmp_path):
  head = dicom_factory.make_volume(num_slices=3, seed=1)
  bone = dicom_factory.make_volume(num_slices=2, seed=2)
  write_dicom_series(head, tmp_path, series_description="head", file_name="ID_a{index}.dcm")
  write_dicom_series(bone, tmp_path, series_description="bone", file_name="ID_b{index}.dcm")
  series = {item.description: item for item in list_dicom_series(tmp_path)}
  read = dicom.read_dicom_files(series["bone"].files)
  np.testing.assert_array_equal(read.hu, bone.hu)
  with pytest.raises(CTReadError, match="2 series found"):
    dicom.read_dicom_files([*series["bone"].files, *series["head"].files])
  with pytest.raises(CTReadError, match="no such file"):
    dicom.read_dicom_files([tmp_path / "absent.dcm"])
  with pytest.raises(CTReadError, match="empty"):
    dicom.read_dicom_files([])


def test_invalid_window_tag_ignored(tmp_path):
  def edit(dataset, index):
    # pydicom will not build a DS element from "abc", so store it with another VR.
    dataset.add_new(0x00281050, "LO", "abc")

  write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path, edit_dataset=edit)
  read = read_dicom_series(tmp_path)
  assert read.provenance.window_center is None
  assert read.provenance.window_width == 80.0


# -- Attacked inputs: invalid files are skipped or rejected, never misread ------


def _one_bad_file(tmp_path, edit, num_slices=3, **edit_options):
  """Write a series, apply `edit` to its middle file, and return (volume, bad path)."""
  volume = dicom_factory.make_volume(num_slices=num_slices)
  paths = write_dicom_series(volume, tmp_path)
  bad = paths[num_slices // 2]
  dicom_factory.edit_file(bad, edit, **edit_options)
  return volume, bad


def _assert_skipped(tmp_path, volume, bad, reason, caplog):
  """Check that reading skips `bad` alone, with `reason` in a logged and stored warning."""
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  keep = [index for index in range(volume.num_slices) if index != volume.num_slices // 2]
  np.testing.assert_array_equal(read.hu, volume.hu[keep])
  stored = [message for message in read.provenance.warnings if bad.name in message]
  assert len(stored) == 1
  assert stored[0].startswith("skipped ")
  assert re.search(reason, stored[0]), stored[0]
  assert bad.name in caplog.text


def _halve_rows(dataset):
  dataset.Rows = int(dataset.Rows) // 2


def _eight_bits(dataset):
  dataset.BitsAllocated = 8
  dataset.BitsStored = 8
  dataset.HighBit = 7


@pytest.mark.parametrize("edit", [_halve_rows, _eight_bits], ids=["rows_halved", "bits_8"])
def test_pixel_data_longer_than_header_skipped(tmp_path, caplog, edit):
  volume, bad = _one_bad_file(tmp_path, edit)
  _assert_skipped(tmp_path, volume, bad, "pixel data is longer than the header says", caplog)


def test_pixel_data_longer_everywhere_rejected(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path)
  for path in paths:
    dicom_factory.edit_file(path, _halve_rows)
  with pytest.raises(CTReadError, match="none of the 2 files.*\\n.*longer than the header"):
    read_dicom_series(tmp_path)


def test_odd_length_pixel_data_with_pad_byte_read(tmp_path):
  values = np.arange(15, dtype=np.uint8).reshape(3, 5) * 10

  def eight_bit(dataset, index):
    _eight_bits(dataset)
    dataset.Rows, dataset.Columns = 3, 5
    dataset.PixelRepresentation = 0
    dataset.RescaleIntercept = -100
    dataset.RescaleSlope = 1
    dataset.PixelData = values.tobytes()  # 15 bytes; the file gets a pad byte.

  (path,) = write_dicom_series(
      dicom_factory.make_volume(num_slices=1, rows=3, columns=5), tmp_path, edit_dataset=eight_bit
  )
  assert len(pydicom.dcmread(path).PixelData) == 16
  read = read_dicom_series(path)
  np.testing.assert_array_equal(read.hu[0], values.astype(np.float32) - 100)


def _empty(path):
  path.write_bytes(b"")


def _cut_before_rows(path):
  dicom_factory.cut_before_tag(path, 0x0028, 0x0010)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_empty, "empty file"),
        (_cut_before_rows, "without Rows \\(truncated or damaged header\\)"),
        (dicom_factory.gzip_file, "gzip-compressed"),
        (lambda path: path.write_bytes(bytes(range(256)) * 8), "not a DICOM file"),
    ],
    ids=["empty", "cut_before_rows", "gzipped", "noise"],
)
def test_damaged_file_skipped_with_warning(tmp_path, caplog, damage, reason):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)
  damage(paths[1])
  _assert_skipped(tmp_path, volume, paths[1], reason, caplog)


def test_files_without_preamble_read(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=3, tilt_deg=5.0)
  paths = write_dicom_series(volume, tmp_path)
  for path in paths:
    dicom_factory.strip_preamble(path)
  assert not path.read_bytes()[128:132] == b"DICM"
  read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  np.testing.assert_allclose(read.affine, volume.affine, atol=1e-6)


def test_non_dicom_files_ignored_quietly(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=2)
  write_dicom_series(volume, tmp_path)
  (tmp_path / "README").write_text("Head CT, exported 2024\n")
  (tmp_path / "notes.txt").write_text("nothing\n")
  (tmp_path / "scan.json").write_text("{}\n")
  (tmp_path / "scan.nii").write_bytes(b"\x00" * 400)
  (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" * 10)
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert read.provenance.warnings == ()
  assert caplog.text == ""


def test_no_images_message_counts_files(tmp_path):
  for name in ("a.dcm", "b.dcm"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "README.txt").write_text("nothing\n")
  with pytest.raises(CTReadError, match="no DICOM images found among 3 file") as error:
    read_dicom_series(tmp_path)
  assert "2 damaged, 1 not DICOM images" in str(error.value)
  assert "a.dcm: empty file" in str(error.value)


def test_dicomdir_alone_named_in_message(tmp_path):
  (path,) = write_dicom_series(
      dicom_factory.make_volume(num_slices=1), tmp_path / "in",
      edit_dataset=lambda dataset, index: setattr(dataset, "StudyID", "1"),
  )
  file_set = pydicom.fileset.FileSet()
  file_set.add(str(path))
  file_set.write(str(tmp_path / "out"))
  with pytest.raises(CTReadError, match="Media Storage Directory Storage file, not an image"):
    read_dicom_series(tmp_path / "out" / "DICOMDIR")


@pytest.mark.parametrize(
    "keyword, value, reason",
    [
        ("RescaleIntercept", "nan", "RescaleIntercept is not finite"),
        ("RescaleSlope", "inf", "RescaleSlope is not finite"),
        ("RescaleSlope", "1e300", "HU up to .* the rescale is invalid"),
        ("RescaleSlope", "0", "RescaleSlope is 0"),
        ("RescaleSlope", ["2", "3"], "RescaleSlope must have one value, got 2"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # Written on purpose.
def test_invalid_rescale_skips_file(tmp_path, caplog, keyword, value, reason):
  tag = pydicom.datadict.tag_for_keyword(keyword)
  volume, bad = _one_bad_file(tmp_path, lambda dataset: dataset.add_new(tag, "DS", value))
  _assert_skipped(tmp_path, volume, bad, reason, caplog)


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept"])
@pytest.mark.parametrize("empty", [False, True])
def test_missing_rescale_skips_file(tmp_path, caplog, keyword, empty):
  # Both tags are type 1 in the CT Image module; an intercept taken as 0 would
  # make the slice 1024 HU too bright.
  def edit(dataset):
    if empty:
      dataset.add_new(pydicom.datadict.tag_for_keyword(keyword), "DS", "")
    else:
      delattr(dataset, keyword)

  volume, bad = _one_bad_file(tmp_path, edit)
  _assert_skipped(tmp_path, volume, bad, f"{keyword} is missing or empty", caplog)


def test_missing_rescale_in_one_file_named(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=1), tmp_path)
  dicom_factory.edit_file(paths[0], lambda dataset: delattr(dataset, "RescaleIntercept"))
  with pytest.raises(CTReadError, match=f"{paths[0].name}: RescaleIntercept is missing"):
    read_dicom_series(tmp_path)


@pytest.mark.parametrize(
    "keyword, value, reason",
    [
        ("RescaleSlope", "abc", "RescaleSlope is not a number"),
        ("RescaleSlope", "1,5", "RescaleSlope is not a number"),
        ("RescaleIntercept", "x1", "RescaleIntercept is not a number"),
        ("PixelSpacing", "a\\b", "invalid PixelSpacing"),
    ],
)
def test_unparsable_decimal_skips_file(tmp_path, caplog, keyword, value, reason):
  # pydicom will not build a DS element from these strings, so store them with another VR.
  tag = pydicom.datadict.tag_for_keyword(keyword)
  volume, bad = _one_bad_file(tmp_path, lambda dataset: dataset.add_new(tag, "LO", value))
  _assert_skipped(tmp_path, volume, bad, reason, caplog)


def _set_transfer_syntax(uid):
  def edit(dataset):
    if uid is None:
      del dataset.file_meta.TransferSyntaxUID
    else:
      dataset.file_meta.TransferSyntaxUID = uid
  return edit


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda dataset: delattr(dataset, "BitsAllocated"), "BitsAllocated is missing"),
        (lambda dataset: delattr(dataset, "Columns"), "Columns is missing"),
        (lambda dataset: setattr(dataset, "PixelData", b""), "pixel data is empty"),
        (lambda dataset: setattr(dataset, "PixelRepresentation", 2), "PixelRepresentation 2"),
        (
            lambda dataset: dataset.add_new(0x00280120, "US", [0, 1]),
            "PixelPaddingValue must have one value",
        ),
        (_set_transfer_syntax("1.2.3.4.5.6"), "1.2.3.4.5.6 is not a known transfer syntax"),
    ],
    ids=["no_bits_allocated", "no_columns", "empty_pixel_data", "pixel_representation_2",
         "two_padding_values", "unknown_transfer_syntax"],
)
def test_invalid_image_tag_skips_file(tmp_path, caplog, edit, reason):
  volume, bad = _one_bad_file(tmp_path, edit, enforce_file_format=False)
  _assert_skipped(tmp_path, volume, bad, reason, caplog)


def test_missing_transfer_syntax_inferred(tmp_path):
  volume, _ = _one_bad_file(tmp_path, _set_transfer_syntax(None), enforce_file_format=False)
  np.testing.assert_array_equal(read_dicom_series(tmp_path).hu, volume.hu)


def test_invalid_image_tag_everywhere_rejected(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=3), tmp_path)
  for path in paths:
    dicom_factory.edit_file(path, lambda dataset: delattr(dataset, "Columns"))
  with pytest.raises(CTReadError, match="none of the 3 files") as error:
    read_dicom_series(tmp_path)
  assert str(error.value).count("Columns is missing") == 3


def test_compressed_absurd_image_size_skipped(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=3)
  paths = write_dicom_series(volume, tmp_path)

  def enlarge(dataset):
    dataset.compress(RLELossless)
    dataset.Rows = dataset.Columns = 5000

  dicom_factory.edit_file(paths[1], enlarge)
  _assert_skipped(tmp_path, volume, paths[1], "image size 5000x5000 exceeds the limit", caplog)


@pytest.mark.parametrize(
    "spacing, reason",
    [([0, 0], "must be positive"), ([-0.5, -0.6], "must be positive"), ([0.5], "2 finite numbers")],
)
def test_invalid_pixel_spacing_skips_file(tmp_path, caplog, spacing, reason):
  volume, bad = _one_bad_file(tmp_path, lambda dataset: setattr(dataset, "PixelSpacing", spacing))
  _assert_skipped(tmp_path, volume, bad, reason, caplog)


def test_mixed_pixel_spacing_rejected(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=3), tmp_path)
  dicom_factory.edit_file(paths[1], lambda dataset: setattr(dataset, "PixelSpacing", [0.8, 0.8]))
  with pytest.raises(CTReadError, match="PixelSpacing \\[0.8, 0.8\\] differs from \\[0.5, 0.6\\]"):
    read_dicom_series(tmp_path)


def _scale_orientation(factor):
  def edit(dataset, index):
    dataset.ImageOrientationPatient = [float(value) * factor for value in dataset.ImageOrientationPatient]
  return edit


def test_orientation_not_unit_rejected(tmp_path):
  write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path, edit_dataset=_scale_orientation(2))
  with pytest.raises(CTReadError, match="row cosines .* have length 2, not 1"):
    read_dicom_series(tmp_path)


def test_orientation_near_unit_normalised(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3, tilt_deg=10.0)
  write_dicom_series(volume, tmp_path, edit_dataset=_scale_orientation(1.0004))
  read = read_dicom_series(tmp_path)
  np.testing.assert_allclose(np.linalg.norm(read.affine[:3, 1:3], axis=0), [0.5, 0.6], atol=1e-9)
  np.testing.assert_allclose(read.affine, volume.affine, atol=1e-5)


def test_orientation_not_orthogonal_rejected(tmp_path):
  def skew(dataset, index):
    dataset.ImageOrientationPatient = [1, 0, 0, 0.6, 0.8, 0]

  write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path, edit_dataset=skew)
  with pytest.raises(CTReadError, match="not orthogonal \\(dot product 0.6\\)"):
    read_dicom_series(tmp_path)


def _shift_position(offset):
  def edit(dataset):
    dataset.ImagePositionPatient = [
        float(value) + delta for value, delta in zip(dataset.ImagePositionPatient, offset)
    ]
  return edit


def test_off_line_slice_makes_affine_approximate(tmp_path, caplog):
  volume = dicom_factory.make_volume(num_slices=5)
  paths = write_dicom_series(volume, tmp_path)
  dicom_factory.edit_file(paths[2], _shift_position([50.0, 0.0, 0.0]))
  with caplog.at_level(logging.WARNING):
    read = read_dicom_series(tmp_path)
  assert read.affine_is_approximate
  assert not read.provenance.spacing_varies
  assert any("1 slice position(s) lie off the line" in message for message in read.provenance.warnings)
  np.testing.assert_allclose(read.positions[2], volume.positions[2] + [50.0, 0.0, 0.0])
  # The affine follows the other four slices, so it is the unshifted volume's affine.
  np.testing.assert_allclose(read.affine, volume.affine, atol=1e-9)


def test_tilt_robust_to_one_shifted_slice(tmp_path):
  volume = dicom_factory.make_volume(num_slices=5)
  paths = write_dicom_series(volume, tmp_path)
  dicom_factory.edit_file(paths[-1], _shift_position([0.0, 5.0, 0.0]))
  read = read_dicom_series(tmp_path)
  assert read.provenance.gantry_tilt_deg == 0.0
  assert read.affine_is_approximate


@pytest.mark.parametrize("offset", [[0.0, 0.0, 1e300], [0.0, 2e5, 0.0]])
def test_absurd_position_skips_file(tmp_path, caplog, offset):
  volume, bad = _one_bad_file(tmp_path, _shift_position(offset))
  _assert_skipped(tmp_path, volume, bad, "more than 100000 mm from the origin", caplog)


def test_absurd_position_message_short(tmp_path):
  (path,) = write_dicom_series(dicom_factory.make_volume(num_slices=1), tmp_path)
  dicom_factory.edit_file(path, lambda dataset: setattr(dataset, "ImagePositionPatient", [1e200] * 3))
  with pytest.raises(CTReadError, match="\\[1e\\+200, 1e\\+200, 1e\\+200\\]") as error:
    read_dicom_series(path)
  assert len(str(error.value)) < 300


def test_named_pipe_in_folder_ignored(tmp_path):
  volume = dicom_factory.make_volume(num_slices=2)
  write_dicom_series(volume, tmp_path)
  pipe = tmp_path / "pipe"
  os.mkfifo(pipe)
  result = {}
  reader = threading.Thread(
      target=lambda: result.update(volume=read_dicom_series(tmp_path)), daemon=True
  )
  reader.start()
  reader.join(timeout=20)
  if reader.is_alive():
    # Unblock a reader stuck opening the pipe, so the test process can end.
    os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(timeout=5)
    pytest.fail("reading a folder with a named pipe did not finish in 20 s")
  np.testing.assert_array_equal(result["volume"].hu, volume.hu)


def test_linked_series_folder_followed(tmp_path):
  volume = dicom_factory.make_volume(num_slices=3)
  write_dicom_series(volume, tmp_path / "data" / "series")
  (tmp_path / "study").mkdir()
  (tmp_path / "study" / "series").symlink_to(tmp_path / "data" / "series")
  (tmp_path / "study" / "loop").symlink_to(tmp_path / "study")
  (tmp_path / "study" / "dangling").symlink_to(tmp_path / "absent")
  read = read_dicom_series(tmp_path / "study")
  np.testing.assert_array_equal(read.hu, volume.hu)
  assert read.provenance.warnings == ()


def test_read_files_names_folder(tmp_path):
  paths = write_dicom_series(dicom_factory.make_volume(num_slices=2), tmp_path / "series")
  with pytest.raises(CTReadError, match="series: is a folder, not a file"):
    dicom.read_dicom_files([*paths, tmp_path / "series"])


def test_inspect_nifti_name_goes_to_nifti_reader(tmp_path, monkeypatch):
  path = tmp_path / "empty.nii.gz"
  path.write_bytes(b"")
  called = []

  def fake_read_nifti(read_path):
    called.append(read_path)
    raise CTReadError(f"{read_path}: from the NIfTI reader")

  monkeypatch.setattr(nifti, "read_nifti", fake_read_nifti)
  with pytest.raises(CTReadError, match="from the NIfTI reader"):
    inspect_path(path)
  assert called == [path]


def test_inspect_rejects_non_finite_hu():
  volume = dicom_factory.make_volume(num_slices=2)
  volume.hu[0, 0, 0] = np.nan
  with pytest.raises(CTReadError, match="1 of 84 HU values are NaN or infinite"):
    ct_inspect.summarize_volume(volume)


def test_air_floor_keeps_dtype():
  hu = np.array([-3024.0, -1025.0, -1024.0, 40.0], dtype=np.float32)
  floored = apply_air_floor(hu)
  assert floored.dtype == np.float32
  np.testing.assert_array_equal(floored, [AIR_HU, AIR_HU, AIR_HU, 40.0])
