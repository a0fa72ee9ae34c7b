"""The cq500 builder on dummy data in the CQ500 + BHX layout, and its parsing rules."""

import collections
import csv
import dataclasses
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import ct, phantom
from uem_ich_jax.datasets import build, common
from uem_ich_jax.datasets.cq500 import Cq500, Cq500Config, carry_box, source_slices
from uem_ich_jax.datasets.cq500 import make_dummy_data as dummy
from uem_ich_jax.datasets.cq500 import release
from uem_ich_jax.datasets.cq500.cq500_dataset_builder import BoxCarryError

DUMMY = dummy.DUMMY_DATA
SIZE = 64
NUM_FOLDS = 3
CASES = {case.number: case for case in dummy.CASES}
# Slices of each chosen series that the builder can read: case 57 loses its
# truncated last file.
STORED_SLICES = {0: 12, 12: 12, 57: 11}


def _build(data_dir, layout):
  config = Cq500Config(name=f"{layout}_{SIZE}", layout=layout, image_size=SIZE, num_folds=NUM_FOLDS)
  builder = Cq500(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(DUMMY)))
  return builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), "slices")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"), "scans")


def _metadata(source):
  return dict(source.dataset_info.metadata.items())


def _slices_of(source, number):
  name = release.case_id(number).encode()
  return [source[i] for i in range(len(source)) if source[i]["scan_id"] == name]


def _scan_of(source, number):
  (example,) = _slices_of(source, number)
  return example


def _reads_table():
  """reads.csv read with the csv module alone: case name to a (3, 14) array in column order."""
  with (DUMMY / "reads.csv").open(newline="") as file:
    rows = list(csv.DictReader(file))
  return {
      row["name"]: np.array(
          [[int(row[f"{reader}:{label}"]) for label in uem_ich_jax.CQ500_LABELS]
           for reader in ("R1", "R2", "R3")]
      )
      for row in rows
  }


def _rounded_phantom(case, series):
  """The phantom volume with HU as stored in DICOM (integers, air floor)."""
  volume = dummy.series_scan(case, series).volume
  hu = np.maximum(np.rint(volume.hu), ct.AIR_HU).astype(np.float32)
  return dataclasses.replace(volume, hu=hu)


# --- The built dataset -------------------------------------------------------


def test_slices_count_and_order(slices):
  assert len(slices) == sum(STORED_SLICES.values())
  scan_ids = [slices[i]["scan_id"] for i in range(len(slices))]
  expected = [release.case_id(n).encode() for n in (0, 12, 57) for _ in range(STORED_SLICES[n])]
  assert scan_ids == expected
  for number, count in STORED_SLICES.items():
    assert [int(e["slice_index"]) for e in _slices_of(slices, number)] == list(range(count))


def test_slice_features_shapes(slices):
  example = slices[0]
  assert example["image"].shape == (SIZE, SIZE, 3)
  assert example["image"].dtype == np.uint8
  assert "labels" not in example, "CQ500 has no slice labels"
  assert example["scan_labels"].shape == (6,)
  assert example["cq500_labels"].shape == (14,)
  assert example["boxes"].dtype == np.float32
  assert example["box_classes"].dtype == np.int32
  assert example["affine"].shape == (4, 4)


def _rejected_by_folder(choice):
  return {pathlib.PurePath(item["folder"]).name: item["reason"] for item in choice["rejected"]}


def test_series_choice_follows_rule(slices):
  choices = _metadata(slices)["series_choice"]
  for number, case in CASES.items():
    choice = choices[release.case_id(number)]
    assert choice["chosen"]["folder"].endswith(case.series[0].folder), number
    rejected = _rejected_by_folder(choice)
    assert set(rejected) == {series.folder for series in case.series[1:]}, number
  rejected_0 = _rejected_by_folder(choices["CQ500-CT-0"])
  assert rejected_0["CT BONE"].startswith("bone kernel: description")
  assert rejected_0["CT PLAIN THIN"].startswith("spacing 2.50 mm")
  rejected_12 = choices["CQ500-CT-12"]["rejected"]
  assert rejected_12[0]["reason"].startswith("contrast:")
  rejected_57 = _rejected_by_folder(choices["CQ500-CT-57"])
  assert rejected_57["CT 5mm"] == "bone kernel: ConvolutionKernel 'BONEPLUS'"
  assert choices["CQ500-CT-12"]["chosen"]["gantry_tilt_deg"] == pytest.approx(15.0, abs=0.01)


def test_labels_are_reader_majority(slices):
  table = _reads_table()
  for number in CASES:
    name = release.case_id(number)
    majority = (table[name].sum(axis=0) >= 2).astype(np.uint8)
    for example in _slices_of(slices, number):
      np.testing.assert_array_equal(example["cq500_labels"], majority, err_msg=name)
      by_name = dict(zip(uem_ich_jax.CQ500_LABELS, majority))
      expected = [by_name[finding] for finding in ("ICH", "EDH", "IPH", "IVH", "SAH", "SDH")]
      np.testing.assert_array_equal(example["scan_labels"], expected, err_msg=name)


def test_two_reader_flips_change_majority(slices):
  truth_0 = dummy.series_scan(CASES[0], CASES[0].series[0]).scan_labels
  example_0 = dict(zip(uem_ich_jax.CQ500_LABELS, _slices_of(slices, 0)[0]["cq500_labels"]))
  assert example_0["ChronicBleed"] == 1 - truth_0["ChronicBleed"]
  assert example_0["IVH"] == truth_0["IVH"], "one reader's flip must not change the majority"
  truth_57 = dummy.series_scan(CASES[57], CASES[57].series[0]).scan_labels
  example_57 = dict(zip(uem_ich_jax.CQ500_LABELS, _slices_of(slices, 57)[0]["cq500_labels"]))
  assert truth_57["ICH"] == 0
  assert example_57["ICH"] == 1


def test_image_windows_match_phantom(slices):
  for number in (0, 57):
    case = CASES[number]
    expected = ct.windows_uint8(_rounded_phantom(case, case.series[0]).hu)
    stored = np.stack([e["image"] for e in _slices_of(slices, number)])
    np.testing.assert_array_equal(stored, expected[: STORED_SLICES[number]], err_msg=str(number))
  image = _slices_of(slices, 0)[6]["image"]
  assert not np.array_equal(image[..., 0], image[..., 2])


def test_untilted_affine_is_phantom_affine(slices):
  phantom_volume = dummy.series_scan(CASES[0], CASES[0].series[0]).volume
  example = _slices_of(slices, 0)[0]
  np.testing.assert_allclose(example["affine"], phantom_volume.affine, atol=1e-4)
  np.testing.assert_allclose(example["spacing"], (5.0, dummy.PIXEL_MM, dummy.PIXEL_MM), rtol=1e-6)
  # LPS: a column step moves to the patient's left (+x), a row step to posterior (+y).
  assert example["affine"][0, 2] > 0
  assert example["affine"][1, 1] > 0


def test_tilted_scan_resliced_orthogonal(slices):
  case = CASES[12]
  source = _rounded_phantom(case, case.series[0])
  stored, _ = common.square_inplane(ct.correct_tilt(source), None, SIZE)
  examples = _slices_of(slices, 12)
  affine = examples[0]["affine"].astype(np.float64)
  normal = np.cross(affine[:3, 2], affine[:3, 1])
  normal /= np.linalg.norm(normal)
  slice_step = affine[:3, 0]
  assert np.linalg.norm(np.cross(slice_step, normal)) < 1e-4, "the stored affine is still tilted"
  assert abs(slice_step @ normal) == pytest.approx(5.0, abs=1e-4)
  # The shear widened the rows, so padding and resizing made the pixels larger.
  assert examples[0]["spacing"][1] > dummy.PIXEL_MM
  np.testing.assert_allclose(affine, stored.affine, atol=1e-3)
  images = np.stack([e["image"] for e in examples])
  levels = np.abs(images.astype(int) - ct.windows_uint8(stored.hu).astype(int))
  assert levels.max() <= 1


def test_sop_uids_join_slices(slices):
  for number, count in STORED_SLICES.items():
    case = CASES[number]
    expected = dummy.sop_uids(case, case.series[0])[:count]
    stored = [e["sop_instance_uid"].decode() for e in _slices_of(slices, number)]
    assert stored == expected, number


def test_untilted_boxes_are_manual_bhx(slices):
  scan = dummy.series_scan(CASES[0], CASES[0].series[0])
  examples = _slices_of(slices, 0)
  for index, example in enumerate(examples):
    # File 1 (manual) wins over file 2, whose copies are one pixel to the right.
    expected = scan.boxes[index].reshape(-1, 4)
    np.testing.assert_array_equal(example["boxes"], expected, err_msg=str(index))
    np.testing.assert_array_equal(example["box_classes"], scan.box_classes[index])
    assert example["boxes_known"]
  assert sum(len(e["boxes"]) for e in examples) > 0
  metadata = _metadata(slices)["bhx"]
  assert metadata["chronic_boxes_left_out"] == 1
  assert metadata["boxes_on_unread_slices"] == 1
  assert metadata["boxes_from:1_Initial_Manual_Labeling.csv"] == 2


def _carried_rectangle(scan, slice_index, box, corrected):
  """Paint one box into an empty mask, carry it like the image, and return its stored bounds."""
  painted = np.zeros(scan.mask.shape, np.uint8)
  row_min, column_min, row_max, column_max = box.astype(int)
  painted[slice_index, row_min:row_max, column_min:column_max] = 1
  carried = ct.resample_mask(painted, scan.volume, corrected)
  _, carried = common.square_inplane(corrected, carried, SIZE)
  rows, columns = np.nonzero(carried[slice_index])
  return np.array([rows.min(), columns.min(), rows.max() + 1, columns.max() + 1], np.float64)


def test_tilted_boxes_follow_resliced_pixels(slices):
  case = CASES[12]
  scan = dummy.series_scan(case, case.series[0])
  corrected = ct.correct_tilt(scan.volume)
  examples = _slices_of(slices, 12)
  compared = 0
  for index, example in enumerate(examples):
    assert example["boxes_known"]
    np.testing.assert_array_equal(example["box_classes"], scan.box_classes[index])
    for box, source_box in zip(example["boxes"], scan.boxes[index]):
      # Nearest-neighbour resampling moves a painted edge by under one pixel.
      expected = _carried_rectangle(scan, index, source_box, corrected)
      np.testing.assert_allclose(box, expected, atol=1.0)
      compared += 1
  assert compared >= 10
  # The shear moves the boxes: the source slices differ in their row shift.
  shifts = [e["boxes"][0, 0] - b[0, 0] for e, b in zip(examples, scan.boxes) if len(b)]
  assert np.ptp(shifts) > 1.0


def test_boxes_known_only_with_bhx(slices):
  for example in _slices_of(slices, 57):
    assert not example["boxes_known"]
    assert example["boxes"].shape == (0, 4)
  reasons = [entry["reason"] for entry in _metadata(slices)["bad_files"]["files"]]
  assert any(reason.startswith("no BHX boxes: ICH-positive") for reason in reasons)


def test_folds_keep_patients_together(slices):
  folds = collections.defaultdict(set)
  for index in range(len(slices)):
    folds[slices[index]["patient_id"]].add(int(slices[index]["fold"]))
  assert all(len(values) == 1 for values in folds.values())
  expected = common.patient_folds(
      [release.case_id(n) for n in (0, 12, 57, dummy.MISSING_CASE)], NUM_FOLDS
  )
  for patient, values in folds.items():
    assert values == {expected[patient.decode()]}


def test_metadata_fold_ranges_match_examples(slices):
  metadata = _metadata(slices)
  assert metadata["num_folds"] == NUM_FOLDS
  stored = [int(slices[i]["fold"]) for i in range(len(slices))]
  assert metadata["fold_ranges"]["train"] == common.fold_ranges(stored)


def test_bad_files_reported(slices):
  report = _metadata(slices)["bad_files"]
  entries = {
      (pathlib.PurePath(entry["path"].split(":")[0]).name, entry["reason"].split(":")[0])
      for entry in report["files"]
  }
  assert ("CT000011.dcm", "unreadable DICOM") in entries
  assert ("CT000012.dcm", "unreadable DICOM") in entries
  assert ("reads.csv", "no patient folder") in entries
  assert ("1_Initial_Manual_Labeling.csv", "invalid BHX box") in entries
  assert ("CT Plain", "BHX boxes on unread slices") in entries
  assert report["counts"]["unreadable DICOM"] == 2
  assert report["skipped"] == 4
  assert report["listed_all"]


def test_case_without_usable_series_skipped(slices, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(DUMMY, manual)
  case = CASES[12]
  shutil.rmtree(manual / case.series_folder(case.series[0]))
  config = Cq500Config(name="slices_skip", layout="slices", image_size=SIZE, num_folds=NUM_FOLDS)
  builder = Cq500(config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  source = builder.as_data_source(split="train")

  assert len(source) == STORED_SLICES[0] + STORED_SLICES[57]
  metadata = _metadata(source)
  assert metadata["series_choice"]["CQ500-CT-12"]["chosen"] is None
  reasons = {entry["reason"].split(":")[0] for entry in metadata["bad_files"]["files"]}
  assert "no usable series" in reasons
  # The other cases keep their folds, and the ranges describe what was written.
  folds = {e["patient_id"]: int(e["fold"]) for e in (source[i] for i in range(len(source)))}
  full = {e["patient_id"]: int(e["fold"]) for e in (slices[i] for i in range(len(slices)))}
  assert folds == {patient: full[patient] for patient in folds}
  stored = [int(source[i]["fold"]) for i in range(len(source))]
  assert metadata["fold_ranges"]["train"] == common.fold_ranges(stored)


def test_scans_layout(scans):
  assert len(scans) == len(CASES)
  table = _reads_table()
  for number, case in CASES.items():
    example = _scan_of(scans, number)
    assert example["image"].shape == (STORED_SLICES[number], SIZE, SIZE, 3)
    name = release.case_id(number)
    np.testing.assert_array_equal(example["reader_cq500_labels"], table[name])
    np.testing.assert_array_equal(example["cq500_labels"], table[name].sum(axis=0) >= 2)
    assert example["category"].decode() == case.category
    assert example["series_description"].decode() == case.series[0].description
    assert example["labels"][0] == example["cq500_labels"][0]
  assert float(_scan_of(scans, 12)["source_gantry_tilt_deg"]) == pytest.approx(15.0, abs=0.01)
  assert float(_scan_of(scans, 0)["source_gantry_tilt_deg"]) == 0.0
  assert _metadata(scans)["fold_ranges"]["train"] == common.fold_ranges(
      [int(scans[i]["fold"]) for i in range(len(scans))]
  )


def test_build_dataset_default_size(tmp_path):
  (built,) = build.build_dataset(
      "cq500", data_dir=str(tmp_path), manual_dir=str(DUMMY), config="scans"
  )
  assert built.num_examples == {"train": len(CASES)}
  source = tfds.data_source("cq500/scans", split="train", data_dir=str(tmp_path))
  assert source[0]["image"].shape == (STORED_SLICES[0], 384, 384, 3)


def test_dummy_data_matches_generator(tmp_path):
  written = dummy.write_dummy_data(tmp_path / "dummy")
  listed = sorted(str(p.relative_to(written)) for p in written.rglob("*") if p.is_file())
  committed = sorted(str(p.relative_to(DUMMY)) for p in DUMMY.rglob("*") if p.is_file())
  assert listed == committed
  csv_files = (
      "reads.csv", "bhx/1_Initial_Manual_Labeling.csv", "bhx/2_Extrapolation_to_All_Series.csv"
  )
  for name in csv_files:
    assert (written / name).read_bytes() == (DUMMY / name).read_bytes(), name
  total = sum(p.stat().st_size for p in DUMMY.rglob("*") if p.is_file())
  assert total < 2_000_000


# --- Parsing rules -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, number",
    [("CQ500-CT-12", 12), ("CQ500CT12", 12), (" cq500-ct-0 ", 0), ("CQ500-CT-490", 490),
     ("CQ500-CT-12a", None), ("CT-12", None)],
)
def test_case_number_of_csv_names(name, number):
  assert release.case_number(name) == number


@pytest.mark.parametrize(
    "name, number",
    [("CQ500CT12 CQ500CT12", 12), ("CQ500CT12  CQ500CT12", 12), ("CQ500-CT-12", 12),
     ("CQ500CT7", 7), ("Unknown Study", None), ("qct01", None)],
)
def test_case_number_of_folder_names(name, number):
  assert release.folder_case_number(name) == number


def test_folder_with_two_cases_raises():
  with pytest.raises(release.Cq500LayoutError, match="two different cases"):
    release.folder_case_number("CQ500CT12 CQ500CT13")


def test_reads_findings_map_covers_labels():
  assert list(release.READS_FINDINGS.values()) == list(uem_ich_jax.CQ500_LABELS)
  assert list(release.SCAN_LABEL_FINDINGS) == list(uem_ich_jax.SLICE_LABELS)
  columns = release.reads_columns()
  assert columns[(0, "ICH")] == "R1:ICH"
  assert columns[(2, "BleedLocation-Left")] == "R3:BleedLocation-Left"
  with (DUMMY / "reads.csv").open() as file:
    header = file.readline().strip().split(",")
  assert len(header) == 44
  assert header[2:] == [columns[(r, label)] for r in range(3) for label in uem_ich_jax.CQ500_LABELS]


def _reads_csv(path, header, rows, bom=False):
  text = "\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n"
  path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
  return path


def _reads_header():
  return ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in release.READS_FINDINGS]


def test_reads_csv_quirks(tmp_path):
  header = _reads_header()
  header_spaced = [f" {name}" for name in header]
  ones = [1] * 42
  ich_only = ([1] + [0] * 13) * 3
  rows = [
      ["CQ500CT3", "B1", *ones],  # name without dashes
      ["CQ500-CT-4", "B2", *ich_only],
      ["CQ500-CT-4", "B2", *ich_only],  # identical duplicate
      ["CQ500-CT-5", "B1", *ones[:-1], "1.0"],
      ["CQ500-CT-6", "B1", *ones[:-1], "x"],  # invalid value
      ["CQ500-CT-7", "B1", *ones],
      ["CQ500-CT-7", "B1", *ich_only],  # conflicting duplicate
      ["case-8", "B1", *ones],
  ]
  report = common.BuildReport("cq500")
  path = _reads_csv(tmp_path / "reads.csv", header_spaced, rows, bom=True)
  reads = release.read_reads_csv(path, report)
  assert sorted(reads) == [3, 4, 5]
  assert reads[3].name == "CQ500CT3"
  np.testing.assert_array_equal(reads[4].majority, [1] + [0] * 13)
  np.testing.assert_array_equal(reads[4].scan_labels, [1, 0, 0, 0, 0, 0])
  assert reads[5].readers[2, 13] == 1
  reasons = report.counts()
  assert reasons["invalid reads.csv row"] == 2
  assert reasons["duplicate reads.csv row"] == 1
  assert reasons["conflicting reads.csv rows"] == 1


def test_reads_csv_columns_found_by_name(tmp_path):
  header = _reads_header()
  order = [0, 1, *reversed(range(2, 44))]
  values = ["CQ500-CT-9", "B1"] + [0] * 42
  values[header.index("R2:SAH")] = 1
  values[header.index("R3:SAH")] = 1
  rows = [[values[i] for i in order]]
  path = _reads_csv(tmp_path / "reads.csv", [header[i] for i in order], rows)
  reads = release.read_reads_csv(path, common.BuildReport("cq500"))
  majority = dict(zip(uem_ich_jax.CQ500_LABELS, reads[9].majority))
  assert majority["SAH"] == 1
  assert sum(majority.values()) == 1
  assert reads[9].scan_labels.tolist() == [0, 0, 0, 0, 1, 0]


def test_reads_csv_missing_column_raises(tmp_path):
  header = [name for name in _reads_header() if name != "R2:EDH"]
  with pytest.raises(release.Cq500LayoutError, match="R2:EDH"):
    path = _reads_csv(tmp_path / "reads.csv", header, [])
    release.read_reads_csv(path, common.BuildReport("cq500"))


# Series names seen in the CQ500 release, with the rule that rejects each.
RELEASE_SERIES = [
    ("PLAIN THIN", None), ("Plain", None), ("Thin Plain", None), ("Thin Stnd", None),
    ("Thin Bone", "bone kernel"), ("5mm", None), ("0.625mm", None), ("1.25mm std", None),
    ("55mm Plain", None), ("Plain 3mm", None), ("2.55mm", None), ("BONE", "bone kernel"),
    ("BONE THIN", "bone kernel"), ("SOFT THIN", None), ("C", "contrast"), ("C THIN", "contrast"),
    ("HRCT", "bone kernel"), ("PRE CONTRAST THIN", None), ("PRE CONTRAST BONE", "bone kernel"),
    ("PRE CONTRAST 5MM STD", None), ("5 MM PRE CONTRAST", None), ("POST CONTRAST", "contrast"),
    ("4cc sec 150cc D3D on", "contrast"), ("4cc sec 150cc D3D on-2", "contrast"),
    ("ORAL IV", "contrast"), ("3D CT HEADORBIT", "reformat"), ("THIN BONE PNS", "bone kernel"),
    ("0.625mm DMPR on HiRes VS40", "reformat"), ("PLAIN  THIN", None),
]


def _info(description, kernel="STANDARD", image_type=("ORIGINAL", "PRIMARY", "AXIAL"), agent="",
          angle=0.0, images=30):
  return release.SeriesInfo(
      series_uid=f"1.2.{abs(hash(description)) % 1000}", folder=f"Unknown Study/CT {description}",
      description=description, kernel=kernel, image_type=tuple(image_type), contrast_agent=agent,
      study_uid="1.2.3", files=tuple(pathlib.Path(f"f{i}") for i in range(images)),
      normal_angle_deg=angle, spacing_mm=None,
  )


@pytest.mark.parametrize("description, rule", RELEASE_SERIES)
def test_series_rule_on_release_names(description, rule):
  reason = release.rejection_reason(_info(description))
  if rule is None:
    assert reason is None
  else:
    assert reason is not None and reason.startswith(rule), reason


@pytest.mark.parametrize(
    "kernel, sharp",
    [("STANDARD", False), ("SOFT", False), ("BONE", True), ("BONEPLUS", True), ("LUNG", True),
     ("H31s", False), ("H40s", False), ("H70h", True), ("J60s", True), ("B", False), ("C", False),
     ("D", True), ("YC", False), ("YD", True), ("FC21", False), ("ORIGINAL\\H70h", True),
     ("", False)],
)
def test_bone_kernel_by_tag(kernel, sharp):
  assert (release.bone_kernel_reason("Plain", kernel) is not None) == sharp


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"image_type": ("DERIVED", "SECONDARY", "REFORMATTED")}, "reformat: ImageType"),
        ({"angle": 80.0}, "reformat: slices are 80"),
        ({"angle": 20.0}, None),  # a gantry tilt
        ({"agent": "IOHEXOL"}, "contrast: ContrastBolusAgent"),
        ({"agent": "NONE"}, None),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"images": 3}, "too few images"),
    ],
)
def test_series_rule_by_tags(changes, reason):
  found = release.rejection_reason(_info("Plain", **changes))
  if reason is None:
    assert found is None
  else:
    assert found is not None and found.startswith(reason), found


def test_rank_series_nearest_5mm(monkeypatch):
  spacing = {"0.625mm": 0.625, "Plain": 5.0, "Plain 3mm": 3.0, "5mm": 5.0, "BONE": 5.0}
  monkeypatch.setattr(
      release, "measure_spacing", lambda files: spacing[pathlib.PurePath(files[0]).parent.name]
  )
  infos = []
  for name, images in [("0.625mm", 200), ("Plain", 30), ("Plain 3mm", 50), ("5mm", 32),
                       ("BONE", 32)]:
    files = tuple(pathlib.Path(name) / str(i) for i in range(images))
    infos.append(dataclasses.replace(_info(name), files=files))
  ranking = release.rank_series(reversed(infos))
  # Two at 5 mm: the one with more images first.
  assert [info.description for info in ranking.eligible] == ["5mm", "Plain", "Plain 3mm", "0.625mm"]
  rejected = [(info.description, reason.split(":")[0]) for info, reason in ranking.rejected]
  assert rejected == [("BONE", "bone kernel")]


def test_bhx_data_parsing():
  edges = release.parse_bhx_data("{'x': 212.4, 'y': 180.0, 'width': 38.5, 'height': 27.1}")
  assert edges == pytest.approx((180.0, 212.4, 207.1, 250.9))
  assert release.parse_bhx_data("{'x': 1, 'y': 2, 'width': 3, 'height': 4}") == (2, 1, 6, 4)
  for text in ("{'x': 1, 'y': 2, 'width': 3}", "{'x': 1, 'y': 2, 'width': -3, 'height': 4}",
               "[1, 2, 3, 4]", "{'x': 'a', 'y': 2, 'width': 3, 'height': 4}", "{'x': 1,"):
    with pytest.raises(ValueError):
      release.parse_bhx_data(text)


def test_bhx_label_names():
  assert release.bhx_class_id("Intraparenchymal") == 2
  assert release.bhx_class_id("Epidural") == 1
  assert release.bhx_class_id("subdural") == 5
  assert release.bhx_class_id("Intraventricular") == 3
  assert release.bhx_class_id("Subarachnoid") == 4
  assert release.bhx_class_id("Chronic") == 0
  assert release.bhx_class_id("Fracture") is None


def test_bhx_csv_extra_column_and_bad_rows(tmp_path):
  path = tmp_path / "2_Extrapolation_to_All_Series.csv"
  path.write_text(
      "\ufeff,labelType,labelName,data,StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID\n"
      "0,Box,Subdural,\"{'x': 1, 'y': 2, 'width': 3, 'height': 4}\",1.2,1.2.3,1.2.3.4\n"
      "1,Box,Subdural,\"{'x': 1, 'y': 2, 'width': 3, 'height': 4}\",1.2,1.2.3,1.2.3.4\n"
      "2,Box,Tumour,\"{'x': 1, 'y': 2, 'width': 3, 'height': 4}\",1.2,1.2.3,1.2.3.4\n",
      encoding="utf-8",
  )
  report = common.BuildReport("cq500")
  boxes = release.read_bhx_csv(path, report)
  assert boxes == [release.BhxBox("1.2.3.4", "1.2.3", 5, 2.0, 1.0, 6.0, 4.0)]
  assert report.counts() == {"unknown BHX labelName": 1}


def test_find_release_files_variants(tmp_path):
  (tmp_path / "reads.csv").write_text("name\n")
  (tmp_path / "qct01" / "CQ500CT1 CQ500CT1" / "Unknown Study").mkdir(parents=True)
  (tmp_path / "CQ500-CT-2" / "CQ500CT2 CQ500CT2" / "Unknown Study").mkdir(parents=True)
  (tmp_path / "qct02" / "CQ500CT1 CQ500CT1").mkdir(parents=True)
  (tmp_path / "CQ500-CT-3.zip").write_bytes(b"PK")
  (tmp_path / "bhx").mkdir()
  (tmp_path / "bhx" / "1_initial_manual_labeling.csv").write_text("x\n")
  report = common.BuildReport("cq500")
  files = release.find_release_files(tmp_path, report)
  assert files.patient_folders == {
      1: tmp_path / "qct01" / "CQ500CT1 CQ500CT1", 2: tmp_path / "CQ500-CT-2"
  }
  bhx_file = tmp_path / "bhx" / "1_initial_manual_labeling.csv"
  assert files.bhx_files == {"1_Initial_Manual_Labeling.csv": bhx_file}
  assert report.counts() == {"second folder of a case": 1, "zip archive not extracted": 1}


def test_find_release_files_without_reads_raises(tmp_path):
  (tmp_path / "CQ500CT1 CQ500CT1").mkdir()
  with pytest.raises(common.ReleaseNotFoundError, match="reads.csv not found"):
    release.find_release_files(tmp_path, common.BuildReport("cq500"))


# --- Carrying boxes ----------------------------------------------------------


def test_carry_box_through_padding_and_resize():
  hu = np.zeros((3, 40, 64), np.float32)
  positions = np.array([[0.0, 0.0, z] for z in (0.0, 5.0, 10.0)])
  affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
  source = ct.CTVolume(hu=hu, positions=positions, affine=affine, spacing=(5.0, 1.0, 1.0))
  stored, _ = common.square_inplane(source, None, 32)
  np.testing.assert_array_equal(source_slices(source, stored), [0, 1, 2])
  # 12 rows of padding above, then half size.
  box = carry_box(np.array([10.0, 20.0, 20.0, 30.0]), source, 1, stored, 1)
  np.testing.assert_allclose(box, [11.0, 10.0, 16.0, 15.0], atol=1e-9)


def test_carry_box_rejects_moved_planes():
  scan = phantom.generate_scan(3, (8, 32, 32), spacing_mm=(5.0, 7.2, 7.2), subtypes=())
  resampled, _ = ct.resample_z(scan.volume, 2.5)
  with pytest.raises(BoxCarryError, match="no source slice plane"):
    source_slices(scan.volume, resampled)
  with pytest.raises(BoxCarryError, match="off stored slice"):
    carry_box(np.array([1.0, 1.0, 4.0, 4.0]), scan.volume, 0, resampled, 1)


def test_every_reads_row_invalid_clean_error(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(DUMMY, manual)
  lines = (manual / "reads.csv").read_text().splitlines()
  rows = [line.split(",") for line in lines[1:]]
  for row in rows:
    row[2] = "yes"
  (manual / "reads.csv").write_text("\n".join([lines[0]] + [",".join(row) for row in rows]) + "\n")
  with pytest.raises(build.DatasetBuildError) as raised:
    build.build_dataset("cq500/slices", data_dir=str(tmp_path / "out"), manual_dir=str(manual))
  message = str(raised.value)
  assert message.startswith("cq500/slices: cq500: no usable examples")
  assert "invalid reads.csv row" in message
  assert "no usable reads.csv row" in message


def test_reads_value_error_in_plain_words(tmp_path):
  lines = (DUMMY / "reads.csv").read_text().splitlines()
  row = lines[1].split(",")
  row[2] = "yes"
  path = tmp_path / "reads.csv"
  path.write_text("\n".join([lines[0], ",".join(row)]) + "\n")
  report = common.BuildReport("test")
  assert release.read_reads_csv(path, report) == {}
  (entry,) = report.entries
  assert entry.reason == "invalid reads.csv row: column R1:ICH: 'yes' is not 0 or 1"
