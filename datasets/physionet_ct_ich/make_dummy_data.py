"""Write `dummy_data/` for the physionet_ct_ich builder from the phantom.

The tree copies the PhysioNet CT-ICH 1.3.1 release. `ct_scans/NNN.nii` and
`masks/NNN.nii` are uncompressed NIfTI, named by the zero-padded patient number,
with masks stored as 0/255. `hemorrhage_diagnosis_raw_ct.csv` starts with a
UTF-8 BOM and has one row per slice, SliceNumber counting from 1 along the
stored z axis. `Patient_demographics.csv` has two header rows. Scans are 64 px
instead of 512.

Patients (non-contiguous numbers, as in the release):
  049  intraparenchymal + intraventricular, stored z toward Superior
  053  epidural + subdural + calvarial fracture, stored z toward Inferior
  066  no hemorrhage
  071  bad: the CT file is truncated
  097  bad: the CSV lists one slice more than the scan has

Run from the repository root:
  python -m uem_ich_jax.datasets.physionet_ct_ich.make_dummy_data
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import shutil

import numpy as np

import uem_ich_jax
from uem_ich_jax import phantom
from uem_ich_jax.ct import CTVolume, write_nifti

RELEASE_FOLDER = (
    "computed-tomography-images-for-intracranial-hemorrhage-detection-and-segmentation-1.3.1"
)
DUMMY_DIR = pathlib.Path(__file__).parent / "dummy_data"
SHAPE = (12, 64, 64)
SPACING_MM = (10.0, 3.6, 3.6)

# Column order of hemorrhage_diagnosis_raw_ct.csv in the release.
DIAGNOSIS_HEADER = (
    "PatientNumber",
    "SliceNumber",
    "Intraventricular",
    "Intraparenchymal",
    "Subarachnoid",
    "Epidural",
    "Subdural",
    "No_Hemorrhage",
    "Fracture_Yes_No",
)
# CSV subtype column to the project's subtype name.
SUBTYPE_COLUMNS = {
    "Intraventricular": "intraventricular",
    "Intraparenchymal": "intraparenchymal",
    "Subarachnoid": "subarachnoid",
    "Epidural": "epidural",
    "Subdural": "subdural",
}
# Demographics sub-header abbreviations, in the release's column order.
DEMOGRAPHICS_SUBTYPES = {
    "IVH": "intraventricular",
    "IPH": "intraparenchymal",
    "SAH": "subarachnoid",
    "EDH": "epidural",
    "SDH": "subdural",
}


@dataclasses.dataclass(frozen=True)
class DummyPatient:
  """One patient of the dummy release and how its files are written."""

  number: int
  subtypes: tuple[str, ...]
  fracture: str = "none"
  # True stores the slices in reverse, with an affine whose z axis points
  # toward Inferior, so the builder must map SliceNumber through the affine.
  flip_z: bool = False
  truncate_ct: bool = False
  extra_csv_slices: int = 0
  age: str = "40"
  gender: str = "Male"

  @property
  def stem(self) -> str:
    return f"{self.number:03d}"


PATIENTS = (
    DummyPatient(49, ("intraparenchymal", "intraventricular"), age="35"),
    DummyPatient(53, ("epidural", "subdural"), fracture="calvarial", flip_z=True, gender="Female"),
    DummyPatient(66, (), age="61"),
    DummyPatient(71, ("subdural",), truncate_ct=True),
    DummyPatient(97, ("intraparenchymal",), extra_csv_slices=1, age="27", gender="Female"),
)
GOOD_PATIENTS = tuple(p for p in PATIENTS if not p.truncate_ct and not p.extra_csv_slices)


def generate_patient_scan(patient: DummyPatient) -> phantom.PhantomScan:
  """Generate the phantom scan of a dummy patient, in canonical slice order."""
  return phantom.generate_scan(
      patient.number,
      SHAPE,
      spacing_mm=SPACING_MM,
      subtypes=patient.subtypes,
      fracture=patient.fracture,
      patient_id=patient.stem,
      scan_id=patient.stem,
  )


def stored_order(patient: DummyPatient) -> np.ndarray:
  """Phantom slice index written at each stored z index of the NIfTI file."""
  indices = np.arange(SHAPE[0])
  return indices[::-1] if patient.flip_z else indices


def _stored_volume(scan: phantom.PhantomScan, patient: DummyPatient) -> CTVolume:
  """Return the scan as stored: with `flip_z`, slices reversed and the affine to match."""
  volume = scan.volume
  if not patient.flip_z:
    return volume
  last = volume.num_slices - 1
  # Stored slice s is phantom slice last - s, so the slice axis points the other way.
  reverse = np.array([[-1, 0, 0, last], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
  return CTVolume(
      hu=np.ascontiguousarray(volume.hu[::-1]),
      positions=np.ascontiguousarray(volume.positions[::-1]),
      affine=volume.affine @ reverse,
      spacing=volume.spacing,
  )


def _diagnosis_rows(scan: phantom.PhantomScan, patient: DummyPatient) -> list[list[int]]:
  labels = scan.slice_labels
  fractured = scan.fracture_mask.any(axis=(1, 2))
  rows = []
  num_rows = SHAPE[0] + patient.extra_csv_slices
  order = stored_order(patient)
  for stored_index in range(num_rows):
    source = order[min(stored_index, SHAPE[0] - 1)]
    values = {
        column: int(labels[source, phantom_label_index(name)])
        for column, name in SUBTYPE_COLUMNS.items()
    }
    row = [patient.number, stored_index + 1]
    row += [values[column] for column in DIAGNOSIS_HEADER[2:7]]
    row += [int(not any(values.values())), int(fractured[source])]
    rows.append(row)
  return rows


def phantom_label_index(name: str) -> int:
  """Column of a subtype (or `any`) in `PhantomScan.slice_labels`."""
  return uem_ich_jax.SLICE_LABELS.index(name)


def _demographics_row(scan: phantom.PhantomScan, patient: DummyPatient) -> list[str]:
  present = scan.slice_labels.max(axis=0)
  marks = [
      "1" if present[phantom_label_index(name)] else "" for name in DEMOGRAPHICS_SUBTYPES.values()
  ]
  fracture = "1" if scan.fracture != "none" else "0"
  return [str(patient.number), patient.age, patient.gender, *marks, fracture, ""]


def write_release(root: pathlib.Path, patients=PATIENTS) -> pathlib.Path:
  """Write a dummy release under `root` and return the release folder."""
  release = root / RELEASE_FOLDER
  (release / "ct_scans").mkdir(parents=True, exist_ok=True)
  (release / "masks").mkdir(parents=True, exist_ok=True)
  diagnosis_rows = []
  demographics_rows = []
  for patient in patients:
    scan = generate_patient_scan(patient)
    stored = _stored_volume(scan, patient)
    ct_path = write_nifti(stored, release / "ct_scans" / f"{patient.stem}.nii")
    mask = scan.mask[stored_order(patient)]
    binary_255 = np.where(mask > 0, 255, 0).astype(np.uint8)
    write_nifti(stored, release / "masks" / f"{patient.stem}.nii", mask=binary_255)
    if patient.truncate_ct:
      data = ct_path.read_bytes()
      ct_path.write_bytes(data[: len(data) // 2])
    diagnosis_rows += _diagnosis_rows(scan, patient)
    demographics_rows.append(_demographics_row(scan, patient))

  # The release's first header field carries a UTF-8 byte order mark.
  diagnosis_path = release / "hemorrhage_diagnosis_raw_ct.csv"
  with open(diagnosis_path, "w", newline="", encoding="utf-8-sig") as f:
    writer = csv.writer(f)
    writer.writerow(DIAGNOSIS_HEADER)
    writer.writerows(diagnosis_rows)

  # Two header rows; the second holds the subtype abbreviations under a
  # merged "Hemorrhage type" title (trailing space as released).
  with open(release / "Patient_demographics.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(
        ["Patient Number", "Age\n(years)", "Gender",
         "Hemorrhage type based on the radiologists diagnosis ", "", "", "", "",
         "Fracture (yes 1/no 0)", "Note1"]
    )
    writer.writerow(["", "", "", *DEMOGRAPHICS_SUBTYPES, "", ""])
    writer.writerows(demographics_rows)
  return release


def main() -> None:
  if DUMMY_DIR.exists():
    shutil.rmtree(DUMMY_DIR)
  release = write_release(DUMMY_DIR)
  total = sum(path.stat().st_size for path in release.rglob("*") if path.is_file())
  print(f"wrote {release} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
