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
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


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


def _named_like_nifti(path: pathlib.Path) -> bool:
  return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _read(path: pathlib.Path, series_uid: str | None) -> CTVolume:
  """Read NIfTI (by content, or by a .nii/.nii.gz name), else DICOM.

  A file named .nii or .nii.gz goes to the NIfTI reader even when its content
  is not NIfTI (empty, cut short), so the error comes from that reader.
  """
  if is_nifti(path) or (path.is_file() and _named_like_nifti(path)):
    if series_uid is not None:
      raise CTReadError(f"{path}: --series applies to DICOM folders, not to NIfTI files")
    from uem_ich_jax.ct import nifti  # pylint: disable=import-outside-toplevel

    return nifti.read_nifti(path)
  from uem_ich_jax.ct import dicom  # pylint: disable=import-outside-toplevel

  return dicom.read_dicom_series(path, series_uid=series_uid)


def summarize_volume(volume: CTVolume) -> dict[str, Any]:
  """Summarize `volume` in the JSON-serialisable form `inspect_path` returns.

  Every number is finite, so the output is strict JSON. "gantry_tilt_deg" is
  measured from the slice positions with the sign dcm2niix prints ("estimated
  from slice vector"), which can be the opposite of the header's
  GantryDetectorTilt: the Philips phantom of the tests has 16.5 in its header
  and -16.5 here.

  Raises:
    CTReadError: the volume has NaN or infinite HU or geometry.
  """
  provenance = volume.provenance
  geometry = [*volume.spacing, provenance.gantry_tilt_deg, *volume.slice_positions_mm]
  if not np.all(np.isfinite(geometry)):
    raise CTReadError(f"{_source(volume)}: spacing, tilt or slice positions are not finite")
  finite = np.isfinite(volume.hu)
  if not finite.all():
    raise CTReadError(
        f"{_source(volume)}: {int(finite.size - finite.sum())} of {finite.size} HU values "
        "are NaN or infinite"
    )
  p1, p50, p99 = np.percentile(volume.hu, [1, 50, 99])
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


def _source(volume: CTVolume) -> str:
  files = volume.provenance.source_files
  if not files:
    return "volume"
  if len(files) == 1:
    return files[0]
  return f"{len(files)} files from {files[0]}"


def inspect_path(path: str | pathlib.Path, series_uid: str | None = None) -> dict[str, Any]:
  """Read a DICOM folder or file, or a NIfTI file, and summarize it.

  NIfTI is recognised by content (see `is_nifti`), and a .nii or .nii.gz file
  goes to the NIfTI reader whatever its content.

  Raises:
    CTReadError: from the reader, when the input cannot be read.
  """
  return summarize_volume(_read(pathlib.Path(path), series_uid))
