"""The bhsd builder on dummy data in the BHSD / MBH-Seg 2025 layouts, and its parsing rules."""

import collections
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import clinical, ct
from uem_ich_jax.datasets import build, common
from uem_ich_jax.datasets.bhsd import bhsd_dataset_builder as bhsd
from uem_ich_jax.datasets.bhsd import make_dummy_data as dummy
from uem_ich_jax.datasets.common import BuildReport, fold_ranges
from uem_ich_jax.errors import InputError

DUMMY_DIR = dummy.DUMMY_DIR
SIZE = 64
NUM_FOLDS = 3
# E is left out: the CSV calls it positive but its only label volume is empty.
BUILT_VOXEL_CASES = tuple(c for c in dummy.VOXEL_CASES_IN_ORDER if c != dummy.CASE_E)


def _build(data_dir, layout, manual_dir=DUMMY_DIR):
  config = bhsd.BhsdConfig(
      name=f"{layout}_tiny", layout=layout, image_size=SIZE, num_folds=NUM_FOLDS
  )
  builder = bhsd.Bhsd(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), bhsd.SLICES)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), bhsd.SCANS)


@pytest.fixture(scope="module")
def case_scans(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), bhsd.CASE_SCANS)


def _scan_by_id(source, case_id):
  for index in range(len(source)):
    if source[index]["scan_id"].decode() == case_id:
      return source[index]
  raise AssertionError(f"{case_id} not in the built dataset")


def _read_rater(case_id, name):
  folder = DUMMY_DIR / "MBH_Train_2025_voxel-label" / case_id
  _, mask = ct.read_nifti_pair(folder / "image.nii.gz", folder / name)
  return mask


# ---------------------------------------------------------------------------
# Builds of the dummy data


def test_slices_order_and_count(slices):
  assert len(slices) == len(BUILT_VOXEL_CASES) * dummy.NUM_SLICES
  for index in range(len(slices)):
    example = slices[index]
    case_id = BUILT_VOXEL_CASES[index // dummy.NUM_SLICES]
    assert example["scan_id"].decode() == case_id
    assert int(example["slice_index"]) == index % dummy.NUM_SLICES
    assert example["image"].shape == (SIZE, SIZE, 3)
    assert example["mask"].shape == (SIZE, SIZE)


def test_slice_labels_follow_mask(slices):
  positives = 0
  for index in range(len(slices)):
    example = slices[index]
    mask, labels = example["mask"], example["labels"]
    assert labels[0] == int((mask > 0).any())
    for name, class_id in uem_ich_jax.MASK_CLASS_IDS.items():
      assert labels[uem_ich_jax.SLICE_LABELS.index(name)] == int((mask == class_id).any())
    positives += int(labels[0])
  assert positives > 0


def test_single_rater_mask_and_image(slices):
  # Case A: one ground truth, stored unchanged; HU windowed from the int16 file.
  scan = dummy.make_phantom(dummy.CASE_A)
  start = BUILT_VOXEL_CASES.index(dummy.CASE_A) * dummy.NUM_SLICES
  for slice_index in range(dummy.NUM_SLICES):
    example = slices[start + slice_index]
    np.testing.assert_array_equal(example["mask"], scan.mask[slice_index])
    expected = ct.windows_uint8(np.rint(scan.volume.hu[slice_index]))
    np.testing.assert_array_equal(example["image"], expected)


def test_padded_case_geometry(slices):
  # Case C is 56 x 64: four air rows are added above and below.
  scan = dummy.make_phantom(dummy.CASE_C)
  start = BUILT_VOXEL_CASES.index(dummy.CASE_C) * dummy.NUM_SLICES
  example = slices[start + 5]
  np.testing.assert_array_equal(
      example["image"][4:60], ct.windows_uint8(np.rint(scan.volume.hu[5]))
  )
  np.testing.assert_array_equal(example["image"][:4], ct.windows_uint8(np.full((4, SIZE), -1024.0)))
  expected = np.asarray(scan.volume.affine, np.float64).copy()
  expected[:3, 3] -= 4 * expected[:3, 1]
  np.testing.assert_allclose(example["affine"], expected, atol=1e-3)


def test_orientation_and_spacing(scans):
  for index in range(len(scans)):
    example = scans[index]
    np.testing.assert_allclose(example["spacing"], dummy.SPACING_MM, rtol=1e-5)
    affine = example["affine"]
    # Slices toward Superior (+z), rows toward Posterior (+y), columns toward
    # the patient's Left (+x): the LPS layout of an axial DICOM.
    assert affine[2, 0] > 0
    assert affine[1, 1] > 0
    assert affine[0, 2] > 0


def test_rater_tie_rule(scans):
  first = _read_rater(dummy.CASE_D, "label_annot_1.nii.gz")
  third = _read_rater(dummy.CASE_D, "label_annot_3.nii.gz")
  merged = _scan_by_id(scans, dummy.CASE_D)["mask"]
  # Two raters: every disagreement is a tie. Blood beats background, and
  # between blood classes the one with more voxels in the case wins, which in
  # case D is always the first rater's class.
  np.testing.assert_array_equal(merged, np.where(first > 0, first, third))
  lower_wins = (first == 2) & (third == 3)
  higher_wins = (first == 5) & (third == 4)
  blood_over_background = (first == 0) & (third == 4)
  assert lower_wins.any()
  assert higher_wins.any()
  assert blood_over_background.any()
  assert (merged[lower_wins] == 2).all()
  assert (merged[higher_wins] == 5).all()
  assert (merged[blood_over_background] == 4).all()
  assert int(_scan_by_id(scans, dummy.CASE_D)["num_raters"]) == 2


def test_scan_labels_from_csv_else_mask(scans):
  for index in range(len(scans)):
    example = scans[index]
    from_mask = example["slice_labels"].max(axis=0)
    if example["scan_id"].decode() == dummy.CASE_A:
      # The CSV row adds subarachnoid; the CSV is kept, the mask shows none.
      assert example["labels"].tolist() == [1, 0, 1, 0, 1, 1]
      assert from_mask.tolist() == [1, 0, 1, 0, 0, 1]
    else:
      np.testing.assert_array_equal(example["labels"], from_mask)
  assert _scan_by_id(scans, dummy.CASE_C)["labels"].tolist() == [0] * 6


def test_hematoma_ml_from_native_mask(scans):
  for case_id in (dummy.CASE_A, dummy.CASE_B, dummy.CASE_H):
    scan = dummy.make_phantom(case_id)
    volumes = clinical.hematoma_ml(scan.mask, scan.volume)
    expected = [volumes[name] for name in uem_ich_jax.SUBTYPES]
    np.testing.assert_allclose(
        _scan_by_id(scans, case_id)["hematoma_ml"], expected, rtol=1e-4, atol=1e-6
    )
  assert _scan_by_id(scans, dummy.CASE_A)["hematoma_ml"][1] > 0


def test_ids_source_and_official_split(scans):
  example = _scan_by_id(scans, dummy.CASE_B)
  assert example["patient_id"].decode() == "ID_0a1b2c3d"
  assert example["source"].decode() == bhsd.SOURCE_BHSD
  assert example["official_split"].decode() == "test"
  assert _scan_by_id(scans, dummy.CASE_A)["official_split"].decode() == "training"
  assert _scan_by_id(scans, dummy.CASE_C)["official_split"].decode() == ""
  assert _scan_by_id(scans, dummy.CASE_H)["source"].decode() == bhsd.SOURCE_MBH_VAL


def test_folds_keep_patients_together(slices):
  folds_of_patient = collections.defaultdict(set)
  for index in range(len(slices)):
    folds_of_patient[slices[index]["patient_id"]].add(int(slices[index]["fold"]))
  assert all(len(folds) == 1 for folds in folds_of_patient.values())
  assert len(folds_of_patient) == 4  # A and B share patient ID_0a1b2c3d.
  metadata = dict(slices.dataset_info.metadata.items())
  assert metadata["num_folds"] == NUM_FOLDS
  stored = [int(slices[index]["fold"]) for index in range(len(slices))]
  assert metadata["fold_ranges"]["train"] == fold_ranges(stored)


def test_bad_files_in_metadata(slices):
  metadata = dict(slices.dataset_info.metadata.items())
  bad = metadata["bad_files"]
  entries = {(pathlib.Path(e["path"]).name, e["reason"].split(":")[0], e["kept"])
             for e in bad["files"]}
  assert ("image.nii.gz", "all-zero label for a positive case", False) in entries
  assert ("label_annot_2.nii.gz", "all-zero rater label for a positive case", True) in entries
  assert ("notes.txt", "unexpected file in a case folder", False) in entries
  assert (dummy.CASE_B, "file name without .nii/.nii.gz suffix", True) in entries
  assert ("label_annot_3.nii.gz", "label affine differs from the image's", True) in entries
  assert (f"{dummy.CASE_A}.nii.gz", "CSV labels differ from the mask", True) in entries
  assert bad["skipped"] == 2
  assert metadata["class_map"] == {str(i): i for i in range(6)}
  assert metadata["class_map_source"] == "dataset.json"
  assert metadata["num_mask_classes"] == 6


def test_case_scans_labels(case_scans):
  assert [case_scans[i]["scan_id"].decode() for i in range(len(case_scans))] == list(
      dummy.CASE_LEVEL_IN_ORDER
  )
  expected = {
      dummy.CASE_A: ([1, 0, 1, 0, 1, 1], True),
      dummy.CASE_E: ([1, 0, 0, 0, 0, 1], True),
      dummy.CASE_F: ([1, 0, 0, 1, 0, 0], True),
      dummy.CASE_G: ([0] * 6, False),
  }
  for index in range(len(case_scans)):
    example = case_scans[index]
    labels, in_csv = expected[example["scan_id"].decode()]
    assert example["labels"].tolist() == labels
    assert bool(example["in_csv"]) == in_csv
    assert example["image"].shape == (dummy.NUM_SLICES, SIZE, SIZE, 3)
    assert "mask" not in example


def test_build_command_default_size(tmp_path):
  built = build.build_dataset(
      "bhsd", data_dir=str(tmp_path), manual_dir=str(DUMMY_DIR), config="case_scans"
  )
  assert built[0].num_examples == {"train": 4}
  source = tfds.data_source("bhsd/case_scans", split="train", data_dir=str(tmp_path))
  example = source[0]
  assert example["image"].shape == (dummy.NUM_SLICES, 384, 384, 3)
  np.testing.assert_allclose(example["spacing"][1:], 3.6 * SIZE / 384, rtol=1e-5)


def test_unknown_class_name_fails_build(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(DUMMY_DIR, manual)
  document = json.loads((manual / "dataset.json").read_text())
  document["labels"]["3"] = "hydrocephalus"
  (manual / "dataset.json").write_text(json.dumps(document))
  with pytest.raises(bhsd.ClassMapError, match="hydrocephalus"):
    _build(tmp_path / "tfds", bhsd.SCANS, manual)


def _manual_copy(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(DUMMY_DIR, manual)
  return manual


def _bad_files(source):
  return {e["path"]: e for e in source.dataset_info.metadata["bad_files"]["files"]}


def _set_csv_row(manual, case_id, values):
  path = manual / "MBH_Train_2025_case-label" / "case-wise_annotation.csv"
  lines = path.read_text().splitlines()
  header = lines[0].split(",")
  for index, line in enumerate(lines):
    if line.split(",")[0] == case_id:
      row = dict(zip(header, line.split(",")))
      row.update(values)
      lines[index] = ",".join(row[name] for name in header)
  path.write_text("\n".join(lines) + "\n")


def test_case_scans_leave_out_rejected_row(tmp_path):
  # `any` = 1 with no subtype: the volume must not be written as negative.
  manual = _manual_copy(tmp_path)
  _set_csv_row(manual, dummy.CASE_F, {name: "0" for name in uem_ich_jax.SUBTYPES})
  source = _build(tmp_path / "tfds", bhsd.CASE_SCANS, manual)
  written = [source[i]["scan_id"].decode() for i in range(len(source))]
  assert dummy.CASE_F not in written
  assert len(written) == len(dummy.CASE_LEVEL_IN_ORDER) - 1
  volume = manual / "MBH_Train_2025_case-label" / f"{dummy.CASE_F}.nii.gz"
  entry = _bad_files(source)[str(volume)]
  assert not entry["kept"]
  assert entry["reason"].startswith("unusable row in case-wise_annotation.csv")


def test_voxel_case_with_invalid_row_left_out(tmp_path):
  manual = _manual_copy(tmp_path)
  _set_csv_row(manual, dummy.CASE_A, {"any": "yes"})
  source = _build(tmp_path / "tfds", bhsd.SCANS, manual)
  written = [source[i]["scan_id"].decode() for i in range(len(source))]
  assert dummy.CASE_A not in written
  assert len(written) == len(BUILT_VOXEL_CASES) - 1
  reasons = [e["reason"] for e in _bad_files(source).values()]
  assert "invalid CSV label: line 2: column any is 'yes', expected 0 or 1" in reasons


def test_flipped_label_volume_reoriented(tmp_path):
  import nibabel  # pylint: disable=import-outside-toplevel

  manual = _manual_copy(tmp_path)
  label_path = manual / "label_192" / "ground truths" / f"{dummy.CASE_A}.nii.gz"
  stored = nibabel.load(label_path)
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1, stored.shape[0] - 1
  flipped = nibabel.Nifti1Image(
      np.ascontiguousarray(np.asarray(stored.dataobj)[::-1]), stored.affine @ flip
  )
  nibabel.save(flipped, label_path)
  source = _build(tmp_path / "tfds", bhsd.SCANS, manual)
  example = _scan_by_id(source, dummy.CASE_A)
  np.testing.assert_array_equal(example["mask"], dummy.make_phantom(dummy.CASE_A).mask)
  entry = _bad_files(source)[str(label_path)]
  assert entry["kept"]
  assert "reoriented by its affine" in entry["reason"]


def test_non_finite_voxels_noted(tmp_path):
  import nibabel  # pylint: disable=import-outside-toplevel

  manual = _manual_copy(tmp_path)
  image_path = manual / "MBH_Train_2025_case-label" / f"{dummy.CASE_G}.nii.gz"
  stored = nibabel.load(image_path)
  data = np.asarray(stored.get_fdata(), np.float32)
  data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
  nibabel.save(nibabel.Nifti1Image(data, stored.affine), image_path)
  source = _build(tmp_path / "tfds", bhsd.CASE_SCANS, manual)
  entry = _bad_files(source)[str(image_path)]
  assert entry["kept"]
  assert entry["reason"] == "non-finite voxels set to air: 2"


# ---------------------------------------------------------------------------
# Parsing rules


def test_case_name_patient_token():
  assert bhsd.parse_case_name("ID_1a2b3c4d_ID_5e6f7a8b9c") == ("ID_1a2b3c4d", "ID_5e6f7a8b9c")
  for name in ("1a2b3c4d_ID_5e6f7a8b9c", "ID_1a2b3c4d", "ID_1a2b3c4d_ID_5e6f_x", "ID_zz_ID_00"):
    with pytest.raises(ValueError, match="ID_<patient hex>"):
      bhsd.parse_case_name(name)


def test_nifti_suffix_variants():
  assert common.split_nifti_suffix("ID_a_ID_b.nii.gz") == ("ID_a_ID_b", True)
  assert common.split_nifti_suffix("ID_a_ID_b.nii") == ("ID_a_ID_b", True)
  assert common.split_nifti_suffix("ID_a_ID_b") == ("ID_a_ID_b", False)
  assert common.split_nifti_suffix("ID_a_ID_b.gz") == ("ID_a_ID_b.gz", False)


def test_class_map_by_name_not_order():
  # The order another repository claims (1 SDH, 2 EDH, 3 IPH, 4 SAH, 5 IVH).
  claimed = {"0": "background", "1": "subdural", "2": "epidural", "3": "intraparenchymal",
             "4": "subarachnoid", "5": "intraventricular"}
  assert bhsd.parse_class_map(claimed, "test") == {0: 0, 1: 5, 2: 1, 3: 2, 4: 4, 5: 3}
  nnunet = {"background": 0, "EDH": 1, "IPH": 2, "IVH": 3, "SAH": 4, "SDH": 5}
  assert bhsd.parse_class_map(nnunet, "test") == {i: i for i in range(6)}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({**bhsd.BUILTIN_LABELS, "3": "hygroma"}, "unknown class name 'hygroma'"),
        ({**bhsd.BUILTIN_LABELS, "3": "subdural"}, "both name class"),
        ({k: v for k, v in bhsd.BUILTIN_LABELS.items() if k != "4"}, "no entry for subarachnoid"),
        ({**bhsd.BUILTIN_LABELS, "6": "ICH"}, "unknown class name 'ICH'"),
        ({"background": "zero", "EDH": 1}, "no integer class id"),
    ],
)
def test_class_map_rejects(labels, message):
  with pytest.raises(bhsd.ClassMapError, match=message):
    bhsd.parse_class_map(labels, "test")


def test_permuted_map_remaps_mask():
  claimed = {"0": "background", "1": "subdural", "2": "epidural", "3": "intraparenchymal",
             "4": "subarachnoid", "5": "intraventricular"}
  lookup = bhsd.class_lookup(bhsd.parse_class_map(claimed, "test"))
  case = bhsd.find_voxel_cases(DUMMY_DIR, BuildReport("test"))
  case_a = next(c for c in case if c.case_id == dummy.CASE_A)
  read = bhsd.read_voxel_case(case_a, lookup, None, SIZE, BuildReport("test"))
  raw = dummy.make_phantom(dummy.CASE_A).mask
  # Release id 2 (IPH in BHSD) now means epidural (1), 5 means IVH (3).
  np.testing.assert_array_equal(read.mask, lookup[raw])
  assert set(np.unique(read.mask).tolist()) == {0, 1, 3}


def test_release_info_without_dataset_json(tmp_path):
  info = bhsd.read_release_info(tmp_path)
  assert info.class_map == {i: i for i in range(6)}
  assert info.class_map_source.startswith("built-in")
  assert info.official_split == {}


def test_release_info_conflicting_files(tmp_path):
  (tmp_path / "label_192").mkdir()
  (tmp_path / "dataset.json").write_text(json.dumps({"labels": bhsd.BUILTIN_LABELS}))
  swapped = {**bhsd.BUILTIN_LABELS, "1": "subdural", "5": "epidural"}
  (tmp_path / "label_192" / "dataset.json").write_text(json.dumps({"labels": swapped}))
  with pytest.raises(bhsd.ClassMapError, match="different label maps"):
    bhsd.read_release_info(tmp_path)


def _write_csv(path, text):
  path.write_bytes(text.encode("utf-8"))
  return path


def test_case_csv_quirks(tmp_path):
  path = _write_csv(
      tmp_path / "labels.csv",
      "\ufeff patientID_studyID , subdural,any,epidural,intraparenchymal,intraventricular,"
      "subarachnoid\n"
      "ID_aa_ID_bb,1,1,0,0,0,0\n"
      "ID_aa_ID_bb,1,1,0,0,0,0\n"
      "ID_cc_ID_dd.nii.gz,0.0,1.0,1,0,0,0\n"
      "\n",
  )
  labels = bhsd.read_case_labels(path).labels
  assert labels["ID_aa_ID_bb"].tolist() == [1, 0, 0, 0, 0, 1]
  assert labels["ID_cc_ID_dd"].tolist() == [1, 1, 0, 0, 0, 0]
  assert len(labels) == 2


def test_case_csv_any_mismatch_reported(tmp_path):
  header = "patientID_studyID,any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural\n"
  path = _write_csv(tmp_path / "labels.csv", header + "ID_aa_ID_bb,0,1,0,0,0,0\n")
  report = BuildReport("test")
  read = bhsd.read_case_labels(path, report)
  assert read.labels == {}
  assert read.rejected == {"ID_aa_ID_bb"}
  assert report.counts() == {"CSV any differs from its subtypes": 1}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("ID_aa_ID_bb,1,0,1,0,0,0\nID_aa_ID_bb,1,0,0,0,0,1\n", "conflicting CSV rows: line 3"),
        ("ID_aa_ID_bb,1,0,2,0,0,0\n", "invalid CSV label: line 2: column intraparenchymal is '2'"),
        ("ID_aa_ID_bb,yes,0,1,0,0,0\n", "column any is 'yes', expected 0 or 1"),
        ("ID_aa_ID_bb,1,0,1\n", "4 fields, the header has 7"),
    ],
)
def test_case_csv_bad_row_rejects_case_only(tmp_path, rows, message):
  header = "patientID_studyID,any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural\n"
  path = _write_csv(tmp_path / "labels.csv", header + rows + "ID_cc_ID_dd,1,1,0,0,0,0\n")
  report = BuildReport("test")
  read = bhsd.read_case_labels(path, report)
  assert read.rejected == {"ID_aa_ID_bb"}
  assert list(read.labels) == ["ID_cc_ID_dd"]
  (entry,) = report.entries
  assert entry.path.endswith("#ID_aa_ID_bb")
  assert message in entry.reason


def test_case_csv_missing_column(tmp_path):
  path = _write_csv(tmp_path / "labels.csv", "patientID_studyID,any,epidural\nID_a_ID_b,0,0\n")
  with pytest.raises(bhsd.CaseLabelError, match="missing columns intraparenchymal"):
    bhsd.read_case_labels(path)


def test_layout_variants(tmp_path):
  # `ground_truths` for the BHSD label folder and `MBH_Val_2025_voxel-label`
  # for the validation folder are found like the release names.
  shutil.copytree(DUMMY_DIR / "label_192", tmp_path / "label_192")
  (tmp_path / "label_192" / "ground truths").rename(tmp_path / "label_192" / "ground_truths")
  shutil.copytree(DUMMY_DIR / "MBH_val_label_2025", tmp_path / "MBH_Val_2025_voxel-label")
  report = BuildReport("test")
  cases = bhsd.find_voxel_cases(tmp_path, report)
  assert [c.case_id for c in cases] == [dummy.CASE_H, dummy.CASE_A, dummy.CASE_B, dummy.CASE_C]
  assert [c.source for c in cases] == [bhsd.SOURCE_MBH_VAL] + [bhsd.SOURCE_BHSD] * 3


def test_duplicate_case_prefers_mbh(tmp_path):
  shutil.copytree(DUMMY_DIR / "label_192", tmp_path / "label_192")
  case_dir = tmp_path / "MBH_Train_2025_voxel-label" / dummy.CASE_A
  case_dir.mkdir(parents=True)
  shutil.copy(tmp_path / "label_192" / "images" / f"{dummy.CASE_A}.nii.gz", case_dir / "image.nii.gz")
  shutil.copy(
      tmp_path / "label_192" / "ground truths" / f"{dummy.CASE_A}.nii.gz",
      case_dir / "label_annot_1.nii.gz",
  )
  report = BuildReport("test")
  cases = bhsd.find_voxel_cases(tmp_path, report)
  sources = {c.case_id: c.source for c in cases}
  assert sources[dummy.CASE_A] == bhsd.SOURCE_MBH_TRAIN
  assert report.counts()["duplicate case"] == 1


# ---------------------------------------------------------------------------
# Rater merge


def _masks(*rows):
  return [np.asarray(row, np.uint8).reshape(1, 1, -1) for row in rows]


def test_merge_majority_of_three():
  merged = bhsd.merge_raters(_masks([2, 0, 5, 0], [2, 3, 5, 0], [4, 3, 0, 1]))
  assert merged.ravel().tolist() == [2, 3, 5, 0]


def test_merge_blood_beats_background():
  merged = bhsd.merge_raters(_masks([0, 4, 0], [1, 0, 0]))
  assert merged.ravel().tolist() == [1, 4, 0]


def test_merge_blood_tie_by_case_volume():
  # Class 5 has more voxels over both raters than class 2, so the disputed
  # voxel goes to 5; with the volumes swapped it goes to 2.
  merged = bhsd.merge_raters(_masks([5, 5, 5, 2], [5, 5, 5, 5]))
  assert merged.ravel()[3] == 5
  merged = bhsd.merge_raters(_masks([2, 2, 2, 5], [2, 2, 2, 2]))
  assert merged.ravel()[3] == 2


def test_merge_equal_volume_lower_id():
  merged = bhsd.merge_raters(_masks([3, 0, 4], [4, 0, 3]))
  assert merged.ravel().tolist() == [3, 0, 3]


def test_merge_three_way_tie_blood():
  # Background, 1 and 2 each get one vote: blood wins, then the larger class.
  merged = bhsd.merge_raters(_masks([0, 1, 1], [1, 2, 1], [2, 1, 1]))
  assert merged.ravel()[0] == 1


def test_merge_single_rater_unchanged():
  mask = np.random.default_rng(0).integers(0, 6, size=(3, 4, 5), dtype=np.uint8)
  np.testing.assert_array_equal(bhsd.merge_raters([mask]), mask)


def test_merge_rejects_shape_mismatch():
  with pytest.raises(ValueError, match="differ in shape"):
    bhsd.merge_raters([np.zeros((1, 2, 2), np.uint8), np.zeros((1, 2, 3), np.uint8)])


def test_patient_fold_same_in_every_config(slices, scans, case_scans):
  # CASE_A's patient is in the voxel-labelled and the case-level sets.
  folds_of = collections.defaultdict(set)
  for source in (slices, scans, case_scans):
    for index in range(len(source)):
      example = source[index]
      folds_of[example["patient_id"].decode()].add(int(example["fold"]))
  shared_patient = bhsd.parse_case_name(dummy.CASE_A)[0]
  assert len(folds_of[shared_patient]) == 1
  for patient, folds in folds_of.items():
    assert len(folds) == 1, patient
  found_cases = (*dummy.VOXEL_CASES_IN_ORDER, dummy.CASE_E, *dummy.CASE_LEVEL_IN_ORDER)
  expected = common.patient_folds([bhsd.parse_case_name(c)[0] for c in found_cases], NUM_FOLDS)
  assert {patient: folds.pop() for patient, folds in folds_of.items()} == {
      patient: expected[patient] for patient in folds_of
  }


def test_release_errors_are_input_errors():
  assert issubclass(bhsd.ClassMapError, InputError)
  assert issubclass(bhsd.CaseLabelError, InputError)
