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
import shutil
import sys
import tempfile
import textwrap
import time

import tensorflow_datasets as tfds

import uem_ich_jax.datasets
from uem_ich_jax.datasets import common
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)


class _FreshBuildFilter(logging.Filter):
  """Drop TFDS's "Variant folder ... has no dataset_info.json", logged for every config not built yet."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Variant folder") and "has no dataset_info.json" in message)


logging.getLogger("absl").addFilter(_FreshBuildFilter())


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


def split_name(name: str, config: str | None) -> tuple[str, str | None]:
  """Split `NAME/CONFIG` into its parts; a plain name keeps `config`.

  Raises:
    DatasetBuildError: the name contains a config and `config` names another.
  """
  if "/" not in name:
    return name, config
  dataset, _, named_config = name.partition("/")
  if config is not None and config != named_config:
    raise DatasetBuildError(
        f"{name} names config {named_config!r}, but --config is {config!r}; give one of them"
    )
  return dataset, named_config


def describe_datasets() -> str:
  """List every dataset with its configs (default ones marked), for `--help`."""
  lines = ["datasets and configs (NAME or NAME/CONFIG; * = built when --config is omitted):"]
  for name in known_datasets():
    try:
      builder_class = _builder_class(name)
    except (DatasetBuildError, ImportError) as error:
      lines.append(f"  {name}: cannot be loaded ({error})")
      continue
    available = [c.name for c in builder_class.BUILDER_CONFIGS]
    defaults = set(getattr(builder_class, "DEFAULT_BUILD_CONFIGS", available))
    configs = ", ".join(f"{c}*" if c in defaults else c for c in available) or "(none)"
    manual = " (needs --manual-dir)" if builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS else ""
    lines.append(f"  {name}{manual}: {configs}")
  return "\n".join(lines)


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


def _instructions(builder_class: type[tfds.core.DatasetBuilder]) -> str:
  """Return the builder's manual download instructions, whole, indented for an error message."""
  text = textwrap.dedent(builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS or "").strip("\n")
  quoted = "\n".join(f"  {line}" if line.strip() else "" for line in text.splitlines())
  return f"Manual download instructions of {builder_class.name}:\n{quoted}"


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
  raise DatasetBuildError(f"{label}: {problem}.\n{_instructions(builder_class)}")


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


def _remove_stale_incomplete(config_dir: pathlib.Path, version: str) -> None:
  """Delete `incomplete.*` folders that an interrupted build of this version left behind.

  TFDS writes into `incomplete.<random>_<version>/` and renames it when the
  build succeeds, so such a folder is the remains of a killed build.
  NOTE: a second build of the same config running at the same time would lose
  its folder, so building one config twice at once is not supported.
  """
  if not config_dir.is_dir():
    return
  for path in sorted(config_dir.glob(f"incomplete.*_{version}")):
    if path.is_dir():
      logger.warning("removing %s, left by an interrupted build", path)
      shutil.rmtree(path)


def _skipped_config(
    builder_class: type[tfds.core.DatasetBuilder], config_name: str | None, manual_dir: str | None
) -> str | None:
  """Return why a config has no input in the manual dir, for builders that can tell, else None."""
  check = getattr(builder_class, "missing_config_source", None)
  if check is None or config_name is None or manual_dir is None:
    return None
  if not pathlib.Path(manual_dir).is_dir():
    return None
  return check(pathlib.Path(manual_dir), config_name)


def build_dataset(
    name: str,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    config: str | None = None,
    beam_runner: str | None = None,
    beam_options: list[str] | None = None,
    overwrite: bool = False,
) -> list[BuiltConfig]:
  """Build dataset `name` (one config, or its default set) as array_record.

  `name` may be `NAME/CONFIG`. Prints the output folder and example counts of
  each config to stdout. A config already built in `data_dir` is reused, and
  the printed line states it, unless `overwrite` is set: then its version
  folder (`data_dir/NAME/CONFIG/VERSION`) is deleted and built again.
  Folders that an interrupted build left (`incomplete.*`) are deleted. With
  no config given, a config whose input folder is absent from the manual dir
  is skipped with a printed line, for builders that tell (bhsd). The TFDS
  progress bars are shown when stderr is a terminal and turned off otherwise,
  so that logs get one line per config instead. Builders that generate with
  Apache Beam (rsna_ich, when apache_beam is installed) run on `beam_runner`
  (DirectRunner by default) with the pipeline flags `beam_options`, never
  with flags parsed from `sys.argv`.

  Raises:
    DatasetBuildError: `name` or `config` is unknown, `data_dir` cannot be
      written, the manual dir of a manual-download dataset is missing, empty
      or does not contain the release, a config yields no usable example,
      or Beam settings are given without apache_beam.
  """
  name, config = split_name(name, config)
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
  skip_reasons = {}
  if config is None:
    skip_reasons = {
        config_name: _skipped_config(builder_class, config_name, manual_dir)
        for config_name in config_names
    }
    if all(skip_reasons.values()):
      # Nothing of the release is there, so the builder's own error reports it
      # with the instructions, instead of a list of skipped configs.
      skip_reasons = {}
  results = []
  for config_name in config_names:
    label = name if config_name is None else f"{name}/{config_name}"
    builder = tfds.builder(
        label, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD
    )
    if builder.is_prepared() and not overwrite:
      counts = {split: info.num_examples for split, info in builder.info.splits.items()}
      count_text = ", ".join(f"{split}: {count}" for split, count in counts.items())
      print(
          f"{label}: reusing the existing build in {builder.data_dir} ({count_text} examples);"
          " the manual dir was not read. Pass --overwrite to build it again."
      )
      results.append(BuiltConfig(label, str(builder.data_dir), counts, 0.0))
      continue
    if skip_reasons.get(config_name):
      print(f"{label}: skipped, {skip_reasons[config_name]}")
      continue
    _check_manual_dir(builder_class, label, manual_dir)
    if builder.is_prepared():
      logger.warning("deleting %s to build it again (--overwrite)", builder.data_dir)
      shutil.rmtree(builder.data_dir)
      builder = tfds.builder(
          label, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD
      )
    version_dir = pathlib.Path(builder.data_dir)
    _remove_stale_incomplete(version_dir.parent, version_dir.name)

    logger.info("building %s into %s", label, data_dir)
    start = time.perf_counter()
    try:
      builder.download_and_prepare(download_config=download_config)
    except common.ReleaseNotFoundError as error:
      raise DatasetBuildError(
          f"{label}: manual dir {manual_dir} does not contain the release: {error}\n"
          f"{_instructions(builder_class)}"
      ) from error
    except common.NoExamplesError as error:
      raise DatasetBuildError(f"{label}: {error}") from error
    except AssertionError as error:
      # TFDS's check of an empty split, for a builder that does not raise
      # NoExamplesError itself (for example a Beam pipeline).
      if "No examples were yielded" not in str(error):
        raise
      raise DatasetBuildError(
          f"{label}: no usable examples: every input was left out or none was found;"
          " the log above lists the files left out and why"
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
