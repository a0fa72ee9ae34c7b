"""A JSON summary of what the readers make of a scan, for `uem-ich inspect`."""

from __future__ import annotations

import gzip
import pathlib
from typing import Any

import numpy as np

from uem_ich_jax.ct.volume import CTReadError, CTVolume

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC_OFFSET = 344
_NIFTI1_MAGICS = (b"n+1\0", b"ni1\0")
_NIFTI2_MAGIC_OFFSET = 4
_NIFTI2_MAGICS = (b"n+2\0", b"ni2\0")


def is_nifti(path: str | pathlib.Path) -> bool:
  """Check whether `path` is a NIfTI-1 or NIfTI-2 file (gzipped or not) from its content.

  Header-only files of a .hdr/.img pair count as NIfTI too, so that the NIfTI
  reader reports them.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return False
  with path.open("rb") as file:
    start = file.read(2)
  opener = gzip.open if start == _GZIP_MAGIC else open
  try:
    with opener(path, "rb") as file:
      header = file.read(_NIFTI1_MAGIC_OFFSET + 4)
  except (OSError, EOFError):
    return False
  nifti1_magic = header[_NIFTI1_MAGIC_OFFSET : _NIFTI1_MAGIC_OFFSET + 4]
  nifti2_magic = header[_NIFTI2_MAGIC_OFFSET : _NIFTI2_MAGIC_OFFSET + 4]
  return nifti1_magic in _NIFTI1_MAGICS or nifti2_magic in _NIFTI2_MAGICS


def _read(path: pathlib.Path, series_uid: str | None) -> CTVolume:
  if is_nifti(path):
    if series_uid is not None:
      raise CTReadError(f"{path}: --series applies to DICOM folders, not to NIfTI files")
    from uem_ich_jax.ct import nifti  # pylint: disable=import-outside-toplevel

    return nifti.read_nifti(path)
  from uem_ich_jax.ct import dicom  # pylint: disable=import-outside-toplevel

  return dicom.read_dicom_series(path, series_uid=series_uid)


def summarize_volume(volume: CTVolume) -> dict[str, Any]:
  """Summarize `volume` in the JSON-serialisable form `inspect_path` returns."""
  p1, p50, p99 = np.percentile(volume.hu, [1, 50, 99])
  provenance = volume.provenance
  return {
      "series_uid": provenance.series_uid,
      "series_description": provenance.series_description,
      "num_slices": volume.num_slices,
      "shape": [int(size) for size in volume.shape],
      "spacing_mm": [float(value) for value in volume.spacing],
      "spacing_varies": bool(provenance.spacing_varies),
      "gantry_tilt_deg": float(provenance.gantry_tilt_deg),
      "slice_positions_mm": [float(value) for value in volume.slice_positions_mm],
      "hu_percentiles": {"p1": float(p1), "p50": float(p50), "p99": float(p99)},
      "warnings": list(provenance.warnings),
  }


def inspect_path(path: str | pathlib.Path, series_uid: str | None = None) -> dict[str, Any]:
  """Read a DICOM folder or file, or a NIfTI file, and summarize it.

  NIfTI is recognised by content (see `is_nifti`), not by the file name.

  Raises:
    CTReadError: from the reader, when the input cannot be read.
  """
  return summarize_volume(_read(pathlib.Path(path), series_uid))
