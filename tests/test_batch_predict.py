"""`uem-ich predict` on many studies: study ids, study lists, the series rule, batch runs, restart."""

import csv
import json
import os
import pathlib
import re

import pytest

from uem_ich_jax import cli, ct, phantom
from uem_ich_jax.ct import CTReadError, series_choice
from uem_ich_jax.ct.volume import AIR_HU
from uem_ich_jax.infer import batch, predict
from uem_ich_jax.train import checkpoint

# The trained smoke runs of test_scan_predict.py (a multitask run with
# detection and an aggregator run); another module may hold them in conftest.py.
import test_scan_predict

if hasattr(test_scan_predict, "runs"):
  runs = test_scan_predict.runs
  data_dir = test_scan_predict.data_dir

SIZE = 48
PIXEL_MM = 230 / SIZE

HOSTILE_NAMES = [
    "../../etc/passwd", "..", ".", "", "/absolute/path", "a/b", "a\\b", "-rf", ".hidden",
    "Müller Ümit", "名前/../../x", "x" * 500, "CON", "nul.txt", "summary.csv", "a\x00b",
    "trailing.", "tab\there", "case_01",
]


# ------------------------------------------------------------- Study ids ---


def test_safe_study_id_stays_inside(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  ids = [batch.safe_study_id(name) for name in HOSTILE_NAMES]
  for name, study_id in zip(HOSTILE_NAMES, ids):
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", study_id), (name, study_id)
    assert len(study_id) <= batch.MAX_ID_LENGTH, name
    assert study_id not in (".", "..", batch.SUMMARY_FILE), name
    folder = out / study_id
    folder.mkdir()
    assert folder.resolve().parent == out.resolve(), name
  assert len(set(ids)) == len(ids)
  # Names that are already safe are kept as they are.
  assert batch.safe_study_id("case_01") == "case_01"
  assert batch.safe_study_id("Müller Ümit").startswith("Muller_Umit-")


# ----------------------------------------------------------- Study lists ---


def test_studies_from_csv_paths_and_ids(tmp_path):
  table = tmp_path / "lists" / "studies.csv"
  table.parent.mkdir()
  table.write_text(
      "input,id,series_uid\n"
      "scans/a,,\n"
      "/data/b.nii.gz,,\n"
      "\n"
      "scans/c,../up,1.2.3\n"
      "scans/d,a,\n"
  )
  studies = batch.studies_from_csv(table)
  assert [study.input for study in studies] == ["scans/a", "/data/b.nii.gz", "scans/c", "scans/d"]
  assert studies[0].path == table.parent / "scans" / "a"
  assert studies[1].path == pathlib.Path("/data/b.nii.gz")
  assert [study.id for study in studies] == ["a", "b", "../up", "a"]
  assert studies[0].folder == "a"
  assert studies[1].folder == "b"
  assert studies[2].folder == batch.safe_study_id("../up")
  assert studies[2].series_uid == "1.2.3"
  assert studies[0].series_uid is None
  # The explicit id "a" repeats the default id of the first row.
  assert studies[3].folder == "a-2"


def _finished_report(probability):
  """A minimal report.json of a finished study, as `summary_row` reads it."""
  scan = {"any": {"max_probability": probability, "positive": probability > 0.5}}
  return {"labels": ["any"], "scan": scan, "timings_s": {"total": 1.5}}


def test_restart_summary_keeps_ids_and_order(tmp_path, monkeypatch):
  table = tmp_path / "studies.csv"
  table.write_text(
      "input,id\nscans/z,zeta\nscans/u,Ünïcødé 病人 ✓\nscans/a,alpha\n", encoding="utf-8"
  )
  studies = batch.studies_from_csv(table)
  out = tmp_path / "out"
  for number, study in enumerate(studies):
    (out / study.folder).mkdir(parents=True)
    report = _finished_report(0.25 * number)
    (out / study.folder / "report.json").write_text(json.dumps(report))
  monkeypatch.setattr(predict, "restore_runs", lambda *args, **kwargs: pytest.fail("restored"))

  result = batch.run_batch("no_run_needed", studies, out, progress=False)

  assert result.skipped == 3
  rows = _read_summary(out / batch.SUMMARY_FILE)
  assert [row["id"] for row in rows] == ["zeta", "Ünïcødé 病人 ✓", "alpha"]
  assert rows[1]["folder"] == batch.safe_study_id("Ünïcødé 病人 ✓")
  assert rows[1]["folder"] != rows[1]["id"]
  assert [row["any_probability"] for row in rows] == ["0.0000", "0.2500", "0.5000"]
  assert [row["input"] for row in rows] == ["scans/z", "scans/u", "scans/a"]


def test_studies_from_csv_needs_input_column(tmp_path):
  table = tmp_path / "studies.csv"
  table.write_text("path,id\nscans/a,a\n")
  with pytest.raises(batch.BatchError, match="no `input` column"):
    batch.studies_from_csv(table)
  table.write_text("input,id\n")
  with pytest.raises(batch.BatchError, match="no studies"):
    batch.studies_from_csv(table)


def test_discover_studies_folder_tree(tmp_path):
  root = tmp_path / "tree"
  (root / "site1" / "p1").mkdir(parents=True)
  (root / "site1" / "p1" / "0001.dcm").write_bytes(b"\0" * 200)
  (root / "site1" / "p2.nii.gz").write_bytes(b"")
  # No suffix, but the DICM prefix at byte 128.
  (root / "site2" / "p3" / "axial").mkdir(parents=True)
  (root / "site2" / "p3" / "axial" / "IM1").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
  (root / "site2" / "p3" / "notes.txt").write_text("not a study: p3 has a subfolder")
  (root / "docs").mkdir()
  (root / "docs" / "README.txt").write_text("a leaf folder without DICOM files")
  (root / "scan.nii").write_bytes(b"")

  studies = batch.discover_studies(root)
  assert [study.id for study in studies] == ["scan", "site1__p1", "site1__p2", "site2__p3__axial"]
  assert [study.folder for study in studies] == [study.id for study in studies]
  assert studies[1].path == root / "site1" / "p1"
  assert studies[2].path == root / "site1" / "p2.nii.gz"
  with pytest.raises(batch.BatchError, match="no studies found"):
    batch.discover_studies(root / "docs")


# ------------------------------------------------------------ Series rule ---


def _series_uid(series_number):
  return f"1.2.826.0.1.3680043.10.999.{series_number}"


def _write_series(scan, folder, *, description, kernel="STANDARD", series_number=1, edit=None):
  return ct.write_dicom_series(
      scan.volume, folder, series_description=description, kernel=kernel,
      series_number=series_number, study_uid="1.2.826.0.1.3680043.10.999",
      series_uid=_series_uid(series_number),
      file_name=f"s{series_number}_{{index:03d}}.dcm", edit_dataset=edit,
  )


def _localizer(dataset, index):
  dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
  """One folder with four series: axial 5 mm, its bone-kernel copy, axial 2.5 mm, a localizer."""
  folder = tmp_path_factory.mktemp("study") / "study"
  axial = phantom.generate_scan(
      31, (10, SIZE, SIZE), spacing_mm=(5.0, PIXEL_MM, PIXEL_MM), subtypes=("subdural",)
  )
  thin = phantom.generate_scan(31, (20, SIZE, SIZE), spacing_mm=(2.5, PIXEL_MM, PIXEL_MM))
  _write_series(axial, folder, description="HEAD 5mm", series_number=2)
  _write_series(axial, folder, description="HEAD 5mm", kernel="BONE", series_number=3)
  _write_series(thin, folder, description="HEAD 2.5mm", series_number=4)
  scout = phantom.generate_scan(32, (1, SIZE, SIZE), spacing_mm=(5.0, PIXEL_MM, PIXEL_MM))
  _write_series(scout, folder, description="Scout", series_number=1, edit=_localizer)
  return folder


def test_read_study_uses_cq500_rule(study_folder):
  volume, choice = predict.read_study(study_folder)
  assert volume.num_slices == 10
  assert volume.provenance.series_uid == _series_uid(2)
  assert choice["chosen_by"] == "rule"
  assert choice["rule"] == series_choice.RULE
  assert choice["chosen"]["spacing_mm"] == pytest.approx(5.0)
  reasons = {entry["series_uid"]: entry["reason"] for entry in choice["series_candidates"]}
  assert len(choice["series_candidates"]) == 3
  assert reasons[_series_uid(1)].startswith("localizer: ImageType")
  assert reasons[_series_uid(3)] == "bone kernel: ConvolutionKernel 'BONE'"
  assert reasons[_series_uid(4)].startswith("ranked below the chosen series: spacing 2.50 mm")


def test_read_study_series_uid_overrides(study_folder):
  uid = _series_uid(4)
  volume, choice = predict.read_study(study_folder, series_uid=uid)
  assert volume.num_slices == 20
  assert choice["chosen_by"] == "series_uid"
  assert choice["chosen"]["series_uid"] == uid
  assert len(choice["series_candidates"]) == 3
  assert {entry["reason"] for entry in choice["series_candidates"]} == {
      "not the requested series_uid"
  }


def test_read_study_without_eligible_series(tmp_path):
  scan = phantom.generate_scan(33, (10, 16, 16), spacing_mm=(5.0, 14.0, 14.0), subtypes=())
  _write_series(scan, tmp_path, description="HEAD C+", series_number=1)
  _write_series(scan, tmp_path, description="HEAD", kernel="H70h", series_number=2)
  with pytest.raises(CTReadError, match="none fits the series rule") as error:
    predict.read_study(tmp_path)
  assert "contrast: description 'HEAD C+'" in str(error.value)
  assert "bone kernel: ConvolutionKernel 'H70h'" in str(error.value)
  assert "--series-uid" in str(error.value)


def test_read_study_rejects_non_ct_series(tmp_path):
  scan = phantom.generate_scan(34, (10, 16, 16), spacing_mm=(5.0, 14.0, 14.0), subtypes=())
  _write_series(scan, tmp_path, description="HEAD", series_number=1)
  _write_series(scan, tmp_path, description="MR HEAD", series_number=2,
                edit=lambda dataset, index: setattr(dataset, "Modality", "MR"))
  volume, choice = predict.read_study(tmp_path)
  assert volume.provenance.series_description == "HEAD"
  [other] = choice["series_candidates"]
  assert other["reason"] == "not CT: Modality MR"


def test_square_field_of_view_pads_one_pixel():
  # 32 pixels of 7 mm in a 230 mm field of view: 33 pixels, the one added at the end.
  scan = phantom.generate_scan(36, (2, 32, 32), spacing_mm=(10.0, 7.0, 7.0), subtypes=())
  square = predict.square_field_of_view(scan.volume, 230.0)
  assert square.hu.shape == (2, 33, 33)
  assert predict.square_starts(scan.volume, 230.0) == (0, 0)
  assert (square.hu[:, :32, :32] == scan.volume.hu).all()
  assert (square.hu[:, 32, :] == AIR_HU).all()


# ---------------------------------------------------------------- Batches ---


@pytest.fixture(scope="module")
def nifti_scan(tmp_path_factory):
  folder = tmp_path_factory.mktemp("nifti")
  scan = phantom.generate_scan(35, (9, 40, 40), spacing_mm=(9.0, 6.0, 6.0))
  image, _ = phantom.write_nifti(scan, folder / "head.nii.gz", folder / "truth.nii.gz")
  return image


def _read_summary(path):
  with path.open(newline="", encoding="utf-8") as file:
    return list(csv.DictReader(file))


def _count_restores(monkeypatch):
  calls = []
  restore_model = checkpoint.restore_model

  def counting(*args, **kwargs):
    calls.append(args[0])
    return restore_model(*args, **kwargs)

  monkeypatch.setattr(checkpoint, "restore_model", counting)
  return calls


def _all_paths(folder):
  return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# The two batch tests took 24 to 38 s together on 2 shared CPU cores with a warm JAX
# cache, on top of the `runs` fixture.
@pytest.mark.slow
def test_batch_csv_summary_and_restart(runs, study_folder, nifti_scan, tmp_path, monkeypatch):
  multitask_dir, _ = runs
  work = tmp_path / "work"
  work.mkdir()
  table = work / "studies.csv"
  # Hostile ids: the outputs must still land in OUT/<safe id>/.
  table.write_text(
      "input,id\n"
      f"{study_folder},../../escaped study\n"
      f"{nifti_scan},名前/../x\n"
      "missing_folder,missing\n",
      encoding="utf-8",
  )
  studies = batch.studies_from_csv(table)
  dicom_id, nifti_id, missing_id = (study.folder for study in studies)
  out = work / "out"
  restores = _count_restores(monkeypatch)

  assert cli.main(["predict", str(table), f"--checkpoint={multitask_dir}", f"--output={out}"]) == 1
  assert restores == [multitask_dir]  # Restored once for the whole batch.
  assert sorted(path.name for path in work.iterdir()) == ["out", "studies.csv"]
  assert sorted(path.name for path in out.iterdir()) == sorted(
      [dicom_id, nifti_id, batch.SUMMARY_FILE]
  )
  for study_id in (dicom_id, nifti_id):
    written = {path.name for path in (out / study_id).iterdir()}
    assert written >= {"overview.png", "report.json", "segmentation.nii.gz"}

  rows = _read_summary(out / batch.SUMMARY_FILE)
  assert [row["id"] for row in rows] == ["../../escaped study", "名前/../x", "missing"]
  assert [row["folder"] for row in rows] == [dicom_id, nifti_id, missing_id]
  assert list(rows[0]) == list(batch.SUMMARY_COLUMNS)
  assert [row["status"] for row in rows] == ["ok", "ok", "failed"]
  assert "missing_folder does not exist" in rows[2]["error"]
  assert rows[2]["any_probability"] == ""
  dicom_report = json.loads((out / dicom_id / "report.json").read_text())
  for row in rows[:2]:
    report = json.loads((out / row["folder"] / "report.json").read_text())
    assert row["error"] == ""
    assert float(row["any_probability"]) == pytest.approx(
        report["scan"]["any"]["max_probability"], abs=1e-4
    )
    assert float(row["blood_ml"]) == pytest.approx(
        report["segmentation"]["volume_ml"]["any"], abs=0.01
    )
    positive = [name for name in report["labels"] if report["scan"][name]["positive"]]
    assert row["positive_labels"] == ";".join(positive)
    assert row["aggregator_positive_labels"] == ""
    assert float(row["seconds"]) > 0.0

  # The DICOM study is the four-series folder: the 5 mm axial series was read.
  choice = dicom_report["series_choice"]
  assert choice["chosen_by"] == "rule"
  assert dicom_report["shape"][0] == 10
  assert rows[0]["series_uid"] == choice["chosen"]["series_uid"]
  assert len(choice["series_candidates"]) == 3
  assert json.loads((out / nifti_id / "report.json").read_text())["series_choice"] is None

  # Restart. The NIfTI study lost its report.json, as a folder from an older
  # run might, and a crash left a partial folder for it. The missing folder
  # now exists.
  finished = (out / dicom_id / "report.json").stat().st_mtime_ns
  (out / nifti_id / "report.json").unlink()
  (out / f"{batch.PARTIAL_PREFIX}{nifti_id}").mkdir()
  (out / f"{batch.PARTIAL_PREFIX}{nifti_id}" / "overview.png").write_bytes(b"half")
  phantom.write_dicom(
      phantom.generate_scan(36, (4, 32, 32), spacing_mm=(10.0, 7.0, 7.0)), work / "missing_folder"
  )
  restores.clear()
  result = batch.run_batch(multitask_dir, studies, out, progress=False)
  assert restores == [multitask_dir]
  assert result.skipped == 1
  assert result.failed == 0
  assert (out / dicom_id / "report.json").stat().st_mtime_ns == finished
  assert (out / nifti_id / "report.json").is_file()
  assert not list(out.glob(f"{batch.PARTIAL_PREFIX}*"))
  rows = _read_summary(out / batch.SUMMARY_FILE)
  assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
  assert [row["id"] for row in rows] == ["../../escaped study", "名前/../x", "missing"]
  assert rows[0]["any_probability"] == f"{dicom_report['scan']['any']['max_probability']:.4f}"

  # Everything finished: nothing is restored or predicted.
  restores.clear()
  result = batch.run_batch(multitask_dir, studies, out, progress=False)
  assert restores == []
  assert result.skipped == 3


@pytest.mark.slow
def test_batch_folder_tree_with_aggregator(runs, study_folder, nifti_scan, tmp_path, monkeypatch,
                                           capsys):
  multitask_dir, aggregator_dir = runs
  root = tmp_path / "tree"
  (root / "ward").mkdir(parents=True)
  os.symlink(study_folder, root / "ward" / "patient 1")
  os.symlink(nifti_scan, root / "patient2.nii.gz")
  out = tmp_path / "out"
  restores = _count_restores(monkeypatch)
  rc = cli.main([
      "predict", str(root), "--batch", f"--checkpoint={multitask_dir}",
      f"--aggregator={aggregator_dir}", f"--output={out}",
  ])
  assert rc == 0
  assert "2 studies: 2 ok (0 finished before), 0 failed" in capsys.readouterr().out
  assert restores == [multitask_dir, aggregator_dir]
  rows = _read_summary(out / batch.SUMMARY_FILE)
  assert [row["id"] for row in rows] == ["patient2", "ward__patient 1"]
  assert [row["folder"] for row in rows] == ["patient2", batch.safe_study_id("ward__patient 1")]
  for row in rows:
    report = json.loads((out / row["folder"] / "report.json").read_text())
    aggregator = report["aggregator"]
    positive = [name for name in aggregator["labels"] if aggregator["scan"][name]["positive"]]
    assert row["aggregator_positive_labels"] == ";".join(positive)
  assert json.loads((out / rows[1]["folder"] / "report.json").read_text())["shape"][0] == 10


@pytest.mark.slow
def test_batch_max_voxels_fails_large_study(runs, nifti_scan, tmp_path):
  multitask_dir, _ = runs
  small = tmp_path / "small"
  phantom.write_dicom(phantom.generate_scan(37, (4, 32, 32), spacing_mm=(10.0, 7.0, 7.0)), small)
  table = tmp_path / "studies.csv"
  table.write_text(f"input,id\n{nifti_scan},large\n{small},small\n")
  out = tmp_path / "out"
  # The NIfTI study has 9 x 40 x 40 = 14,400 voxels, the DICOM one 4 x 32 x 32 = 4,096.
  result = batch.run_batch(
      multitask_dir, batch.studies_from_csv(table), out, progress=False, max_voxels=10_000
  )
  assert result.failed == 1
  large, small_row = _read_summary(out / batch.SUMMARY_FILE)
  assert large["status"] == "failed"
  assert large["error"].startswith(f"PredictError: {nifti_scan}: header shape")
  assert "14,400 voxels, more than the 10,000 accepted (set by --max-voxels)" in large["error"]
  assert not (out / "large").exists()
  assert small_row["status"] == "ok"


def test_batch_rejects_series_flag(tmp_path, capsys):
  table = tmp_path / "studies.csv"
  table.write_text("input\nscan.nii.gz\n")
  rc = cli.main([
      "predict", str(table), "--checkpoint=run", f"--output={tmp_path}", "--series-uid=1.2.3"
  ])
  assert rc == 2
  assert "CSV column `series_uid`" in capsys.readouterr().err
