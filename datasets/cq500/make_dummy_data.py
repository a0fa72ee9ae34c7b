"""Write `dummy_data/` for the cq500 builder: phantom scans in the CQ500 and BHX layouts.

Run from the repository root (takes about a second, rewrites the folder):

  python -m uem_ich_jax.datasets.cq500.make_dummy_data

The tree is the release's: reads.csv with the 44 columns, one
"CQ500CT<N> CQ500CT<N>" folder per case holding "Unknown Study/CT
<description>/CT000000.dcm", one case inside a Kaggle batch folder (qct02/)
and one inside a folder named after its archive (CQ500-CT-57/). The BHX files
sit in bhx/. What each part tests:

  case 0:  a thin plain series, the 5 mm plain series (chosen) and a 5 mm bone
           series. BHX boxes are in file 1 and shifted copies in file 2, which
           must lose. File 1 also has a "Chronic" box, a row with a broken
           `data` cell and a box on a slice whose file is missing. The thin
           series has a file with no readable header.
  case 12: the 5 mm series with a 15 degree gantry tilt (chosen, BHX boxes)
           and a 5 mm post-contrast series.
  case 57: the 5 mm plain series (chosen), whose last file is truncated as in
           the damaged CQ500-CT-120 archive. A 2.5 mm series, and a 5 mm
           series whose only flaw is its bone ConvolutionKernel. No BHX boxes
           and no ICH in the phantom.
  case 200: a reads.csv row without a folder.

The three readers disagree: each flips a few findings of the phantom's truth,
and where two flip the same finding the majority differs from the phantom.
Every series of a case is its own phantom scan with the case's head anatomy,
but the series differ in their bleeds.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import pathlib
import shutil

import numpy as np

import uem_ich_jax
from uem_ich_jax import ct, phantom
from uem_ich_jax.datasets.cq500 import release

DUMMY_DATA = pathlib.Path(__file__).parent / "dummy_data"
IMAGE_SIZE = 64
PIXEL_MM = 3.6
STUDY_FOLDER = "Unknown Study"
BHX_FOLDER = "bhx"
MISSING_CASE = 200

BHX_LABEL_NAMES = {
    uem_ich_jax.MASK_CLASS_IDS["epidural"]: "Epidural",
    uem_ich_jax.MASK_CLASS_IDS["intraparenchymal"]: "Intraparenchymal",
    uem_ich_jax.MASK_CLASS_IDS["intraventricular"]: "Intraventricular",
    uem_ich_jax.MASK_CLASS_IDS["subarachnoid"]: "Subarachnoid",
    uem_ich_jax.MASK_CLASS_IDS["subdural"]: "Subdural",
}
BHX_HEADER = [
    "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "data", "labelName", "labelType"
]


@dataclasses.dataclass(frozen=True)
class DummySeries:
  """One series of a dummy case: its folder, header values and phantom grid."""

  description: str
  kernel: str
  num_slices: int
  spacing_mm: float
  tilt_deg: float = 0.0
  contrast_agent: str = ""

  @property
  def folder(self) -> str:
    return f"CT {self.description}"


@dataclasses.dataclass(frozen=True)
class DummyCase:
  """One dummy case: where it lies, its series (the chosen one first) and its reads.

  Attributes:
    number: the case number.
    parent: folder above the patient folder, relative to the dummy data root.
    category: reads.csv Category.
    subtypes: hemorrhage subtypes the phantom places in every series.
    series: the series; the first is the one the builder must choose.
    flips: per reader, the findings it reports opposite to the phantom.
    bhx: whether the BHX files have boxes on the chosen series.
    truncate_last: whether the chosen series' last file is cut short.
  """

  number: int
  parent: str
  category: str
  subtypes: tuple[str, ...]
  series: tuple[DummySeries, ...]
  flips: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
  bhx: bool = False
  truncate_last: bool = False

  @property
  def folder(self) -> pathlib.PurePath:
    name = f"CQ500CT{self.number} CQ500CT{self.number}"
    return pathlib.PurePath(self.parent, name) if self.parent else pathlib.PurePath(name)

  def series_folder(self, series: DummySeries) -> pathlib.PurePath:
    return self.folder / STUDY_FOLDER / series.folder


CASES = (
    DummyCase(
        number=0,
        parent="",
        category="B1",
        subtypes=("intraparenchymal", "subdural"),
        series=(
            DummySeries("Plain", "STANDARD", 12, 5.0),
            DummySeries("PLAIN THIN", "STANDARD", 12, 2.5),
            DummySeries("BONE", "BONE", 12, 5.0),
        ),
        flips=((), ("ChronicBleed", "IVH"), ("ChronicBleed", "Fracture")),
        bhx=True,
    ),
    DummyCase(
        number=12,
        parent="qct02",
        category="B1",
        subtypes=("epidural", "intraventricular"),
        series=(
            DummySeries("5mm", "STANDARD", 12, 5.0, tilt_deg=15.0),
            DummySeries("POST CONTRAST", "STANDARD", 12, 5.0, contrast_agent="IOHEXOL"),
        ),
        flips=(("MassEffect",), ("SAH",), ()),
        bhx=True,
    ),
    DummyCase(
        number=57,
        parent="CQ500-CT-57",
        category="B2",
        subtypes=(),
        series=(
            DummySeries("55mm Plain", "STANDARD", 12, 5.0),
            DummySeries("2.55mm", "STANDARD", 12, 2.5),
            DummySeries("5mm", "BONEPLUS", 12, 5.0),
        ),
        flips=(("ICH", "IPH"), ("ICH", "IPH"), ("SAH",)),
        truncate_last=True,
    ),
)
CHOSEN_FOLDERS = {case.number: case.series[0].folder for case in CASES}


def _uid(*parts: object) -> str:
  """Return a deterministic UID under 2.25 (the UUID arc), so rewriting gives the same UIDs."""
  digest = hashlib.sha256("/".join(["cq500-dummy", *(str(part) for part in parts)]).encode())
  return "2.25." + str(int.from_bytes(digest.digest()[:16], "big"))


def study_uid(case: DummyCase) -> str:
  return _uid(case.number, "study")


def series_uid(case: DummyCase, series: DummySeries) -> str:
  return _uid(case.number, series.description, "series")


def sop_uids(case: DummyCase, series: DummySeries) -> list[str]:
  return [_uid(case.number, series.description, index) for index in range(series.num_slices)]


def series_scan(case: DummyCase, series: DummySeries) -> phantom.PhantomScan:
  """Generate the phantom scan of one series (deterministic)."""
  return phantom.generate_scan(
      case.number,
      (series.num_slices, IMAGE_SIZE, IMAGE_SIZE),
      spacing_mm=(series.spacing_mm, PIXEL_MM, PIXEL_MM),
      subtypes=case.subtypes,
      patient_id=release.case_id(case.number),
      scan_id=f"{release.case_id(case.number)} {series.description}",
      tilt_deg=series.tilt_deg,
      noise_hu=3.0,
  )


def reader_findings(case: DummyCase) -> np.ndarray:
  """Return uint8 (3, 14) findings: the chosen series' phantom truth with each reader's flips."""
  truth = series_scan(case, case.series[0]).scan_labels
  readers = np.zeros((3, len(uem_ich_jax.CQ500_LABELS)), np.uint8)
  for reader, flipped in enumerate(case.flips):
    for index, label in enumerate(uem_ich_jax.CQ500_LABELS):
      readers[reader, index] = truth[label] ^ (label in flipped)
  return readers


def _write_series(root: pathlib.Path, case: DummyCase, series: DummySeries) -> list[pathlib.Path]:
  scan = series_scan(case, series)
  agent = series.contrast_agent

  def add_contrast_agent(dataset, index):
    del index
    if agent:
      dataset.ContrastBolusAgent = agent

  return ct.write_dicom_series(
      scan.volume,
      root / case.series_folder(series),
      series_description=series.description,
      patient_id=release.case_id(case.number),
      study_uid=study_uid(case),
      series_uid=series_uid(case, series),
      sop_instance_uids=sop_uids(case, series),
      kernel=series.kernel,
      file_name="CT{index:06d}.dcm",
      edit_dataset=add_contrast_agent,
  )


def _write_reads(root: pathlib.Path) -> None:
  header = ["name", "Category"] + [
      f"{reader}:{finding}" for reader in release.READERS for finding in release.READS_FINDINGS
  ]
  rows = []
  for case in CASES:
    readers = reader_findings(case)
    rows.append([f"CQ500-CT-{case.number}", case.category, *readers.ravel().tolist()])
  rows.append([f"CQ500-CT-{MISSING_CASE}", "B2", *([0] * (len(header) - 2))])
  with (root / release.READS_CSV).open("w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(header)
    writer.writerows(rows)


def bhx_rows(case: DummyCase, shift: float = 0.0) -> list[list[str]]:
  """BHX rows of the phantom boxes on the chosen series, moved `shift` pixels right."""
  series = case.series[0]
  scan = series_scan(case, series)
  uids = sop_uids(case, series)
  rows = []
  for index, (boxes, classes) in enumerate(zip(scan.boxes, scan.box_classes)):
    for (row_min, column_min, row_max, column_max), class_id in zip(boxes, classes):
      data = {
          "x": float(column_min) + shift,
          "y": float(row_min),
          "width": float(column_max - column_min),
          "height": float(row_max - row_min),
      }
      rows.append([
          uids[index], series_uid(case, series), study_uid(case), repr(data),
          BHX_LABEL_NAMES[int(class_id)], "Bounding Box",
      ])
  return rows


def _write_bhx(root: pathlib.Path) -> None:
  folder = root / BHX_FOLDER
  folder.mkdir()
  manual = []
  extrapolated = []
  for case in CASES:
    if case.bhx:
      manual += bhx_rows(case)
      extrapolated += bhx_rows(case, shift=1.0)
  first = CASES[0]
  chosen = first.series[0]
  middle = sop_uids(first, chosen)[chosen.num_slices // 2]
  manual.append([
      middle, series_uid(first, chosen), study_uid(first),
      "{'x': 30.0, 'y': 30.0, 'width': 4.0, 'height': 4.0}", "Chronic", "Bounding Box",
  ])
  manual.append([
      middle, series_uid(first, chosen), study_uid(first), "{'x': 30.0, 'y':", "Subdural",
      "Bounding Box",
  ])
  # A box on a slice of the chosen series whose file is missing, as the
  # CQ500-CT-120 repair deletes one file.
  manual.append([
      _uid(first.number, chosen.description, "missing slice"), series_uid(first, chosen),
      study_uid(first), "{'x': 30.0, 'y': 30.0, 'width': 4.0, 'height': 4.0}", "Subdural",
      "Bounding Box",
  ])
  with (folder / release.BHX_FILES[0]).open("w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(BHX_HEADER)
    writer.writerows(manual)
  # This file carries an unnamed leading index column, as one BHX file seems to.
  with (folder / "2_Extrapolation_to_All_Series.csv").open("w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["", *BHX_HEADER])
    writer.writerows([index, *row] for index, row in enumerate(extrapolated))


def write_dummy_data(root: pathlib.Path = DUMMY_DATA) -> pathlib.Path:
  """Write the whole dummy release under `root`, replacing what is there, and return `root`."""
  if root.exists():
    shutil.rmtree(root)
  root.mkdir(parents=True)
  for case in CASES:
    for series in case.series:
      paths = _write_series(root, case, series)
      if case.truncate_last and series is case.series[0]:
        data = paths[-1].read_bytes()
        paths[-1].write_bytes(data[: len(data) - IMAGE_SIZE * IMAGE_SIZE])
  # A file whose header cannot be read, next to valid ones.
  first = CASES[0]
  thin = first.series[1]
  (root / first.series_folder(thin) / f"CT{thin.num_slices:06d}.dcm").write_bytes(
      b"\x00\x01damaged" * 8
  )
  _write_reads(root)
  _write_bhx(root)
  return root


if __name__ == "__main__":
  written = write_dummy_data()
  total = sum(path.stat().st_size for path in written.rglob("*") if path.is_file())
  print(f"wrote {written} ({total / 1e6:.2f} MB)")
