"""Write `dummy_data/` for the `rsna_ich` builder in the layout of the Kaggle RSNA 2019 release.

Run from the repository root:

    python datasets/rsna_ich/make_dummy_data.py

The output mimics `rsna-intracranial-hemorrhage-detection/`. One flat folder,
`stage_2_train/`, contains single-slice DICOM files named `<SOPInstanceUID>.dcm`
(`ID_` and 9 lowercase hex digits). They carry only the 22 attributes of the
release (no InstanceNumber, SliceThickness or SeriesDescription).
`stage_2_train.csv` has six `ID_<image>_<subtype>,Label` rows per image in the
release's subtype order (`any` last). The phantom supplies HU, geometry and
slice labels. The data contains the release's faults on purpose:

- series `ID_c0ffee0003` stores HU modulo 4096 (BitsStored 12,
  PixelRepresentation 0, RescaleIntercept 0): the 12-bit wrap;
- `ID_6431af929.dcm`, the last slice of series `ID_c0ffee0005`, has truncated
  PixelData;
- the CSV block of one image appears twice, back to back;
- series `ID_c0ffee0004` is 64 x 56 pixels (not square), and its WindowCenter
  and WindowWidth are multi-valued.

`EXPECTED` below lists what the builder test checks against.
"""

from __future__ import annotations

import csv
import pathlib
import shutil
import tempfile

import numpy as np

from uem_ich_jax import ct, phantom

OUTPUT = pathlib.Path(__file__).resolve().parent / "dummy_data"
SLICES_PER_SERIES = 5
SIZE = 64
PIXEL_MM = 3.6
SLICE_MM = 5.0
# The release's CSV lists the subtypes of each image in this order.
CSV_SUBTYPES = (
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"
)
CORRUPTED_STEM = "ID_6431af929"
WRAPPED_SERIES = "ID_c0ffee0003"
NON_SQUARE_SERIES = "ID_c0ffee0004"
TRUNCATED_SERIES = "ID_c0ffee0005"
DUPLICATED_STEM_INDEX = 7  # The image whose CSV block is written twice.

# (patient, study, series, phantom seed, subtypes); patient 1 has two studies.
SERIES = (
    ("ID_0a0a0a01", "ID_5d0b3e8f01", "ID_c0ffee0001", 11, ("subdural",)),
    ("ID_0a0a0a01", "ID_5d0b3e8f01", "ID_c0ffee0002", 12, ()),
    ("ID_0b0b0b02", "ID_5d0b3e8f02", WRAPPED_SERIES, 13, ("intraparenchymal",)),
    ("ID_0b0b0b02", "ID_5d0b3e8f03", NON_SQUARE_SERIES, 14, ("epidural",)),
    ("ID_0c0c0c03", "ID_5d0b3e8f04", TRUNCATED_SERIES, 15, ("subarachnoid",)),
    ("ID_0c0c0c03", "ID_5d0b3e8f04", "ID_c0ffee0006", 16, ()),
)

# The 22 attributes of a release file (a stage-1 EDA lists them).
RELEASE_ATTRIBUTES = frozenset({
    "BitsAllocated", "BitsStored", "Columns", "HighBit", "ImageOrientationPatient",
    "ImagePositionPatient", "Modality", "PatientID", "PhotometricInterpretation",
    "PixelData", "PixelRepresentation", "PixelSpacing", "RescaleIntercept", "RescaleSlope",
    "Rows", "SOPInstanceUID", "SamplesPerPixel", "SeriesInstanceUID", "StudyID",
    "StudyInstanceUID", "WindowCenter", "WindowWidth",
})


def _sop_uids(rng: np.random.Generator, count: int, used_uids: set[str]) -> list[str]:
  uids = []
  while len(uids) < count:
    uid = "ID_" + "".join(rng.choice(list("0123456789abcdef"), size=9))
    if uid not in used_uids and uid != CORRUPTED_STEM:
      used_uids.add(uid)
      uids.append(uid)
  return uids


def _release_editor(series_uid: str, study_id: str, hu: np.ndarray):
  """Return an `edit_dataset` hook that trims a slice to the release's attributes and quirks."""

  def edit(dataset, index: int) -> None:
    for keyword in [element.keyword for element in dataset]:
      if keyword not in RELEASE_ATTRIBUTES:
        delattr(dataset, keyword)
    dataset.StudyID = study_id
    if series_uid == WRAPPED_SERIES:
      # HU stored modulo 4096 in 12 bits with an intercept of 0.
      stored = np.mod(np.rint(hu[index]).astype(np.int64), 4096).astype("<u2")
      dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 12, 11, 0
      dataset.RescaleIntercept, dataset.RescaleSlope = "0.0", "1.0"
      dataset.PixelData = stored.tobytes()
    elif series_uid == NON_SQUARE_SERIES:
      dataset.WindowCenter, dataset.WindowWidth = ["40", "40"], ["80", "80"]
    else:
      # Stored values from 0 to 4095 fit 12 bits, like most release files.
      dataset.BitsStored, dataset.HighBit = 12, 11

  return edit


def _write_series(
    entry: tuple, folder: pathlib.Path, staging: pathlib.Path, rng: np.random.Generator,
    used_uids: set[str],
) -> dict:
  """Write one series into `folder` and return what the test checks about it."""
  patient, study, series_uid, seed, subtypes = entry
  columns = 56 if series_uid == NON_SQUARE_SERIES else SIZE
  scan = phantom.generate_scan(
      seed, (SLICES_PER_SERIES, SIZE, columns), spacing_mm=(SLICE_MM, PIXEL_MM, PIXEL_MM),
      subtypes=subtypes, patient_id=patient, scan_id=series_uid,
  )
  # Air below -1024 HU is fill, which the readers raise to -1024 anyway, and
  # the 12-bit wrap can only be undone for HU from -1024 upwards.
  hu = np.maximum(np.rint(scan.volume.hu), ct.AIR_HU).astype(np.float32)
  volume = ct.CTVolume(
      hu=hu, positions=scan.volume.positions, affine=scan.volume.affine,
      spacing=scan.volume.spacing,
  )
  sops = _sop_uids(rng, SLICES_PER_SERIES, used_uids)
  if series_uid == TRUNCATED_SERIES:
    sops[-1] = CORRUPTED_STEM
  staged = ct.write_dicom_series(
      volume, staging / series_uid, patient_id=patient, study_uid=study, series_uid=series_uid,
      sop_instance_uids=sops, edit_dataset=_release_editor(series_uid, study[-4:], hu),
  )
  for sop, path in zip(sops, staged):
    shutil.move(path, folder / f"{sop}.dcm")
  if series_uid == TRUNCATED_SERIES:
    _truncate_pixel_data(folder / f"{CORRUPTED_STEM}.dcm")
  return {
      "patient": patient, "study": study, "series": series_uid, "sops": sops, "hu": hu,
      "labels": scan.slice_labels.astype(np.uint8), "affine": scan.volume.affine,
  }


def _truncate_pixel_data(path: pathlib.Path) -> None:
  """Keep half of the PixelData bytes, with a consistent element length (the file parses)."""
  import pydicom  # pylint: disable=import-outside-toplevel

  dataset = pydicom.dcmread(path)
  dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
  dataset.save_as(path, enforce_file_format=True)


def _write_csv(path: pathlib.Path, written: list[dict], rng: np.random.Generator) -> None:
  images = [
      (sop, labels)
      for series in written
      for sop, labels in zip(series["sops"], series["labels"])
  ]
  order = rng.permutation(len(images))
  with path.open("w", newline="") as file:
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    for rank, index in enumerate(order):
      sop, labels = images[index]
      by_name = dict(zip(("any",) + tuple(CSV_SUBTYPES[:5]), labels))
      block = [[f"{sop}_{subtype}", int(by_name[subtype])] for subtype in CSV_SUBTYPES]
      writer.writerows(block)
      if rank == DUPLICATED_STEM_INDEX:
        writer.writerows(block)


def write_dummy_data(output: pathlib.Path = OUTPUT) -> list[dict]:
  """Write the dummy release into `output` (replacing it) and return per-series facts."""
  if output.exists():
    shutil.rmtree(output)
  folder = output / "stage_2_train"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(2019)
  used_uids: set[str] = set()
  with tempfile.TemporaryDirectory() as staging:
    written = [
        _write_series(entry, folder, pathlib.Path(staging), rng, used_uids) for entry in SERIES
    ]
  _write_csv(output / "stage_2_train.csv", written, rng)
  return written


if __name__ == "__main__":
  series = write_dummy_data()
  count = sum(len(item["sops"]) for item in series)
  print(f"wrote {count} slices in {len(series)} series to {OUTPUT}")
