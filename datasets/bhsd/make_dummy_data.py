"""Write `dummy_data/` for the `bhsd` builder tests, in the releases' layouts.

Run from the repository root:

  python -m uem_ich_jax.datasets.bhsd.make_dummy_data

Phantom scans (`uem_ich_jax.phantom`) of 10 slices at 64 pixels stand in for
the CT volumes. The cases cover what the builder must handle:

  label_192/ (BHSD)
    A  positive, one ground truth. Also a case-level volume, whose CSV row
       adds subarachnoid, which the mask lacks.
    B  second study of A's patient, image file without a .nii.gz suffix.
    C  negative (empty ground truth, not in the CSV), 56 x 64 pixels, so the
       builder pads it to a square.
  MBH_Train_2025_voxel-label/
    D  two raters that disagree, exercising every tie rule. Rater 3's label
       affine is shifted by 2 mm (the known header mismatch).
    E  positive in the CSV, but its only rater's label volume is all zero.
       The case folder also contains a stray text file.
  MBH_val_label_2025/ (the second validation folder name)
    H  one rater
  MBH_Train_2025_case-label/
    A, E (copies), F positive, G negative; case-wise_annotation.csv
  dataset.json  the BHSD label map; A in `training`, B in `test`
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import shutil

import numpy as np

import uem_ich_jax
from uem_ich_jax import ct, phantom

DUMMY_DIR = pathlib.Path(__file__).resolve().parent / "dummy_data"

NUM_SLICES = 10
SIZE = 64
# Wide slices so that 10 of them span the brain (the phantom needs that).
SPACING_MM = (12.0, 3.6, 3.6)

CASE_A = "ID_0a1b2c3d_ID_1a2b3c4d5e"
CASE_B = "ID_0a1b2c3d_ID_2b3c4d5e6f"
CASE_C = "ID_4e5f6a7b_ID_3c4d5e6f7a"
CASE_D = "ID_8c9d0e1f_ID_4d5e6f7a8b"
CASE_E = "ID_2f3e4d5c_ID_5e6f7a8b9c"
CASE_F = "ID_6b7a8c9d_ID_6f7a8b9c0d"
CASE_G = "ID_7c8d9e0f_ID_7a8b9c0d1e"
CASE_H = "ID_9d8c7b6a_ID_8b9c0d1e2f"

# Case -> (seed, subtypes, rows). Every phantom is drawn from its own seed.
PHANTOMS = {
    CASE_A: (11, ("intraparenchymal", "subdural"), SIZE),
    CASE_B: (12, ("epidural",), SIZE),
    CASE_C: (13, (), 56),
    CASE_D: (14, ("intraparenchymal", "subdural"), SIZE),
    CASE_E: (15, ("subdural",), SIZE),
    CASE_F: (16, ("intraventricular",), SIZE),
    CASE_G: (17, (), SIZE),
    CASE_H: (18, ("epidural", "subarachnoid"), SIZE),
}

# The case-level CSV. A's row adds subarachnoid to what its mask shows.
CSV_ROWS = {
    CASE_A: {"epidural": 0, "intraparenchymal": 1, "intraventricular": 0, "subarachnoid": 1,
             "subdural": 1},
    CASE_E: {"epidural": 0, "intraparenchymal": 0, "intraventricular": 0, "subarachnoid": 0,
             "subdural": 1},
    CASE_F: {"epidural": 0, "intraparenchymal": 0, "intraventricular": 1, "subarachnoid": 0,
             "subdural": 0},
}

# Build order of the voxel cases: MBH-Seg 2025 training, validation, then BHSD.
VOXEL_CASES_IN_ORDER = (CASE_D, CASE_H, CASE_A, CASE_B, CASE_C)
CASE_LEVEL_IN_ORDER = (CASE_A, CASE_E, CASE_F, CASE_G)

_BHSD_LABELS = {
    "0": "background",
    "1": "epidural",
    "2": "intraparenchymal",
    "3": "intraventricular",
    "4": "subarachnoid",
    "5": "subdural",
}


def make_phantom(case_id: str) -> phantom.PhantomScan:
  """Generate the phantom scan written for `case_id`."""
  seed, subtypes, rows = PHANTOMS[case_id]
  return phantom.generate_scan(
      seed,
      (NUM_SLICES, rows, SIZE),
      spacing_mm=SPACING_MM,
      subtypes=subtypes,
      patient_id=case_id.split("_ID_")[0],
      scan_id=case_id,
      noise_hu=3.0,
  )


def disagreeing_rater(mask: np.ndarray) -> np.ndarray:
  """Rater 3 of case D: rater 1's mask with four kinds of disagreement.

  A third of the intraparenchymal voxels become intraventricular. That is a
  tie of 2 against 3, which 2 wins by its larger total although 3 is higher.
  A quarter of the subdural voxels become subarachnoid, a tie that 5 wins by
  total volume although 4 is lower. Another quarter of the subdural voxels
  become background, where blood (5) wins. A block of background next to the
  bleed becomes subarachnoid, where 4 wins.
  """
  other = mask.copy()
  iph = np.flatnonzero(mask == 2)
  other.flat[iph[: len(iph) // 3]] = 3
  sdh = np.flatnonzero(mask == 5)
  quarter = len(sdh) // 4
  other.flat[sdh[:quarter]] = 4
  other.flat[sdh[quarter : 2 * quarter]] = 0
  middle = mask.shape[0] // 2
  block = np.zeros_like(mask, dtype=bool)
  block[middle, 28:36, 28:36] = True
  other[block & (mask == 0)] = 4
  return other


def _shifted(volume: ct.CTVolume, shift_mm: float) -> ct.CTVolume:
  affine = np.asarray(volume.affine, np.float64).copy()
  affine[0, 3] += shift_mm
  positions = np.asarray(volume.positions) + np.array([shift_mm, 0.0, 0.0])
  return dataclasses.replace(volume, affine=affine, positions=positions)


def _write_case_csv(path: pathlib.Path) -> None:
  with path.open("w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(("patientID_studyID",) + uem_ich_jax.SLICE_LABELS)
    for case_id, subtypes in CSV_ROWS.items():
      values = [subtypes[name] for name in uem_ich_jax.SUBTYPES]
      writer.writerow([case_id, max(values), *values])


def write_dummy_data(root: pathlib.Path = DUMMY_DIR) -> None:
  """Delete `root` and write the dummy release into it."""
  if root.exists():
    shutil.rmtree(root)
  scans = {case_id: make_phantom(case_id) for case_id in PHANTOMS}

  bhsd = root / "label_192"
  for case_id in (CASE_A, CASE_B, CASE_C):
    scan = scans[case_id]
    image_name = case_id if case_id == CASE_B else f"{case_id}.nii.gz"
    # write_nifti needs a suffix, so B is written with one and renamed.
    image = ct.write_nifti(scan.volume, bhsd / "images" / f"{case_id}.nii.gz")
    image.rename(bhsd / "images" / image_name)
    ct.write_nifti(scan.volume, bhsd / "ground truths" / f"{case_id}.nii.gz", mask=scan.mask)

  train = root / "MBH_Train_2025_voxel-label"
  scan = scans[CASE_D]
  ct.write_nifti(scan.volume, train / CASE_D / "image.nii.gz")
  ct.write_nifti(scan.volume, train / CASE_D / "label_annot_1.nii.gz", mask=scan.mask)
  ct.write_nifti(
      _shifted(scan.volume, 2.0),
      train / CASE_D / "label_annot_3.nii.gz",
      mask=disagreeing_rater(scan.mask),
  )
  scan = scans[CASE_E]
  ct.write_nifti(scan.volume, train / CASE_E / "image.nii.gz")
  ct.write_nifti(
      scan.volume, train / CASE_E / "label_annot_2.nii.gz", mask=np.zeros_like(scan.mask)
  )
  (train / CASE_E / "notes.txt").write_text("not part of the release layout\n")

  validation = root / "MBH_val_label_2025"
  scan = scans[CASE_H]
  ct.write_nifti(scan.volume, validation / CASE_H / "image.nii.gz")
  ct.write_nifti(scan.volume, validation / CASE_H / "label_annot_4.nii.gz", mask=scan.mask)

  case_level = root / "MBH_Train_2025_case-label"
  for case_id in CASE_LEVEL_IN_ORDER:
    ct.write_nifti(scans[case_id].volume, case_level / f"{case_id}.nii.gz")
  _write_case_csv(case_level / "case-wise_annotation.csv")

  document = {
      "description": "bleedbrain",
      "labels": _BHSD_LABELS,
      "licence": "AIML",
      "modality": {"0": "CT"},
      "name": "bleedbrain",
      "numTest": 1,
      "numTraining": 1,
      "tensorImageSize": "3D",
      "test": [f"./imagesTs/{CASE_B}.nii.gz"],
      "training": [
          {"image": f"./imagesTr/{CASE_A}.nii.gz", "label": f"./labelsTr/{CASE_A}.nii.gz"}
      ],
  }
  (root / "dataset.json").write_text(json.dumps(document, indent=4) + "\n")


if __name__ == "__main__":
  write_dummy_data()
  total = sum(path.stat().st_size for path in DUMMY_DIR.rglob("*") if path.is_file())
  print(f"wrote {DUMMY_DIR} ({total / 1024:.0f} KiB)")
