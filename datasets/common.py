"""Parts shared by the dataset builders: patient folds, the bad-file report and feature specs.

Every builder stores examples in generation order (`disable_shuffling=True`),
with increasing integer keys, so that example i of a split is key i. It then
records per-example folds as ranges in the dataset metadata (`fold_ranges`),
which lets the grain pipeline pick folds without decoding examples.

Files that cannot be read are never dropped in silence or replaced by zeros:
the builder adds them to a `BuildReport`, keeps going, logs the report at the
end and stores it in the metadata under `bad_files`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

# Bad files listed one by one in the metadata. Beyond this number only the
# counts per reason are kept, so that a broken release cannot blow up
# dataset_info.json.
MAX_LISTED_BAD_FILES = 1000

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ReleaseNotFoundError(InputError):
  """The manual dir does not contain the release's top-level parts (folders, label CSV).

  `uem-ich build-dataset` adds the builder's manual download instructions to
  the message.
  """


class NoExamplesError(InputError):
  """A build in which every example was left out; the message lists the reasons by count.

  TFDS itself would stop with a bare AssertionError ("No examples were
  yielded").
  """


def raise_if_no_examples(num_written: int, report: "BuildReport") -> None:
  """Raise `NoExamplesError` when nothing was written, with the report's counts per reason."""
  if num_written:
    return
  report.log()
  raise NoExamplesError(
      f"{report.dataset}: no usable examples; every input was left out or none was found."
      f" The reasons, by count, follow (each file is listed in the log above):\n"
      f"{report.summary()}"
  )


def split_nifti_suffix(file_name: str) -> tuple[str, bool]:
  """Return the file name without `.nii.gz` or `.nii` (any case), and whether it had one."""
  lowered = file_name.lower()
  for suffix in NIFTI_SUFFIXES:
    if lowered.endswith(suffix):
      return file_name[: -len(suffix)], True
  return file_name, False


def find_file_ignoring_case(folder: pathlib.Path, name: str) -> pathlib.Path | None:
  """Return the file in `folder` whose name equals `name` ignoring case, or None.

  Raises:
    InputError: several files match, for example `Reads.csv` and `reads.csv`.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return None
  matches = sorted(
      path for path in folder.iterdir() if path.is_file() and path.name.lower() == name.lower()
  )
  if len(matches) > 1:
    raise InputError(
        f"{folder} contains several files named {name} (ignoring case), so the file is"
        f" ambiguous: {', '.join(path.name for path in matches)}; keep one"
    )
  return matches[0] if matches else None


def patient_folds(patient_ids: Iterable[str], num_folds: int, seed: int = 0) -> dict[str, int]:
  """Assign every patient to one of `num_folds` folds.

  The sorted unique ids are permuted with `seed`, and patient j of the
  permutation goes to fold j mod k. So fold sizes differ by at most one
  patient, and the order in which files were found does not matter. All scans
  of a patient share its fold.
  """
  if num_folds < 1:
    raise ValueError(f"num_folds must be at least 1, got {num_folds}")
  patients = sorted(set(patient_ids))
  order = np.random.default_rng(seed).permutation(len(patients))
  return {patients[index]: int(rank % num_folds) for rank, index in enumerate(order)}


def fold_ranges(folds: Iterable[int]) -> list[list[int]]:
  """Run-length encode per-example folds as [start, stop, fold] rows."""
  ranges: list[list[int]] = []
  for index, fold in enumerate(folds):
    if ranges and ranges[-1][2] == fold and ranges[-1][1] == index:
      ranges[-1][1] = index + 1
    else:
      ranges.append([index, index + 1, int(fold)])
  return ranges


@dataclasses.dataclass(frozen=True)
class BadFile:
  """One file left out of the build, or kept with a caveat, and why."""

  path: str
  reason: str
  kept: bool = False


class BuildReport:
  """Collects the bad and odd files of one build.

  `skip` records a file left out, because it cannot be read or its labels are
  inconsistent. `note` records a file kept but odd, for example an all-zero
  mask of a case labelled positive. Reasons should be short and fixed, with
  the detail after a colon ("unreadable DICOM: truncated PixelData"), because
  the summary counts the text before the first colon.
  """

  def __init__(self, dataset: str):
    self.dataset = dataset
    self.entries: list[BadFile] = []

  def skip(self, path: str, reason: str) -> None:
    self.entries.append(BadFile(str(path), reason, kept=False))
    logger.warning("%s: leaving out %s: %s", self.dataset, path, reason)

  def note(self, path: str, reason: str) -> None:
    self.entries.append(BadFile(str(path), reason, kept=True))
    logger.warning("%s: keeping odd file %s: %s", self.dataset, path, reason)

  @property
  def skipped(self) -> list[BadFile]:
    return [entry for entry in self.entries if not entry.kept]

  def counts(self) -> dict[str, int]:
    """Number of entries per reason (the text before the first colon)."""
    return dict(collections.Counter(entry.reason.split(":")[0] for entry in self.entries))

  def summary(self) -> str:
    if not self.entries:
      return f"{self.dataset}: no bad or odd files"
    kept = len(self.entries) - len(self.skipped)
    lines = [
        f"{self.dataset}: {len(self.skipped)} files left out, {kept} odd files kept",
        *(f"  {count} x {reason}" for reason, count in sorted(self.counts().items())),
    ]
    return "\n".join(lines)

  def to_metadata(self) -> dict:
    """Return the report as JSON-ready values for `DatasetInfo.metadata['bad_files']`."""
    return {
        "skipped": len(self.skipped),
        "kept": len(self.entries) - len(self.skipped),
        "counts": self.counts(),
        "files": [dataclasses.asdict(entry) for entry in self.entries[:MAX_LISTED_BAD_FILES]],
        "listed_all": len(self.entries) <= MAX_LISTED_BAD_FILES,
    }

  def log(self) -> None:
    """Log the summary: a warning when files were left out or noted, else info."""
    (logger.warning if self.entries else logger.info)(self.summary())


def store_build_metadata(
    metadata: dict, *, num_folds: int, folds: Sequence[int], report: BuildReport
) -> None:
  """Store `num_folds`, `fold_ranges` and `bad_files` of a one-split (train) build and log the report.

  `folds` are the folds of the examples written, in key order. Call this when
  the example generator is exhausted: TFDS writes the metadata after that, so
  the ranges describe what was stored, not what was planned.

  Raises:
    NoExamplesError: `folds` is empty, so the build wrote nothing.
  """
  raise_if_no_examples(len(folds), report)
  metadata["num_folds"] = int(num_folds)
  metadata["fold_ranges"] = {"train": fold_ranges(folds)}
  metadata["bad_files"] = report.to_metadata()
  report.log()


def square_inplane(
    volume: ct.CTVolume, mask: np.ndarray | None, image_size: int
) -> tuple[ct.CTVolume, np.ndarray | None]:
  """Pad the slices to a square field of view, then resize them to `image_size` pixels.

  Unlike the upstream's plain resize, this keeps the aspect ratio. Rows or
  columns of air (mask 0) are added on both sides until the slice is square,
  and the affine and positions move to match. Then `ct.resize_inplane` changes
  the pixel size, and the mask follows by nearest neighbour.
  """
  slices, rows, columns = volume.shape
  if mask is not None and mask.shape != volume.shape:
    raise ValueError(f"mask shape {mask.shape} differs from the volume shape {volume.shape}")
  side = max(rows, columns)
  before_rows, before_columns = (side - rows) // 2, (side - columns) // 2
  if side != rows or side != columns:
    pad = ((0, 0), (before_rows, side - rows - before_rows),
           (before_columns, side - columns - before_columns))
    hu = np.pad(np.asarray(volume.hu, np.float32), pad, constant_values=ct.AIR_HU)
    affine = np.asarray(volume.affine, np.float64).copy()
    shift = -(before_rows * affine[:3, 1] + before_columns * affine[:3, 2])
    affine[:3, 3] += shift
    volume = dataclasses.replace(
        volume, hu=hu, affine=affine, positions=np.asarray(volume.positions) + shift
    )
    if mask is not None:
      mask = np.pad(mask, pad)
  if side != image_size:
    volume = ct.resize_inplane(volume, (image_size, image_size))
    if mask is not None:
      mask = ct.resize_mask_inplane(mask, (image_size, image_size))
  return volume, mask


def image_feature(shape: tuple[int | None, ...]) -> tfds.features.Tensor:
  """Return a uint8 image or mask feature, zlib-compressed, coded in numpy (no TensorFlow)."""
  return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)


def slice_features(image_size: int, *, mask: bool, extra: dict | None = None) -> dict:
  """Features of a slice-level example, shared by every builder.

  - image: the three windows (brain, subdural, bone) as uint8, see
    `uem_ich_jax.ct.windows_uint8`.
  - labels: the six slice labels in `uem_ich_jax.SLICE_LABELS` order.
  - affine: the scan's map from (slice, row, column) to LPS mm; this slice is
    `slice_index`.
  """
  features = {
      "image": image_feature((image_size, image_size, 3)),
      "labels": tfds.features.Tensor(shape=(len(uem_ich_jax.SLICE_LABELS),), dtype=np.uint8),
      "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
      "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
      "slice_index": np.int32,
      "scan_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "fold": np.int32,
  }
  if mask:
    features["mask"] = image_feature((image_size, image_size))
  features.update(extra or {})
  return features


def scan_features(image_size: int, *, mask: bool, extra: dict | None = None) -> dict:
  """Features of a scan-level example (any number of slices), shared by every builder.

  labels: scan labels in `uem_ich_jax.SLICE_LABELS` order; slice_labels: the
  same per slice where the dataset has them (builders without slice labels
  leave the feature out).
  """
  features = {
      "image": image_feature((None, image_size, image_size, 3)),
      "labels": tfds.features.Tensor(shape=(len(uem_ich_jax.SLICE_LABELS),), dtype=np.uint8),
      "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
      "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
      "scan_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "fold": np.int32,
  }
  if mask:
    features["mask"] = image_feature((None, image_size, image_size))
  features.update(extra or {})
  return features
