"""`uem-ich build-dataset` on the real-dataset builders: manual-dir errors and Beam settings."""

import logging
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


def test_instructions_start_quotes_first_lines():
  text = build._instructions_start(build._builder_class("rsna_ich"))
  lines = text.splitlines()
  assert lines[0] == "Manual download instructions of rsna_ich:"
  assert len(lines) == build.INSTRUCTION_LINES + 2
  assert lines[1].strip().startswith("Accept the competition rules")
  assert lines[-1].strip() == "..."


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
