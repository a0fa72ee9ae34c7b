"""Finding DICOM image files under a path and grouping them by series from their headers.

Only headers are read here, never pixel data. Which files count as DICOM is
described in the docstring of `uem_ich_jax.ct.dicom`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import warnings as python_warnings
from collections.abc import Iterable, Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from uem_ich_jax.ct.volume import CTReadError

logger = logging.getLogger(__name__)

# File name suffixes that mark a DICOM file (compared in lower case).
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
_GZIP_MAGIC = b"\x1f\x8b"
# A file whose first bytes contain none of these control bytes is text.
_TEXT_CHECK_BYTES = 512
_CONTROL_BYTES = frozenset(set(range(32)) - {9, 10, 12, 13}) | {127}
# Reasons quoted in the error when no image is found.
_MAX_REASONS = 3

_HEADER_TAGS = (
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "Rows",
    "Columns",
    "SOPClassUID",
)


def walk_once(path: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
  """Walk `path` like `os.walk`, following links but entering each real folder once.

  A link back to a folder already walked (a loop, or two links to one folder)
  is skipped with everything below it. Callers may sort or prune the yielded
  folder list in place, as with `os.walk`.
  """
  visited = set()
  for root, folders, names in os.walk(path, followlinks=True):
    real_root = os.path.realpath(root)
    if real_root in visited:
      folders[:] = []
      continue
    visited.add(real_root)
    yield root, folders, names


def _candidate_files(path: pathlib.Path) -> list[pathlib.Path]:
  """List the regular files at or under `path`, following links and visiting each folder once.

  Named pipes, devices and dangling links are left out, because opening a pipe
  blocks until a writer appears.
  """
  if path.is_file():
    return [path]
  if not path.is_dir():
    if path.exists() or path.is_symlink():
      raise CTReadError(f"{path}: not a regular file or folder")
    raise CTReadError(f"{path}: no such file or folder")
  files = []
  for root, _, names in walk_once(path):
    for name in names:
      candidate = pathlib.Path(root) / name
      if candidate.is_file():
        files.append(candidate)
      else:
        logger.debug("%s: not a regular file, ignored", candidate)
  return sorted(files)


def _looks_like_dicom(path: pathlib.Path) -> bool:
  """Check whether a file without the DICM prefix was meant to be DICOM (see the `dicom` docstring).

  Text files (a README without suffix) are not, so the first bytes are read.
  """
  if path.name.startswith("."):
    return False
  suffix = path.suffix.lower()
  if not (suffix in _DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()):
    return False
  with path.open("rb") as file:
    head = file.read(_TEXT_CHECK_BYTES)
  is_text = bool(head) and not any(byte in _CONTROL_BYTES for byte in head)
  return not is_text


@dataclasses.dataclass
class _Scan:
  """What a header scan found: image files by series, and every file left out with why."""

  groups: dict[str, list[tuple[pathlib.Path, Dataset]]]
  examined: int = 0
  # "skipped FILE: reason" for damaged files that look like DICOM (also logged as warnings).
  warnings: list[str] = dataclasses.field(default_factory=list)
  # "FILE: reason" for files that are not DICOM images (logged at debug level).
  ignored: list[str] = dataclasses.field(default_factory=list)

  def skip(self, message: str) -> None:
    self.warnings.append(f"skipped {message}")
    logger.warning("skipped %s", message)

  def ignore(self, message: str) -> None:
    self.ignored.append(message)
    logger.debug("%s", message)

  def describe_failure(self, label: str) -> str:
    """Return the error for a scan that found no image, with counts and the first reasons."""
    reasons = [
        *(warning.removeprefix("skipped ") for warning in self.warnings), *self.ignored
    ][:_MAX_REASONS]
    message = (
        f"{label}: no DICOM images found among {self.examined} file(s): "
        f"{len(self.warnings)} damaged, {len(self.ignored)} not DICOM images"
    )
    if reasons:
      message += "; first reasons:\n  " + "\n  ".join(reasons)
    return message


def _header_without_preamble(path: pathlib.Path) -> Dataset | None:
  """Read a raw dataset (no preamble or file meta), or return None when it is no image."""
  try:
    with python_warnings.catch_warnings():
      # pydicom warns about the VR guesses it makes while forcing its way through.
      python_warnings.simplefilter("ignore")
      dataset = pydicom.dcmread(
          path, force=True, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS)
      )
  except Exception:  # pylint: disable=broad-except
    # Forced parsing of an arbitrary file can fail in any way, and then it is not DICOM.
    return None
  # Forced parsing of text or noise yields an empty dataset, or one without these.
  if "Rows" in dataset and "SOPClassUID" in dataset:
    return dataset
  return None


def _invalid_dicom_reason(path: pathlib.Path) -> str:
  with path.open("rb") as file:
    start = file.read(2)
  if not start:
    return "empty file (0 bytes)"
  if start == _GZIP_MAGIC:
    return "gzip-compressed, so decompress it first"
  return "not a DICOM file (no DICM prefix, and not a raw DICOM image dataset)"


def _sop_class(dataset: Dataset) -> UID | None:
  value = dataset.get("SOPClassUID") or getattr(dataset, "file_meta", {}).get(
      "MediaStorageSOPClassUID"
  )
  return UID(str(value)) if value else None


def _scan_file(path: pathlib.Path, scan: _Scan) -> None:
  try:
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
  except InvalidDicomError:
    try:
      if not _looks_like_dicom(path):
        scan.ignore(f"{path}: not a DICOM file, ignored")
        return
      header = _header_without_preamble(path)
      if header is None:
        scan.skip(f"{path}: {_invalid_dicom_reason(path)}")
        return
    except OSError as error:  # The file went away or became unreadable meanwhile.
      scan.skip(f"{path}: unreadable file ({error})")
      return
    logger.debug("%s: read without preamble and file meta information", path)
  # pydicom raises many exception types on a damaged header (EOFError,
  # struct.error, ValueError, ...), and a damaged file is reported, not fatal.
  except Exception as error:  # pylint: disable=broad-except
    scan.skip(f"{path}: unreadable DICOM header ({error})")
    return

  if "Rows" not in header:
    sop_class = _sop_class(header)
    if sop_class is not None and "Image Storage" not in sop_class.name:
      scan.ignore(f"{path}: DICOM {sop_class.name} file, not an image, ignored")
    else:
      # An image storage class (or none) without Rows: the header was cut short.
      scan.skip(
          f"{path}: DICOM {sop_class.name if sop_class else 'file'} without Rows "
          "(truncated or damaged header)"
      )
    return
  try:
    uid = str(header.get("SeriesInstanceUID", ""))
  except Exception as error:  # pylint: disable=broad-except
    scan.skip(f"{path}: invalid SeriesInstanceUID ({error})")
    return
  scan.groups.setdefault(uid, []).append((path, header))


def _scan_headers(files: Iterable[pathlib.Path]) -> _Scan:
  """Group image files by SeriesInstanceUID, and note every file left out."""
  scan = _Scan(groups={})
  for path in files:
    scan.examined += 1
    _scan_file(path, scan)
  return scan
