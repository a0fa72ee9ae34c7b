"""Writing phantom scans through the CT layer's DICOM and NIfTI writers."""

from __future__ import annotations

import hashlib
import os
import pathlib

from uem_ich_jax.ct import dicom_write, nifti
from uem_ich_jax.phantom.scan import PhantomScan

# Root for the phantom's deterministic UIDs (2.25 is the UUID-derived arc, so
# any 128-bit number under it is a valid UID).
_UID_ROOT = "2.25."


def _uid(*parts: str) -> str:
  digest = hashlib.sha256("/".join(("uem-ich-phantom",) + parts).encode()).digest()
  return _UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def write_dicom(scan: PhantomScan, folder: str | os.PathLike) -> list[pathlib.Path]:
  """Writes the scan as a DICOM CT series, one file per slice, and returns the paths.

  UIDs derive from the patient and scan ids, so writing the same scan twice
  gives identical files apart from creation times.
  """
  num_slices = scan.volume.num_slices
  return dicom_write.write_dicom_series(
      scan.volume,
      folder,
      series_description=scan.volume.provenance.series_description or "uem-ich phantom",
      patient_id=scan.patient_id,
      study_uid=_uid(scan.patient_id, scan.scan_id, "study"),
      series_uid=_uid(scan.patient_id, scan.scan_id, "series"),
      sop_instance_uids=[_uid(scan.patient_id, scan.scan_id, str(k)) for k in range(num_slices)],
  )


def write_nifti(
    scan: PhantomScan, image_path: str | os.PathLike, mask_path: str | os.PathLike
) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes the HU image and the class-id mask as two NIfTI files on the same grid."""
  image = nifti.write_nifti(scan.volume, image_path)
  mask = nifti.write_nifti(scan.volume, mask_path, mask=scan.mask)
  return image, mask
