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


def build_dataset(
    name: str,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    config: str | None = None,
) -> list[BuiltConfig]:
  """Build dataset `name` (one config, or its default set) as array_record.

  Prints the output folder and example counts of each config to stdout. The
  TFDS progress bars are shown when stderr is a terminal and turned off
  otherwise, so that logs get one line per config instead.

  Raises:
    DatasetBuildError: `name` or `config` is unknown, or `data_dir` cannot be
      written.
  """
  builder_class = _builder_class(name)
  config_names = _config_names(builder_class, config)

  if sys.stderr.isatty():
    tfds.enable_progress_bar()
  else:
    tfds.disable_progress_bar()

  _check_writable(data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  results = []
  for config_name in config_names:
    label = name if config_name is None else f"{name}/{config_name}"
    logger.info("building %s into %s", label, data_dir)
    start = time.perf_counter()
    builder = tfds.builder(
        label, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD
    )
    try:
      builder.download_and_prepare(download_config=download_config)
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
