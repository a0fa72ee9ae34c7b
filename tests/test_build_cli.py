"""`uem-ich build-dataset` on the real-dataset builders: manual-dir errors and Beam settings."""

import logging
import pathlib
import shutil
import sys

import pytest

from uem_ich_jax import cli
from uem_ich_jax.datasets import build

REAL_DATASETS = ("bhsd", "cq500", "physionet_ct_ich", "rsna_ich")


def _first_instruction_line(name):
  text = build._builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS
  return next(line.strip() for line in text.splitlines() if line.strip())


def _beam_installed():
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


@pytest.mark.parametrize("name", REAL_DATASETS)
def test_no_manual_dir_raises(name, tmp_path):
  with pytest.raises(build.DatasetBuildError) as raised:
    build.build_dataset(name, data_dir=str(tmp_path / "out"))
  message = str(raised.value)
  assert message.startswith(f"{name}/")
  assert "--manual-dir" in message
  assert _first_instruction_line(name) in message


@pytest.mark.parametrize("name", REAL_DATASETS)
def test_missing_manual_dir_raises(name, tmp_path):
  missing = tmp_path / "no_such_folder"
  with pytest.raises(build.DatasetBuildError, match="does not exist") as raised:
    build.build_dataset(name, data_dir=str(tmp_path / "out"), manual_dir=str(missing))
  assert str(missing) in str(raised.value)
  assert _first_instruction_line(name) in str(raised.value)


@pytest.mark.parametrize("name", REAL_DATASETS)
def test_empty_manual_dir_raises(name, tmp_path):
  empty = tmp_path / "manual"
  empty.mkdir()
  with pytest.raises(build.DatasetBuildError, match="is empty") as raised:
    build.build_dataset(name, data_dir=str(tmp_path / "out"), manual_dir=str(empty))
  assert str(empty) in str(raised.value)


@pytest.mark.parametrize("name", REAL_DATASETS)
def test_manual_dir_without_release_raises(name, tmp_path):
  manual = tmp_path / "manual"
  (manual / "unrelated").mkdir(parents=True)
  (manual / "notes.txt").write_text("not a release\n")
  with pytest.raises(build.DatasetBuildError, match="does not contain the release") as raised:
    build.build_dataset(name, data_dir=str(tmp_path / "out"), manual_dir=str(manual))
  message = str(raised.value)
  assert message.startswith(f"{name}/")
  assert str(manual) in message
  assert _first_instruction_line(name) in message


def test_cli_missing_manual_dir_no_traceback(tmp_path, capsys):
  status = cli.main([
      "build-dataset", "physionet_ct_ich", "--data-dir", str(tmp_path / "out"),
      "--manual-dir", str(tmp_path / "no_such_folder"), "--config", "slices",
  ])
  assert status == 2
  error = capsys.readouterr().err
  assert error.startswith("error: physionet_ct_ich/slices: manual dir")
  assert "Traceback" not in error
  assert "physionet.org" in error


def test_instructions_quoted_whole():
  text = build._instructions(build._builder_class("rsna_ich"))
  lines = text.splitlines()
  assert lines[0] == "Manual download instructions of rsna_ich:"
  assert lines[1].strip().startswith("Accept the competition rules")
  # The layout comes after the first lines and must be shown.
  assert any(line.strip().startswith("stage_2_train/ID_") for line in lines)
  assert lines[-1].strip().startswith("test images and the sample submission")


PHYSIONET_DUMMY = pathlib.Path(__file__).resolve().parents[1] / "datasets" / "physionet_ct_ich" / "dummy_data"
BHSD_DUMMY = pathlib.Path(__file__).resolve().parents[1] / "datasets" / "bhsd" / "dummy_data"


def test_name_with_config_accepted(tmp_path, capsys):
  results = build.build_dataset(
      "physionet_ct_ich/slices", data_dir=str(tmp_path), manual_dir=str(PHYSIONET_DUMMY)
  )
  assert [result.name for result in results] == ["physionet_ct_ich/slices"]
  with pytest.raises(build.DatasetBuildError, match="give one of them"):
    build.build_dataset(
        "physionet_ct_ich/slices", data_dir=str(tmp_path), config="scans",
        manual_dir=str(PHYSIONET_DUMMY),
    )


def test_existing_build_reused_with_notice(tmp_path, capsys):
  arguments = dict(data_dir=str(tmp_path), manual_dir=str(PHYSIONET_DUMMY))
  first = build.build_dataset("physionet_ct_ich/slices", **arguments)
  capsys.readouterr()
  second = build.build_dataset("physionet_ct_ich/slices", **arguments)
  output = capsys.readouterr().out
  assert "reusing the existing build" in output
  assert "--overwrite" in output
  assert second[0].num_examples == first[0].num_examples


def test_overwrite_deletes_only_that_config(tmp_path, capsys):
  arguments = dict(data_dir=str(tmp_path), manual_dir=str(PHYSIONET_DUMMY))
  build.build_dataset("physionet_ct_ich/slices", **arguments)
  other = tmp_path / "physionet_ct_ich" / "scans" / "keep.txt"
  other.parent.mkdir(parents=True)
  other.write_text("untouched\n")
  marker = pathlib.Path(build.build_dataset("physionet_ct_ich/slices", **arguments)[0].data_dir)
  (marker / "old_file").write_text("from the first build\n")
  capsys.readouterr()
  results = build.build_dataset("physionet_ct_ich/slices", overwrite=True, **arguments)
  assert "reusing" not in capsys.readouterr().out
  assert results[0].num_examples["train"] > 0
  assert not (marker / "old_file").exists()
  assert other.read_text() == "untouched\n"


def test_stale_incomplete_folder_removed(tmp_path):
  stale = tmp_path / "physionet_ct_ich" / "slices" / "incomplete.ABC123_1.0.0"
  stale.mkdir(parents=True)
  (stale / "part").write_text("left by a killed build\n")
  build.build_dataset(
      "physionet_ct_ich/slices", data_dir=str(tmp_path), manual_dir=str(PHYSIONET_DUMMY)
  )
  assert not stale.exists()


def test_no_usable_scan_clean_error(tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(PHYSIONET_DUMMY, manual)
  for path in manual.glob("*/ct_scans/*.nii"):
    path.write_bytes(b"not a NIfTI file")
  with pytest.raises(build.DatasetBuildError) as raised:
    build.build_dataset("physionet_ct_ich/slices", data_dir=str(tmp_path / "out"), manual_dir=str(manual))
  message = str(raised.value)
  assert message.startswith("physionet_ct_ich/slices: ")
  assert "no usable examples" in message
  assert "files left out" in message


def test_config_without_source_folder_skipped(tmp_path, capsys):
  manual = tmp_path / "manual"
  shutil.copytree(BHSD_DUMMY / "label_192", manual / "label_192")
  shutil.copy(BHSD_DUMMY / "dataset.json", manual / "dataset.json")
  results = build.build_dataset("bhsd", data_dir=str(tmp_path / "out"), manual_dir=str(manual))
  assert [result.name for result in results] == ["bhsd/slices", "bhsd/scans"]
  assert "bhsd/case_scans: skipped, no MBH_Train_2025_case-label/ folder" in capsys.readouterr().out
  # Named explicitly, the config is built and fails with a clean error.
  with pytest.raises(build.DatasetBuildError, match="bhsd/case_scans: .*no usable examples"):
    build.build_dataset(
        "bhsd/case_scans", data_dir=str(tmp_path / "out"), manual_dir=str(manual)
    )


def test_cli_help_lists_datasets_and_configs(capsys):
  with pytest.raises(SystemExit):
    cli.main(["build-dataset", "--help"])
  output = capsys.readouterr().out
  for name in REAL_DATASETS:
    assert f"  {name} (needs --manual-dir): " in output
  assert "bhsd (needs --manual-dir): slices*, scans*, case_scans*" in output
  assert "--overwrite" in output


@pytest.mark.skipif(_beam_installed(), reason="checks the behaviour without apache_beam")
def test_beam_options_without_beam():
  assert build.beam_download_options() == {}
  with pytest.raises(build.DatasetBuildError, match="beam extra"):
    build.beam_download_options(runner="DirectRunner")
  with pytest.raises(build.DatasetBuildError, match="beam extra"):
    build.beam_download_options(options=["--direct_num_workers=2"])


@pytest.mark.skipif(not _beam_installed(), reason="apache_beam is not installed (beam extra)")
def test_beam_options_ignore_sys_argv(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["uem-ich", "build-dataset", "--job_name=from-argv"])
  settings = build.beam_download_options(options=["--direct_num_workers=2"])
  assert settings["beam_runner"] == "DirectRunner"
  options = settings["beam_options"].get_all_options()
  assert options["direct_num_workers"] == 2
  assert options["job_name"] is None


@pytest.mark.skipif(not _beam_installed(), reason="apache_beam is not installed (beam extra)")
def test_beam_build_without_runner_warning(tmp_path, monkeypatch, caplog):
  from uem_ich_jax.datasets.rsna_ich import make_dummy_data  # pylint: disable=import-outside-toplevel

  manual = tmp_path / "manual"
  make_dummy_data.write_dummy_data(manual)
  # Beam must not read the command line: an unknown flag there would fail it.
  monkeypatch.setattr(sys, "argv", ["uem-ich", "build-dataset", "--not_a_beam_flag=1"])
  with caplog.at_level(logging.WARNING):
    results = build.build_dataset(
        "rsna_ich", data_dir=str(tmp_path / "out"), manual_dir=str(manual), config="scans"
    )
  assert results[0].num_examples["train"] > 0
  assert "beam_runner" not in caplog.text
