"""The physionet_ct_ich builder on dummy data in the PhysioNet CT-ICH 1.3.1 layout."""

import collections
import pathlib
import shutil

import nibabel
import numpy as np
import pytest
import tensorflow_datasets as tfds

from uem_ich_jax import ct
from uem_ich_jax.datasets import build, common
from uem_ich_jax.datasets.physionet_ct_ich import PhysionetCtIch, PhysionetCtIchConfig
from uem_ich_jax.datasets.physionet_ct_ich import make_dummy_data as dummy
from uem_ich_jax.datasets.physionet_ct_ich import physionet_ct_ich_dataset_builder as pct

SIZE = 64  # The dummy scans' own size, so slices are stored without resizing.
NUM_FOLDS = 3
NUM_SLICES = dummy.SHAPE[0]
GOOD_STEMS = [patient.stem for patient in dummy.GOOD_PATIENTS]
RELEASE = dummy.DUMMY_DIR / dummy.RELEASE_FOLDER


@pytest.fixture(scope="module")
def phantoms():
  return {patient.stem: dummy.generate_patient_scan(patient) for patient in dummy.GOOD_PATIENTS}


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
  config = PhysionetCtIchConfig(
      name="slices_tiny", layout="slices", image_size=SIZE, num_folds=NUM_FOLDS
  )
  builder = PhysionetCtIch(
      config=config, data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record"
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(dummy.DUMMY_DIR))
  )
  return builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  # The registered config (384 px) through the `uem-ich build-dataset` path.
  data_dir = tmp_path_factory.mktemp("tfds")
  build.build_dataset(
      "physionet_ct_ich", data_dir=str(data_dir), manual_dir=str(dummy.DUMMY_DIR), config="scans"
  )
  return tfds.data_source("physionet_ct_ich/scans", data_dir=str(data_dir), split="train")


def _metadata(source):
  return dict(source.dataset_info.metadata.items())


def _expected_window(phantom_scan):
  # The dummy files store HU as int16, and every reader floors at air.
  stored_hu = np.maximum(np.rint(phantom_scan.volume.hu), ct.AIR_HU)
  return ct.windows_uint8(stored_hu)


# --- slices layout ---------------------------------------------------------


def test_slices_count_and_order(slices):
  assert len(slices) == len(GOOD_STEMS) * NUM_SLICES
  for index in range(len(slices)):
    example = slices[index]
    assert example["patient_id"].decode() == GOOD_STEMS[index // NUM_SLICES]
    assert example["scan_id"] == example["patient_id"]
    assert int(example["slice_index"]) == index % NUM_SLICES


def test_slice_labels_match_phantom(slices, phantoms):
  positives = 0
  for index in range(len(slices)):
    example = slices[index]
    scan = phantoms[example["patient_id"].decode()]
    slice_index = int(example["slice_index"])
    np.testing.assert_array_equal(
        example["labels"], scan.slice_labels[slice_index], err_msg=f"example {index}"
    )
    fractured = int(scan.fracture_mask[slice_index].any())
    assert int(example["fracture"]) == fractured, index
    positives += int(example["labels"][0])
  assert positives > 0


def test_slice_number_follows_affine(slices):
  # 053 is stored with z toward Inferior: SliceNumber 1 is its top slice.
  flipped = {patient.stem for patient in dummy.GOOD_PATIENTS if patient.flip_z}
  assert flipped == {"053"}
  for index in range(len(slices)):
    example = slices[index]
    slice_index = int(example["slice_index"])
    expected = NUM_SLICES - slice_index if example["patient_id"].decode() in flipped else (
        slice_index + 1)
    assert int(example["slice_number"]) == expected, index


def test_slice_images_are_phantom_windows(slices, phantoms):
  for index in range(len(slices)):
    example = slices[index]
    scan = phantoms[example["patient_id"].decode()]
    expected = _expected_window(scan)[int(example["slice_index"])]
    np.testing.assert_array_equal(example["image"], expected, err_msg=f"example {index}")


def test_slice_masks_binary(slices, phantoms):
  for index in range(len(slices)):
    example = slices[index]
    scan = phantoms[example["patient_id"].decode()]
    expected = (scan.mask[int(example["slice_index"])] > 0).astype(np.uint8)
    np.testing.assert_array_equal(example["mask"], expected, err_msg=f"example {index}")
  assert _metadata(slices)["mask_value_sets"] == {"0,255": 2, "0": 1}
  assert _metadata(slices)["num_mask_classes"] == 2


def test_slice_geometry_from_affine(slices, phantoms):
  for index in range(0, len(slices), NUM_SLICES):
    example = slices[index]
    volume = phantoms[example["patient_id"].decode()].volume
    np.testing.assert_allclose(example["affine"], volume.affine, atol=1e-3)
    np.testing.assert_allclose(example["spacing"], volume.spacing, rtol=1e-5)
    # Slice index grows toward Superior (LPS +z) for the flipped file too.
    assert example["affine"][2, 0] > 0


def test_slice_demographics(slices):
  by_patient = {
      slices[i]["patient_id"].decode(): slices[i] for i in range(0, len(slices), NUM_SLICES)
  }
  for patient in dummy.GOOD_PATIENTS:
    example = by_patient[patient.stem]
    assert float(example["age_years"]) == float(patient.age)
    assert example["gender"].decode() == patient.gender


def test_no_patient_in_two_folds(slices):
  folds_of_patient = collections.defaultdict(set)
  for index in range(len(slices)):
    example = slices[index]
    folds_of_patient[example["patient_id"]].add(int(example["fold"]))
  assert all(len(folds) == 1 for folds in folds_of_patient.values())
  # Folds are assigned over all five patients found, the two bad ones included.
  expected = common.patient_folds([p.stem for p in dummy.PATIENTS], NUM_FOLDS, seed=0)
  for patient, folds in folds_of_patient.items():
    assert folds == {expected[patient.decode()]}


def test_fold_ranges_match_examples(slices):
  metadata = _metadata(slices)
  assert metadata["num_folds"] == NUM_FOLDS
  stored = [int(slices[i]["fold"]) for i in range(len(slices))]
  assert metadata["fold_ranges"]["train"] == common.fold_ranges(stored)


def test_bad_scans_reported(slices):
  bad = _metadata(slices)["bad_files"]
  assert bad["skipped"] == 2
  assert bad["kept"] == 0
  assert bad["counts"] == {"unreadable scan": 1, "slice numbers do not fit": 1}
  reasons = {pathlib.Path(entry["path"]).name: entry["reason"] for entry in bad["files"]}
  assert set(reasons) == {"071.nii", "097.nii"}
  assert "truncated" in reasons["071.nii"]
  assert "SliceNumber 1-13" in reasons["097.nii"]
  assert "which has 12 slices" in reasons["097.nii"]


# --- scans layout ------------------------------------------------------------


def test_scans_layout(scans, phantoms):
  assert len(scans) == len(GOOD_STEMS)
  for index, stem in enumerate(GOOD_STEMS):
    example = scans[index]
    scan = phantoms[stem]
    assert example["patient_id"].decode() == stem
    assert example["image"].shape == (NUM_SLICES, 384, 384, 3)
    assert example["mask"].shape == (NUM_SLICES, 384, 384)
    np.testing.assert_array_equal(example["slice_labels"], scan.slice_labels)
    np.testing.assert_array_equal(example["labels"], scan.slice_labels.max(axis=0))
    assert int(example["fracture"]) == int(scan.fracture != "none")
    np.testing.assert_array_equal(example["slice_fracture"], scan.fracture_mask.any(axis=(1, 2)))
    assert set(np.unique(example["mask"]).tolist()) <= {0, 1}
    assert example["mask"].any() == bool(scan.mask.any())


def test_scans_resized_geometry(scans, phantoms):
  example = scans[GOOD_STEMS.index("053")]
  volume = phantoms["053"].volume
  scale = dummy.SHAPE[1] / 384
  np.testing.assert_allclose(
      example["spacing"], [volume.spacing[0], volume.spacing[1] * scale,
                           volume.spacing[2] * scale], rtol=1e-5)
  np.testing.assert_allclose(example["affine"][:3, 0], volume.affine[:3, 0], atol=1e-3)
  np.testing.assert_allclose(example["affine"][:3, 1:3], volume.affine[:3, 1:3] * scale, atol=1e-4)
  np.testing.assert_array_equal(example["slice_numbers"], np.arange(NUM_SLICES, 0, -1))


def test_dummy_data_up_to_date(tmp_path):
  written = dummy.write_release(tmp_path)
  names = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
  committed = sorted(p.relative_to(RELEASE) for p in RELEASE.rglob("*") if p.is_file())
  assert names == committed
  for name in names:
    assert (written / name).read_bytes() == (RELEASE / name).read_bytes(), name


# --- parsing rules ---------------------------------------------------------------


HEADER = ",".join(dummy.DIAGNOSIS_HEADER)


def _write_csv(path, lines, encoding="utf-8-sig"):
  path.write_text("\n".join(lines) + "\n", encoding=encoding)
  return path


def test_diagnosis_csv_bom_and_order(tmp_path):
  path = _write_csv(tmp_path / "d.csv", [HEADER, "73,1,1,0,0,0,0,0,1", "73,2,0,0,0,1,1,0,0"])
  assert path.read_bytes().startswith(b"\xef\xbb\xbfPatientNumber")
  report = common.BuildReport("test")
  rows = pct.read_diagnosis_csv(path, report)[73].rows
  # Label order: any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural.
  assert rows[1].labels == (1, 0, 0, 1, 0, 0)
  assert rows[1].fracture == 1
  assert rows[2].labels == (1, 1, 0, 0, 0, 1)
  assert not report.entries


def test_diagnosis_csv_any_disagreement(tmp_path):
  path = _write_csv(tmp_path / "d.csv", [HEADER, "73,1,0,0,0,0,0,0,0", "73,2,1,0,0,0,0,1,0"])
  rows = pct.read_diagnosis_csv(path, common.BuildReport("test"))[73].rows
  assert rows[1].labels[0] == 1
  assert rows[1].any_disagrees
  assert rows[2].labels[0] == 0
  assert rows[2].any_disagrees


def test_diagnosis_csv_repeats_and_conflicts(tmp_path):
  lines = [HEADER, "5,1,0,0,0,0,0,1,0", "5,1,0,0,0,0,0,1,0", "6,1,0,0,0,0,0,1,0",
           "6,1,1,0,0,0,0,0,0", "7,1,0,0,2,0,0,1,0", "x,1,0,0,0,0,0,1,0"]
  report = common.BuildReport("test")
  patients = pct.read_diagnosis_csv(_write_csv(tmp_path / "d.csv", lines), report)
  assert patients[5].problems == []
  assert "listed twice with different labels" in patients[6].problems[0]
  assert "Subarachnoid is '2'" in patients[7].problems[0]
  assert report.counts() == {"repeated CSV row": 1, "invalid CSV row": 1}


def test_diagnosis_csv_missing_column(tmp_path):
  path = _write_csv(tmp_path / "d.csv", ["PatientNumber,SliceNumber,Epidural", "1,1,0"])
  with pytest.raises(pct.ReleaseLayoutError, match="No_Hemorrhage"):
    pct.read_diagnosis_csv(path, common.BuildReport("test"))


def test_slice_numbers_must_fit():
  pct.check_slice_numbers([3, 1, 2], 3, pathlib.Path("a.nii"))
  with pytest.raises(pct.SliceNumberError, match="look 0-based"):
    pct.check_slice_numbers([0, 1, 2], 3, pathlib.Path("a.nii"))
  with pytest.raises(pct.SliceNumberError, match=r"SliceNumber 1-2, 4 for a.nii, which has 4"):
    pct.check_slice_numbers([1, 2, 4], 4, pathlib.Path("a.nii"))


def test_stored_slice_indices_flipped_file():
  path = RELEASE / "ct_scans" / "053.nii"
  assert nibabel.aff2axcodes(nibabel.load(path).affine)[2] == "I"
  volume = ct.read_nifti(path)
  np.testing.assert_array_equal(
      pct.stored_slice_indices(path, volume), np.arange(NUM_SLICES)[::-1]
  )
  path = RELEASE / "ct_scans" / "049.nii"
  np.testing.assert_array_equal(
      pct.stored_slice_indices(path, ct.read_nifti(path)), np.arange(NUM_SLICES)
  )


def test_stored_slice_indices_rejects_sagittal_stack(tmp_path):
  # A file whose third axis runs left-right: its SliceNumbers are not axial slices.
  affine = np.diag([1.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]
  path = tmp_path / "001.nii"
  nibabel.save(nibabel.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine), str(path))
  with pytest.raises(ct.CTReadError, match="not the axial slice axis"):
    pct.stored_slice_indices(path, ct.read_nifti(path))


def test_binary_mask_stored_0_1(tmp_path):
  ct_path = RELEASE / "ct_scans" / "049.nii"
  volume = ct.read_nifti(ct_path)
  stored = ct.read_nifti(RELEASE / "masks" / "049.nii")
  mask_path = ct.write_nifti(volume, tmp_path / "049.nii", mask=(stored.hu > 0).astype(np.uint8))
  binary = pct.read_binary_mask(mask_path, ct_path, volume)
  assert binary.stored_values == (0.0, 1.0)
  assert binary.geometry_note is None
  np.testing.assert_array_equal(binary.mask, stored.hu > 0)


def test_binary_mask_other_affine(tmp_path):
  ct_path = RELEASE / "ct_scans" / "053.nii"
  volume = ct.read_nifti(ct_path)
  raw = nibabel.load(RELEASE / "masks" / "053.nii")
  # The same voxels with an identity affine, as a mask tool might save them.
  path = tmp_path / "053.nii"
  nibabel.save(nibabel.Nifti1Image(np.asarray(raw.dataobj), np.eye(4)), str(path))
  binary = pct.read_binary_mask(path, ct_path, volume)
  assert "mask read on the CT's voxel grid" in binary.geometry_note
  expected = ct.read_nifti(RELEASE / "masks" / "053.nii").hu > 0
  np.testing.assert_array_equal(binary.mask, expected)


def test_binary_mask_flipped_reoriented(tmp_path):
  ct_path = RELEASE / "ct_scans" / "053.nii"
  volume = ct.read_nifti(ct_path)
  raw = nibabel.load(RELEASE / "masks" / "053.nii")
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1, raw.shape[0] - 1
  path = tmp_path / "053.nii"
  data = np.ascontiguousarray(np.asarray(raw.dataobj)[::-1])
  nibabel.save(nibabel.Nifti1Image(data, raw.affine @ flip), str(path))
  binary = pct.read_binary_mask(path, ct_path, volume)
  # Read with its own affine, the flipped mask lands on the CT's grid.
  assert binary.geometry_note is None
  expected = ct.read_nifti(RELEASE / "masks" / "053.nii").hu > 0
  np.testing.assert_array_equal(binary.mask, expected)


def test_non_finite_voxels_noted(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(dummy.DUMMY_DIR, manual)
  ct_path = manual / dummy.RELEASE_FOLDER / "ct_scans" / "049.nii"
  raw = nibabel.load(ct_path)
  data = np.asarray(raw.get_fdata(), np.float32)
  data[0, 0, 0], data[1, 0, 0], data[2, 0, 0] = np.nan, np.inf, -np.inf
  nibabel.save(nibabel.Nifti1Image(data, raw.affine), str(ct_path))
  report = common.BuildReport("test")
  labels = pct.read_diagnosis_csv(RELEASE / pct.DIAGNOSIS_CSV, report)[49]
  candidate = pct.Candidate(49, ct_path, RELEASE / "masks" / "049.nii", labels, None)
  pct.read_scan(candidate, SIZE, report)
  notes = [entry for entry in report.entries if entry.path == str(ct_path)]
  assert [entry.reason for entry in notes] == ["non-finite voxels set to air: 3"]
  assert notes[0].kept


def test_inconsistencies_noted():
  report = common.BuildReport("test")
  labels = pct.read_diagnosis_csv(RELEASE / pct.DIAGNOSIS_CSV, report)[49]
  # Slice 2 of 049 has no blood; call it hemorrhage without a subtype.
  labels.rows[2] = pct.SliceRow((1, 0, 0, 0, 0, 0), 0, any_disagrees=True)
  demographics = pct.Demographics(35.0, "Male", frozenset({"subdural"}))
  candidate = pct.Candidate(49, RELEASE / "ct_scans" / "049.nii", RELEASE / "masks" / "049.nii",
                            labels, demographics)
  pct.read_scan(candidate, SIZE, report)
  reasons = [entry.reason for entry in report.entries]
  assert all(entry.kept for entry in report.entries)
  assert any(r.startswith("No_Hemorrhage disagrees") and "SliceNumber 2 " in r for r in reasons)
  assert any(r.startswith("mask and labels disagree: SliceNumber 2 ") for r in reasons)
  assert any(r.startswith("demographics disagree") for r in reasons)


def test_demographics_two_row_header():
  report = common.BuildReport("test")
  path = common.find_file_ignoring_case(RELEASE, "patient_demographics.csv")
  assert path.name == "Patient_demographics.csv"
  people = pct.read_demographics(path, report)
  assert sorted(people) == [p.number for p in dummy.PATIENTS]
  assert people[53] == pct.Demographics(40.0, "Female", frozenset({"epidural", "subdural"}))
  assert people[66].subtypes == frozenset()
  assert not report.entries


def test_scan_file_names(tmp_path):
  for name in ("049.nii", "50.nii.gz", "051.nii", "51.NII", "notes.txt"):
    (tmp_path / name).write_bytes(b"")
  report = common.BuildReport("test")
  files = pct.list_scan_files(tmp_path, report)
  assert {number: path.name for number, path in files.items()} == {49: "049.nii", 50: "50.nii.gz"}
  assert report.counts() == {"unexpected file name": 1, "several files for one patient": 2}


def test_release_root_flat_or_nested(tmp_path):
  assert pct.find_release_root(dummy.DUMMY_DIR) == RELEASE
  assert pct.find_release_root(RELEASE) == RELEASE
  with pytest.raises(common.ReleaseNotFoundError, match="no ct_scans/ folder"):
    pct.find_release_root(tmp_path)
  for name in ("a", "b"):
    (tmp_path / name / "ct_scans").mkdir(parents=True)
  with pytest.raises(pct.ReleaseLayoutError, match="several releases"):
    pct.find_release_root(tmp_path)


def test_missing_files_reported(tmp_path):
  release = tmp_path / "release"
  shutil.copytree(RELEASE, release)
  (release / "masks" / "066.nii").unlink()
  (release / "Patient_demographics.csv").unlink()
  (release / "ct_scans" / "049.nii").rename(release / "ct_scans" / "120.nii")
  report = common.BuildReport("test")
  candidates, numbers = pct.find_candidates(release, report)
  assert [c.number for c in candidates] == [53, 71, 97]
  assert numbers == [49, 53, 66, 71, 97, 120]
  assert report.counts() == {
      "missing demographics file": 1,
      "missing CT file": 1,
      "no slice labels": 1,
      "missing mask": 1,
      "mask without a CT file": 1,
  }
