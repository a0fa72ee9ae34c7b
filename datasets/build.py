"""`uem-ich build-dataset`: build a project TFDS dataset as array_record.

TFDS's own `tfds build` command imports TensorFlow when it starts; this one
imports only the builder module, so it works where TensorFlow is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pathlib
import pkgutil
import sys
import tempfile
import time

import tensorflow_datasets as tfds

import uem_ich_jax.datasets
from uem_ich_jax.datasets import common
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)


class DatasetBuildError(InputError):
  """A dataset name or config that cannot be built; the message names it and the reason."""


@dataclasses.dataclass(frozen=True)
class BuiltConfig:
  """Output folder, per-split example counts and build time of one config."""

  name: str
  data_dir: str
  num_examples: dict[str, int]
  seconds: float


def known_datasets() -> list[str]:
  """Names of the builder packages under `uem_ich_jax.datasets`."""
  return sorted(
      module.name
      for module in pkgutil.iter_modules(uem_ich_jax.datasets.__path__)
      if module.ispkg
  )


def _builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
  known = known_datasets()
  if name not in known:
    raise DatasetBuildError(
        f"unknown dataset {name!r}; known datasets: {', '.join(known) or 'none'}"
    )
  # Importing the package registers its builder with TFDS.
  importlib.import_module(f"uem_ich_jax.datasets.{name}")
  try:
    return tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DatasetBuildError(
        f"package uem_ich_jax.datasets.{name} registers no TFDS builder named {name!r}"
    ) from error


def _config_names(
    builder_class: type[tfds.core.DatasetBuilder], config: str | None
) -> list[str | None]:
  """Config names to build: the one requested, or the builder's default set.

  A builder may list `DEFAULT_BUILD_CONFIGS` to leave large variants out of a
  build that names no config; without it every config is built.
  """
  available = [c.name for c in builder_class.BUILDER_CONFIGS]
  if config is not None:
    if config not in available:
      raise DatasetBuildError(
          f"dataset {builder_class.name!r} has no config {config!r};"
          f" available configs: {', '.join(available) or 'none'}"
      )
    return [config]
  if not available:
    return [None]
  return list(getattr(builder_class, "DEFAULT_BUILD_CONFIGS", available))


def _check_writable(data_dir: str) -> None:
  """Fail before any work when `data_dir` cannot be created or written."""
  path = pathlib.Path(data_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise DatasetBuildError(
        f"data dir {data_dir} is not a writable folder ({error.strerror or error});"
        " pass another --data-dir"
    ) from error


# Lines of a builder's MANUAL_DOWNLOAD_INSTRUCTIONS quoted in a manual-dir error.
INSTRUCTION_LINES = 4


def _instructions_start(builder_class: type[tfds.core.DatasetBuilder]) -> str:
  """Return the first non-empty lines of the builder's manual download instructions."""
  text = builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS or ""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  quoted = "\n".join(f"  {line}" for line in lines[:INSTRUCTION_LINES])
  more = "\n  ..." if len(lines) > INSTRUCTION_LINES else ""
  return f"Manual download instructions of {builder_class.name}:\n{quoted}{more}"


def _check_manual_dir(
    builder_class: type[tfds.core.DatasetBuilder], label: str, manual_dir: str | None
) -> None:
  """Fail before any work when a manual-download dataset has no usable manual dir.

  TFDS itself raises a bare AssertionError in that case, deep in the build.
  """
  if not builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return
  if manual_dir is None:
    problem = "needs the release downloaded by hand; pass its folder as --manual-dir"
  elif not pathlib.Path(manual_dir).is_dir():
    problem = f"manual dir {manual_dir} does not exist or is not a folder"
  elif not any(pathlib.Path(manual_dir).iterdir()):
    problem = f"manual dir {manual_dir} is empty"
  else:
    return
  raise DatasetBuildError(f"{label}: {problem}.\n{_instructions_start(builder_class)}")


def beam_download_options(
    runner: str | None = None, options: list[str] | None = None
) -> dict:
  """Return the DownloadConfig keywords that run Beam-based builders, or {} without Beam.

  Without explicit options, TFDS prints a "no beam_runner" warning and Beam
  parses `sys.argv` (here the `uem-ich` command line) as pipeline options.
  `options` are Beam pipeline flags such as `--direct_num_workers=2`; the
  runner defaults to DirectRunner (one machine).
  """
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  except ImportError:
    if runner or options:
      raise DatasetBuildError(
          "a Beam runner or Beam options were given, but apache_beam is not installed;"
          " install the beam extra: pip install -e '.[beam]'"
      ) from None
    return {}
  return {
      "beam_runner": runner or "DirectRunner",
      "beam_options": pipeline_options.PipelineOptions(flags=list(options or [])),
  }


def build_dataset(
    name: str,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    config: str | None = None,
    beam_runner: str | None = None,
    beam_options: list[str] | None = None,
) -> list[BuiltConfig]:
  """Build dataset `name` (one config, or its default set) as array_record.

  Prints the output folder and example counts of each config to stdout. The
  TFDS progress bars are shown when stderr is a terminal and turned off
  otherwise, so that logs get one line per config instead. Builders that
  generate with Apache Beam (rsna_ich, when apache_beam is installed) run on
  `beam_runner` (DirectRunner by default) with the pipeline flags
  `beam_options`, never with flags parsed from `sys.argv`.

  Raises:
    DatasetBuildError: `name` or `config` is unknown, `data_dir` cannot be
      written, the manual dir of a manual-download dataset is missing, empty
      or does not contain the release, or Beam settings are given without
      apache_beam.
  """
  builder_class = _builder_class(name)
  config_names = _config_names(builder_class, config)

  if sys.stderr.isatty():
    tfds.enable_progress_bar()
  else:
    tfds.disable_progress_bar()

  _check_writable(data_dir)
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir, **beam_download_options(beam_runner, beam_options)
  )
  results = []
  for config_name in config_names:
    label = name if config_name is None else f"{name}/{config_name}"
    logger.info("building %s into %s", label, data_dir)
    start = time.perf_counter()
    builder = tfds.builder(
        label, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD
    )
    if not builder.is_prepared():
      _check_manual_dir(builder_class, label, manual_dir)
    try:
      builder.download_and_prepare(download_config=download_config)
    except common.ReleaseNotFoundError as error:
      raise DatasetBuildError(
          f"{label}: manual dir {manual_dir} does not contain the release: {error}\n"
          f"{_instructions_start(builder_class)}"
      ) from error
    except OSError as error:
      raise DatasetBuildError(f"building {label} into {data_dir} failed: {error}") from error
    seconds = time.perf_counter() - start

    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    results.append(
        BuiltConfig(
            name=label, data_dir=str(builder.data_dir), num_examples=counts, seconds=seconds
        )
    )
    count_text = ", ".join(f"{split}: {count}" for split, count in counts.items())
    print(f"{label}: {builder.data_dir} ({count_text} examples, {seconds:.1f} s)")
  return results
