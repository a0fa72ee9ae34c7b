"""The rsna_ich builder on dummy data in the layout of the Kaggle RSNA 2019 release."""

import importlib.util
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.datasets.rsna_ich import (
    RsnaIch,
    RsnaIchConfig,
    RsnaLabelsError,
    beam_available,
    read_labels,
)
from uem_ich_jax.datasets.rsna_ich import rsna_ich_dataset_builder as rsna

_DUMMY_SCRIPT = (
    pathlib.Path(__file__).resolve().parents[1] / "datasets" / "rsna_ich" / "make_dummy_data.py"
)
_spec = importlib.util.spec_from_file_location("rsna_make_dummy_data", _DUMMY_SCRIPT)
dummy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dummy)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

SIZE = 64
NUM_FOLDS = 3
CSV_HEADER = "ID,Label\n"


def _block(stem, labels=(0, 0, 0, 0, 0, 0)):
  """CSV rows of one image in the release's order; `labels` in SLICE_LABELS order."""
  by_name = dict(zip(uem_ich_jax.SLICE_LABELS, labels))
  return "".join(f"{stem}_{name},{by_name[name]}\n" for name in dummy.CSV_SUBTYPES)


def _build(manual_dir, data_dir, layout, use_beam=False):
  config = RsnaIchConfig(
      name=f"{layout}_test", layout=layout, image_size=SIZE, num_folds=NUM_FOLDS
  )
  builder = RsnaIch(
      config=config, data_dir=str(data_dir), file_format="array_record", use_beam=use_beam
  )
  download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  if use_beam:
    beam = tfds.core.lazy_imports.apache_beam
    download_config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir),
        beam_runner=beam.runners.DirectRunner(),
        beam_options=beam.options.pipeline_options.PipelineOptions(flags=[]),
    )
  builder.download_and_prepare(download_config=download_config)
  return builder, builder.as_data_source(split="train")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A fresh dummy release and the facts of every written series."""
  folder = tmp_path_factory.mktemp("release")
  series = dummy.write_dummy_data(folder)
  return folder, {item["series"]: item for item in series}


@pytest.fixture(scope="module")
def slices(release, tmp_path_factory):
  builder, source = _build(release[0], tmp_path_factory.mktemp("slices"), rsna.SLICES)
  return builder, [source[index] for index in range(len(source))]


@pytest.fixture(scope="module")
def scans(release, tmp_path_factory):
  builder, source = _build(release[0], tmp_path_factory.mktemp("scans"), rsna.SCANS)
  return builder, [source[index] for index in range(len(source))]


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


# Labels CSV.


def test_labels_reordered_any_first(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text(CSV_HEADER + _block("ID_000000001", (1, 0, 0, 0, 1, 0)))
  table = read_labels(path)
  np.testing.assert_array_equal(table.labels["ID_000000001"], [1, 0, 0, 0, 1, 0])


def test_labels_duplicate_block_removed(tmp_path):
  path = tmp_path / "labels.csv"
  block = _block("ID_000000001", (1, 1, 0, 0, 0, 0))
  path.write_text(CSV_HEADER + block + block + _block("ID_000000002"))
  table = read_labels(path)
  assert table.duplicate_rows == 6
  assert sorted(table.labels) == ["ID_000000001", "ID_000000002"]


def test_labels_conflict_names_image_and_rows(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text(
      CSV_HEADER + _block("ID_000000001") + "ID_000000001_subdural,1\n"
  )
  with pytest.raises(RsnaLabelsError) as error:
    read_labels(path)
  message = str(error.value)
  assert "ID_000000001" in message
  assert "subdural" in message
  assert "line 6" in message
  assert "line 8" in message


def test_labels_invalid_image_left_out(tmp_path):
  path = tmp_path / "labels.csv"
  bad_value = _block("ID_000000002").replace("ID_000000002_any,0", "ID_000000002_any,yes")
  conflict = _block("ID_000000003") + "ID_000000003_epidural,1\n"
  path.write_text(
      CSV_HEADER + _block("ID_000000001") + bad_value + conflict + "ID_000000004_epidural\n"
  )
  table = read_labels(path)
  assert sorted(table.labels) == ["ID_000000001"]
  assert "'yes'" in table.invalid["ID_000000002"]
  assert "conflicting labels for subtype epidural" in table.invalid["ID_000000003"]
  assert table.bad_rows == ["line 21: expected 2 fields, found ['ID_000000004_epidural']"]


def test_labels_reject_submission_values(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text(CSV_HEADER + "ID_000000001_epidural,0.5\n")
  with pytest.raises(RsnaLabelsError, match="sample submission"):
    read_labels(path)


def test_labels_reject_unknown_subtype(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text(CSV_HEADER + "ID_000000001_hemorrhage,1\n")
  with pytest.raises(RsnaLabelsError, match="subtype"):
    read_labels(path)


def test_labels_incomplete_and_any_mismatch(tmp_path):
  path = tmp_path / "labels.csv"
  partial = "".join(_block("ID_000000002").splitlines(keepends=True)[:4])
  path.write_text("\ufeff" + CSV_HEADER + _block("ID_000000001", (0, 0, 0, 0, 1, 0)) + partial)
  table = read_labels(path)
  assert table.any_mismatch == ["ID_000000001"]
  assert table.incomplete == {"ID_000000002": ["subdural", "any"]}
  assert "ID_000000002" not in table.labels


# Release layout.


@pytest.mark.parametrize("image_folder", rsna.IMAGE_FOLDERS)
@pytest.mark.parametrize("nested", [False, True])
def test_find_release_folder_variants(tmp_path, image_folder, nested):
  root = tmp_path / rsna.RELEASE_FOLDER if nested else tmp_path
  (root / image_folder).mkdir(parents=True)
  (root / "stage_2_train.csv").write_text(CSV_HEADER)
  folder, csv_path = rsna.find_release(tmp_path)
  assert folder == root / image_folder
  assert csv_path == root / "stage_2_train.csv"


def test_find_release_rejects_both_folders(tmp_path):
  for name in rsna.IMAGE_FOLDERS:
    (tmp_path / name).mkdir()
  (tmp_path / "stage_2_train.csv").write_text(CSV_HEADER)
  with pytest.raises(uem_ich_jax.errors.InputError, match="keep one"):
    rsna.find_release(tmp_path)


def test_dummy_files_have_release_attributes(release):
  import pydicom  # pylint: disable=import-outside-toplevel

  folder = release[0] / "stage_2_train"
  path = sorted(folder.glob("ID_*.dcm"))[0]
  dataset = pydicom.dcmread(path)
  assert {element.keyword for element in dataset} == dummy.RELEASE_ATTRIBUTES
  assert dataset.SOPInstanceUID == path.stem


# The 12-bit wrap.


def test_unwrap_applies_to_wrapped_series_only(release):
  facts = release[1][dummy.WRAPPED_SERIES]
  folder = release[0] / "stage_2_train"
  path = str(folder / f"{facts['sops'][2]}.dcm")
  expected = facts["hu"][2]
  assert expected.min() < 0  # The slice has negative HU to wrap.
  np.testing.assert_array_equal(rsna.unwrap_12bit_hu(path), expected)
  # The CT layer's standard reading keeps the wrapped values.
  standard = ct.read_dicom_files([path]).hu[0]
  assert standard.max() > 3000

  header = rsna.read_header(pathlib.Path(path))
  assert header.wrapped
  other = release[1]["ID_c0ffee0001"]["sops"][0]
  assert not rsna.read_header(folder / f"{other}.dcm").wrapped


def test_unwrap_cut_follows_intercept():
  values = np.array([0, 1000, 3070, 3071, 3072, 4095])
  # Intercept 0: stored 3072..4095 are HU -1024..-1.
  np.testing.assert_array_equal(
      rsna.unwrap_stored_values(values, slope=1.0, intercept=0.0),
      [0, 1000, 3070, 3071, -1024, -1],
  )
  # Intercept 1: HU -1024 is stored as 3071, and HU 0 as 4095.
  unwrapped = rsna.unwrap_stored_values(values, slope=1.0, intercept=1.0)
  np.testing.assert_array_equal(unwrapped + 1, [1, 1001, 3071, -1024, -1023, 0])


# Slices build.


def test_slices_count_and_bad_file(slices, release):
  builder, examples = slices
  assert len(examples) == 29  # 30 files, ID_6431af929 left out.
  report = builder.info.metadata["bad_files"]
  assert report["skipped"] == 1
  assert report["counts"]["truncated PixelData"] == 1
  (entry,) = [item for item in report["files"] if not item["kept"]]
  assert pathlib.Path(entry["path"]).stem == dummy.CORRUPTED_STEM
  assert "expected 8192" in entry["reason"]
  stems = {_text(example["sop_instance_uid"]) for example in examples}
  assert dummy.CORRUPTED_STEM not in stems


def test_slices_duplicate_rows_reported(slices):
  report = slices[0].info.metadata["bad_files"]
  assert report["counts"]["duplicate rows removed"] == 1
  assert report["kept"] == 1


def test_slices_labels_match_csv(slices, release):
  expected = {
      sop: labels
      for facts in release[1].values()
      for sop, labels in zip(facts["sops"], facts["labels"])
  }
  for example in slices[1]:
    sop = _text(example["sop_instance_uid"])
    np.testing.assert_array_equal(example["labels"], expected[sop], err_msg=sop)


def test_slices_windows_match_written_hu(slices, release):
  checked = 0
  for example in slices[1]:
    facts = release[1][_text(example["scan_id"])]
    if facts["series"] == dummy.NON_SQUARE_SERIES:
      continue
    written = facts["sops"].index(_text(example["sop_instance_uid"]))
    expected = ct.windows_uint8(facts["hu"][written])
    np.testing.assert_array_equal(example["image"], expected, err_msg=facts["series"])
    checked += 1
  assert checked == 24


def test_slices_wrapped_series_marked(slices):
  for example in slices[1]:
    wrapped = _text(example["scan_id"]) == dummy.WRAPPED_SERIES
    assert bool(example["hu_unwrapped"]) == wrapped


def test_slices_sorted_along_normal(slices, release):
  by_series = {}
  for example in slices[1]:
    by_series.setdefault(_text(example["scan_id"]), []).append(example)
  for series_uid, members in by_series.items():
    facts = release[1][series_uid]
    order = [facts["sops"].index(_text(example["sop_instance_uid"])) for example in members]
    assert order == sorted(order), series_uid
    assert [int(example["slice_index"]) for example in members] == list(range(len(members)))
    if series_uid != dummy.NON_SQUARE_SERIES:
      np.testing.assert_allclose(members[0]["affine"], facts["affine"], atol=1e-3)


def test_slices_non_square_padded(slices, release):
  facts = release[1][dummy.NON_SQUARE_SERIES]
  members = [e for e in slices[1] if _text(e["scan_id"]) == dummy.NON_SQUARE_SERIES]
  example = members[0]
  pad = (SIZE - 56) // 2
  np.testing.assert_array_equal(example["image"][:, pad:SIZE - pad], ct.windows_uint8(facts["hu"][0]))
  assert np.all(example["image"][:, :pad] == ct.windows_uint8(np.float32(ct.AIR_HU)))
  expected_origin = facts["affine"][:3, 3] - pad * facts["affine"][:3, 2]
  np.testing.assert_allclose(example["affine"][:3, 3], expected_origin, atol=1e-3)


def test_slices_folds_keep_patients_together(slices):
  builder, examples = slices
  folds = {}
  for example in examples:
    folds.setdefault(_text(example["patient_id"]), set()).add(int(example["fold"]))
  assert all(len(patient_folds) == 1 for patient_folds in folds.values())
  assert builder.info.metadata["num_folds"] == NUM_FOLDS
  ranges = builder.info.metadata["fold_ranges"]["train"]
  assert ranges == sorted(ranges)
  for start, stop, fold in ranges:
    assert all(int(examples[index]["fold"]) == fold for index in range(start, stop))
  assert ranges[-1][1] == len(examples)


# Scans build.


def test_scans_slice_labels_and_counts(scans, release):
  _, examples = scans
  assert len(examples) == 6
  for example in examples:
    facts = release[1][_text(example["scan_id"])]
    sops = [_text(sop) for sop in example["sop_instance_uids"]]
    kept = [facts["sops"].index(sop) for sop in sops]
    assert kept == sorted(kept)
    np.testing.assert_array_equal(example["slice_labels"], facts["labels"][kept])
    np.testing.assert_array_equal(example["labels"], facts["labels"][kept].max(axis=0))
    assert example["image"].shape == (len(kept), SIZE, SIZE, 3)
    assert _text(example["patient_id"]) == facts["patient"]
  truncated = [e for e in examples if _text(e["scan_id"]) == dummy.TRUNCATED_SERIES][0]
  assert len(truncated["sop_instance_uids"]) == dummy.SLICES_PER_SERIES - 1


def test_scans_metadata_matches_slices(scans, slices):
  assert scans[0].info.metadata["bad_files"] == slices[0].info.metadata["bad_files"]
  assert len(scans[0].info.metadata["fold_ranges"]["train"]) == NUM_FOLDS


# Release variants and further bad files.


def test_build_reports_bad_files_by_reason(release, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(release[0] / "stage_2_train", manual / "stage_2_train_images")
  shutil.copy(release[0] / "stage_2_train.csv", manual / "stage_2_train.csv")
  images = manual / "stage_2_train_images"
  (images / "ID_00000000e.dcm").write_bytes(b"")
  unlabelled = images / "ID_00000000f.dcm"
  shutil.copy(images / f"{release[1]['ID_c0ffee0001']['sops'][0]}.dcm", unlabelled)
  builder, source = _build(manual, tmp_path / "data", rsna.SLICES)
  report = builder.info.metadata["bad_files"]
  reasons = {pathlib.Path(item["path"]).stem: item["reason"] for item in report["files"]}
  assert reasons["ID_00000000e"].startswith("unreadable DICOM header")
  assert reasons["ID_00000000f"] == "no labels in stage_2_train.csv"
  assert report["skipped"] == 3
  assert len(source) == 29


def _release_copy(release, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(release[0] / "stage_2_train", manual / "stage_2_train")
  shutil.copy(release[0] / "stage_2_train.csv", manual / "stage_2_train.csv")
  return manual


def test_build_leaves_out_image_with_invalid_label(release, tmp_path):
  manual = _release_copy(release, tmp_path)
  stem = release[1]["ID_c0ffee0001"]["sops"][0]
  csv_path = manual / "stage_2_train.csv"
  csv_path.write_text(
      re.sub(rf"^{stem}_any,\d$", f"{stem}_any,0.5", csv_path.read_text(), flags=re.MULTILINE)
  )
  builder, source = _build(manual, tmp_path / "data", rsna.SLICES)
  reasons = {item["path"]: item["reason"] for item in builder.info.metadata["bad_files"]["files"]}
  assert "'0.5' of" in reasons[str(manual / "stage_2_train" / f"{stem}.dcm")]
  assert len(source) == 28


def test_build_reports_second_file_of_one_stem(release, tmp_path):
  manual = _release_copy(release, tmp_path)
  stem = release[1]["ID_c0ffee0001"]["sops"][0]
  shutil.copy(manual / "stage_2_train" / f"{stem}.dcm", manual / "stage_2_train" / f"{stem}.DCM")
  builder, source = _build(manual, tmp_path / "data", rsna.SLICES)
  reasons = {item["path"]: item["reason"] for item in builder.info.metadata["bad_files"]["files"]}
  # Files are taken in sorted order, so ID_x.DCM comes first and ID_x.dcm is the duplicate.
  assert reasons[str(manual / "stage_2_train" / f"{stem}.dcm")] == (
      f"duplicate file name: {stem} also stored as {stem}.DCM"
  )
  assert len(source) == 29


def test_build_reports_links_folders_and_orphan_rows(release, tmp_path):
  manual = _release_copy(release, tmp_path)
  images = manual / "stage_2_train"
  (images / "ID_00000000a.dcm").symlink_to(tmp_path / "gone.dcm")
  (images / "nested").mkdir()
  csv_path = manual / "stage_2_train.csv"
  csv_path.write_text(csv_path.read_text() + "ID_00000000b_any,0\n")
  builder, _ = _build(manual, tmp_path / "data", rsna.SLICES)
  reasons = {item["path"]: item["reason"] for item in builder.info.metadata["bad_files"]["files"]}
  assert reasons[str(images / "ID_00000000a.dcm")].startswith("not a regular file")
  assert reasons[str(images / "nested")].startswith("subfolder")
  assert reasons["stage_2_train.csv#ID_00000000b"].startswith("incomplete labels without an image")


def test_build_leaves_out_slice_without_rescale(release, tmp_path):
  import pydicom  # pylint: disable=import-outside-toplevel

  manual = _release_copy(release, tmp_path)
  path = manual / "stage_2_train" / f"{release[1]['ID_c0ffee0001']['sops'][0]}.dcm"
  dataset = pydicom.dcmread(path)
  del dataset.RescaleIntercept
  del dataset.RescaleSlope
  dataset.save_as(path)
  builder, source = _build(manual, tmp_path / "data", rsna.SLICES)
  reasons = {item["path"]: item["reason"] for item in builder.info.metadata["bad_files"]["files"]}
  assert reasons[str(path)] == "missing DICOM tags: RescaleSlope, RescaleIntercept"
  assert len(source) == 28


def test_second_file_of_one_stem_reported_by_reader(release, tmp_path):
  facts = release[1]["ID_c0ffee0002"]
  first = release[0] / "stage_2_train" / f"{facts['sops'][0]}.dcm"
  second = release[0] / "stage_2_train" / f"{facts['sops'][1]}.dcm"
  copy = tmp_path / f"{facts['sops'][0]}.DCM"
  shutil.copy(first, copy)
  result = rsna.process_series(_plan([first, copy, second], facts), layout=rsna.SLICES, image_size=SIZE)
  assert len(result.examples) == 2
  (problem,) = result.problems
  assert problem.path == str(copy)


def _plan(files, facts):
  return rsna.SeriesPlan(
      first_key=0, patient_id=facts["patient"], study_uid=facts["study"],
      series_uid=facts["series"], fold=0, files=tuple(str(path) for path in files),
      stems=tuple(pathlib.Path(path).stem for path in files), wrapped=(False,) * len(files),
      labels=np.zeros((len(files), 6), np.uint8),
  )


def test_exact_duplicate_slice_reported(release, tmp_path):
  facts = release[1]["ID_c0ffee0002"]
  first = release[0] / "stage_2_train" / f"{facts['sops'][0]}.dcm"
  second = release[0] / "stage_2_train" / f"{facts['sops'][1]}.dcm"
  copy = tmp_path / "ID_00000000d.dcm"
  shutil.copy(first, copy)
  result = rsna.process_series(_plan([first, copy, second], facts), layout=rsna.SLICES, image_size=SIZE)
  assert len(result.examples) == 2
  (problem,) = result.problems
  assert pathlib.Path(problem.path).stem == "ID_00000000d"
  assert problem.reason.startswith("left out by the CT reader: dropped")


def test_series_rejected_by_ct_reader_reported(release, tmp_path):
  import pydicom  # pylint: disable=import-outside-toplevel

  facts = release[1]["ID_c0ffee0002"]
  first = release[0] / "stage_2_train" / f"{facts['sops'][0]}.dcm"
  other = tmp_path / "ID_00000000c.dcm"
  dataset = pydicom.dcmread(first)
  dataset.PixelData = bytes(len(dataset.PixelData))  # Other pixels at the same position.
  dataset.save_as(other)
  result = rsna.process_series(_plan([first, other], facts), layout=rsna.SLICES, image_size=SIZE)
  assert result.examples == []
  assert len(result.problems) == 2
  assert all("different images at the same slice position" in p.reason for p in result.problems)


# Beam.


@pytest.mark.skipif(
    not beam_available(),
    reason="apache_beam is not installed; install the beam extra (pip install -e '.[test,beam]')",
)
def test_beam_matches_plain(release, slices, tmp_path):
  builder, source = _build(release[0], tmp_path, rsna.SLICES, use_beam=True)
  assert len(source) == len(slices[1])
  for index, plain in enumerate(slices[1]):
    example = source[index]
    for name, value in plain.items():
      np.testing.assert_array_equal(example[name], value, err_msg=f"{index} {name}")
  assert builder.info.metadata["fold_ranges"] == slices[0].info.metadata["fold_ranges"]
  assert builder.info.metadata["bad_files"] == slices[0].info.metadata["bad_files"]


def test_use_beam_without_beam_raises(monkeypatch):
  monkeypatch.setattr(rsna, "beam_available", lambda: False)
  with pytest.raises(ImportError, match="beam extra"):
    RsnaIch(use_beam=True)
