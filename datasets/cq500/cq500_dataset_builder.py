"""The `cq500` TFDS builder: CQ500 head CT (qure.ai) with reader labels and BHX boxes.

One series per study is chosen by the fixed rule of `release.rank_series`, read
through `uem_ich_jax.ct`, freed of gantry tilt by `ct.correct_tilt`, padded to
a square and resized by `common.square_inplane`, and stored as the three
windows in uint8. Labels are the majority of the three readers of reads.csv.
BHX boxes, when the BHX files are present, are joined to slices through the
SOPInstanceUID of each DICOM header and carried onto the stored pixel grid.
Needs no TensorFlow: images are zlib-compressed uint8 `Tensor` features.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import ct
from uem_ich_jax.datasets import common
from uem_ich_jax.datasets.cq500 import release

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
CQ500 (qure.ai): 491 non-contrast head CT scans from the Centre for Advanced
Research in Imaging, Neurosciences and Genomics, New Delhi, each read by three
radiologists for 14 findings (ICH, its five subtypes, bleed side, chronic bleed,
fractures, mass effect, midline shift). One series per study: non-contrast,
soft-tissue kernel, not a reformat, slice spacing nearest 5 mm, gantry tilt
removed. Labels are the majority of the three readers. With the BHX files
(PhysioNet, "Brain Hemorrhage Extended"), slices carry bounding boxes of the
five subtypes. Every example carries a patient-level `fold` (patient = CQ500
case; one study per case).
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
CQ500: download reads.csv and the 491 archives CQ500-CT-<N>.zip from
http://headctstudy.qure.ai/dataset (under the licence on that page) and extract
each archive in place, so that the manual folder holds:

  reads.csv
  CQ500CT0 CQ500CT0/Unknown Study/CT Plain/CT000000.dcm ...
  CQ500CT1 CQ500CT1/Unknown Study/...

Batch folders (qct01/, ...) as in the Kaggle mirror, and a folder named after
the archive (CQ500-CT-12/CQ500CT12 CQ500CT12/...), are accepted. The
CQ500-CT-120 archive is damaged: repair it with `zip -FF` before extracting;
files that still cannot be read are reported in the build's bad-file list.

BHX boxes (optional): download 1_Initial_Manual_Labeling.csv,
2_Extrapolation_to_All_Series.csv and 3_Extrapolation_to_Selected_Series.csv
from https://physionet.org/content/bhx-brain-bounding-box/1.1/ (open access
under the licence on that page) and put them anywhere under the manual folder,
for example in bhx/.
"""

SLICES = "slices"
SCANS = "scans"

# Two planes closer than this along their normal are one plane.
PLANE_TOLERANCE_MM = 0.01
# A chosen series further than this from 5 mm spacing is noted in the report.
SPACING_NOTE_MM = 1.0


@dataclasses.dataclass
class Cq500Config(tfds.core.BuilderConfig):
  """Layout and size of one `cq500` build.

  Attributes:
    layout: `slices` (one example per slice) or `scans` (one example per scan).
    image_size: rows and columns of every stored slice, in pixels.
    num_folds: number of patient-level folds.
    seed: seed of the fold assignment.
  """

  layout: str = SLICES
  image_size: int = 384
  num_folds: int = 5
  seed: int = 0


# --- Carrying boxes onto the stored grid -------------------------------------


class BoxCarryError(ValueError):
  """A box that cannot be placed exactly on a slice of the stored volume."""


def _slice_heights(volume: ct.CTVolume, normal: np.ndarray) -> np.ndarray:
  return np.asarray(volume.positions, np.float64) @ normal


def source_slices(source: ct.CTVolume, target: ct.CTVolume) -> np.ndarray:
  """Return, per slice of `target`, the index of the `source` slice on the same plane.

  Tilt correction and in-plane padding and resizing keep every slice plane
  where it was, so each stored slice lies on exactly one source plane.

  Raises:
    BoxCarryError: the slice planes are not parallel, or a target slice lies
      on no source plane.
  """
  normal = source.slice_normal
  if abs(float(target.slice_normal @ normal)) < 1 - 1e-6:
    raise BoxCarryError("the stored slices are not parallel to the source slices")
  source_heights = _slice_heights(source, normal)
  target_heights = _slice_heights(target, normal)
  distance = np.abs(target_heights[:, None] - source_heights[None, :])
  nearest = np.argmin(distance, axis=1)
  off_plane = distance[np.arange(len(nearest)), nearest] > PLANE_TOLERANCE_MM
  if off_plane.any():
    raise BoxCarryError(
        f"{int(off_plane.sum())} stored slice(s) lie on no source slice plane, first"
        f" stored slice {int(np.argmax(off_plane))}"
    )
  return nearest


def carry_box(
    edges: np.ndarray,
    source: ct.CTVolume,
    source_slice: int,
    target: ct.CTVolume,
    target_slice: int,
) -> np.ndarray:
  """Map a box from a source slice's pixel edges to a target slice's pixel edges.

  Boxes are (row_min, column_min, row_max, column_max) in pixel edges: pixel
  i spans [i, i + 1), so its centre, index i of the affine, is at edge i + 0.5.
  Each corner goes through LPS (source affine) and back (target affine and
  that slice's position). The result is the bounding box of the four mapped
  corners, which is exact when the two in-plane grids are parallel, as they
  are after `ct.correct_tilt` and `common.square_inplane`.

  Raises:
    BoxCarryError: a corner lies off the target slice's plane.
  """
  row_min, column_min, row_max, column_max = (float(value) for value in edges)
  corners = np.array(
      [[row_min, column_min], [row_min, column_max], [row_max, column_min], [row_max, column_max]]
  ) - 0.5
  source_affine = np.asarray(source.affine, np.float64)
  points = (
      np.asarray(source.positions[source_slice], np.float64)
      + corners[:, :1] * source_affine[:3, 1]
      + corners[:, 1:] * source_affine[:3, 2]
  )
  target_affine = np.asarray(target.affine, np.float64)
  steps = np.stack([target_affine[:3, 1], target_affine[:3, 2]], axis=1)
  offsets = points - np.asarray(target.positions[target_slice], np.float64)
  indices, *_ = np.linalg.lstsq(steps, offsets.T, rcond=None)
  residual = np.abs(offsets.T - steps @ indices).max()
  if residual > PLANE_TOLERANCE_MM:
    raise BoxCarryError(
        f"box corner {residual:.3f} mm off stored slice {target_slice}'s plane"
    )
  target_edges = indices.T + 0.5
  return np.array(
      [
          target_edges[:, 0].min(),
          target_edges[:, 1].min(),
          target_edges[:, 0].max(),
          target_edges[:, 1].max(),
      ]
  )


# --- Planning and reading ----------------------------------------------------


@dataclasses.dataclass
class _BhxIndex:
  """The BHX boxes by file (in preference order) and SOPInstanceUID."""

  files: dict[str, pathlib.Path]
  boxes: dict[str, dict[str, list[release.BhxBox]]]
  # File name to SeriesInstanceUID to the number of boxes on that series.
  boxes_per_series: dict[str, collections.Counter]

  @property
  def present(self) -> bool:
    return bool(self.files)

  def boxes_for(self, sop_uids: set[str]) -> tuple[str, dict[str, list[release.BhxBox]]]:
    """Return the first BHX file with boxes on these slices and those boxes, or ("", {})."""
    for name in release.BHX_FILES:
      by_sop = self.boxes.get(name, {})
      found = {uid: by_sop[uid] for uid in sop_uids if uid in by_sop}
      if found:
        return name, found
    return "", {}


def _read_bhx(files: dict[str, pathlib.Path], report: common.BuildReport) -> _BhxIndex:
  used = {}
  boxes = {}
  boxes_per_series = {}
  for name in release.BHX_FILES:
    if name not in files:
      continue
    try:
      rows = release.read_bhx_csv(files[name], report)
    except release.Cq500LayoutError as error:
      report.skip(str(files[name]), f"unusable BHX file: {error}")
      continue
    by_sop = collections.defaultdict(list)
    for box in rows:
      by_sop[box.sop_uid].append(box)
    used[name] = files[name]
    boxes[name] = dict(by_sop)
    boxes_per_series[name] = collections.Counter(box.series_uid for box in rows)
    logger.info("BHX %s: %d boxes on %d slices", name, len(rows), len(by_sop))
  return _BhxIndex(used, boxes, boxes_per_series)


@dataclasses.dataclass
class _Plan:
  """Cases to build and the parts they share, as `_split_generators` found them."""

  root: pathlib.Path
  cases: list[int]
  folders: dict[int, pathlib.Path]
  reads: dict[int, release.CaseReads]
  folds: dict[str, int]
  bhx: _BhxIndex
  report: common.BuildReport


@dataclasses.dataclass
class _Scan:
  """One study after reading: the stored volume, per-slice boxes and the chosen series."""

  number: int
  volume: ct.CTVolume
  source_sop_uids: tuple[str, ...]
  boxes: list[np.ndarray]
  box_classes: list[np.ndarray]
  boxes_known: bool
  series: release.SeriesInfo
  source_tilt_deg: float


def _report_reader_warnings(volume: ct.CTVolume, series_folder: str, report) -> None:
  for warning in volume.provenance.warnings:
    if warning.startswith("skipped "):
      path, _, reason = warning.removeprefix("skipped ").partition(": ")
      report.skip(path, f"unreadable DICOM: {reason}")
    elif warning.startswith("gantry tilt"):
      continue  # Corrected by reslicing below.
    else:
      report.note(series_folder, f"CT reader warning: {warning}")


def _unlisted_dicom_files(folder: pathlib.Path, listed: set[pathlib.Path]) -> list[pathlib.Path]:
  """Files named *.dcm under `folder` that no series holds: their headers could not be read."""
  found = []
  for current, _, names in os.walk(folder, followlinks=True):
    for name in names:
      path = pathlib.Path(current) / name
      if name.lower().endswith(".dcm") and path not in listed:
        found.append(path)
  return sorted(found)


class Cq500(tfds.core.GeneratorBasedBuilder):
  """CQ500 head CT: one non-contrast soft-tissue series per study, reader labels, BHX boxes."""

  name = "cq500"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: slices and scans layouts, BHX boxes, patient folds."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      Cq500Config(name=SLICES, layout=SLICES, description="one example per slice, 384 px"),
      Cq500Config(name=SCANS, layout=SCANS, description="one example per scan, 384 px"),
  ]
  DEFAULT_CONFIG_NAME = SLICES

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    cq500_labels = tfds.features.Tensor(shape=(len(uem_ich_jax.CQ500_LABELS),), dtype=np.uint8)
    if config.layout == SLICES:
      features = common.slice_features(
          size,
          mask=False,
          extra={
              # CQ500 has no slice labels: the scan's majority labels, in
              # SLICE_LABELS order and in CQ500_LABELS order.
              "scan_labels": tfds.features.Tensor(
                  shape=(len(uem_ich_jax.SLICE_LABELS),), dtype=np.uint8
              ),
              "cq500_labels": cq500_labels,
              # (row_min, column_min, row_max, column_max) in pixel edges of
              # the stored image, max exclusive; classes are mask class ids.
              "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
              "box_classes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
              # True when an empty `boxes` means no bleed box on this slice,
              # False when the scan's boxes are unknown (see the README).
              "boxes_known": np.bool_,
              # SOPInstanceUID of the source slice on this slice's plane.
              "sop_instance_uid": tfds.features.Text(),
          },
      )
      del features["labels"]  # A slice-label feature would have nothing true to hold.
    elif config.layout == SCANS:
      features = common.scan_features(
          size,
          mask=False,
          # TODO: the scans layout carries no BHX boxes; add them with their
          # slice indices when a scan-level detection stage needs them.
          extra={
              "cq500_labels": cq500_labels,
              # Each reader's 14 findings, rows R1, R2, R3.
              "reader_cq500_labels": tfds.features.Tensor(
                  shape=(len(release.READERS), len(uem_ich_jax.CQ500_LABELS)), dtype=np.uint8
              ),
              "category": tfds.features.Text(),
              "series_description": tfds.features.Text(),
              # Tilt of the source series, removed before storing; degrees.
              "source_gantry_tilt_deg": np.float32,
          },
      )
    else:
      raise ValueError(f"unknown layout {config.layout!r}; expected {SLICES!r} or {SCANS!r}")
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        homepage="http://headctstudy.qure.ai/dataset",
        citation=(
            "Chilamkurthy S. et al., Deep learning algorithms for detection of critical"
            " findings in head CT scans: a retrospective study, The Lancet 392 (2018)."
        ),
        # Example i of the split is key i, so the fold ranges index the data
        # source directly. The grain pipeline shuffles at read time.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    report = common.BuildReport(self.name)
    files = release.find_release_files(root, report)
    reads = release.read_reads_csv(files.reads_csv, report)
    for number in sorted(set(reads) - set(files.patient_folders)):
      report.skip(
          f"{files.reads_csv}: {reads[number].name}",
          f"no patient folder: {release.case_id(number)} is in reads.csv but not under {root}",
      )
    for number in sorted(set(files.patient_folders) - set(reads)):
      report.skip(
          str(files.patient_folders[number]),
          "no usable reads.csv row: the row is missing, invalid or conflicting, so the case has"
          " no labels",
      )
    # Folds over every case the release names, so that a case left out of
    # this build does not move the others to other folds.
    all_cases = {release.case_id(n) for n in set(reads) | set(files.patient_folders)}
    plan = _Plan(
        root=root,
        cases=sorted(set(reads) & set(files.patient_folders)),
        folders=files.patient_folders,
        reads=reads,
        folds=common.patient_folds(
            all_cases, self.builder_config.num_folds, self.builder_config.seed
        ),
        bhx=_read_bhx(files.bhx_files, report),
        report=report,
    )
    return {"train": self._generate_examples(plan)}

  @staticmethod
  def _describe_case_series(
      folder: pathlib.Path, report: common.BuildReport
  ) -> list[release.SeriesInfo]:
    """List a case's series from the headers and report files no series could take."""
    series = ct.list_dicom_series(folder)
    listed = {path for item in series for path in item.files}
    for path in _unlisted_dicom_files(folder, listed):
      report.skip(str(path), "unreadable DICOM: no readable image header")
    infos = []
    for item in series:
      try:
        infos.append(release.describe_series(item, folder))
      except (OSError, ValueError, TypeError, AttributeError) as error:
        # pydicom converts header values lazily, and its errors vary by VR.
        report.skip(str(item.files[0].parent), f"unreadable series header: {error}")
    studies = {info.study_uid for info in infos}
    if len(studies) > 1:
      report.note(
          str(folder),
          f"several studies: {len(studies)} StudyInstanceUIDs, one series chosen among all",
      )
    return infos

  def _choose_and_read(
      self, number: int, plan: _Plan
  ) -> tuple[release.SeriesInfo, ct.CTVolume] | None:
    """Rank the case's series, read the best readable one and record the choice."""
    report = plan.report
    folder = plan.folders[number]
    name = release.case_id(number)
    infos = self._describe_case_series(folder, report)
    ranking = release.rank_series(infos)
    rejected = [{**info.summary(), "reason": reason} for info, reason in ranking.rejected]
    chosen = None
    for position, info in enumerate(ranking.eligible):
      try:
        volume = ct.read_dicom_files(info.files, series_uid=info.series_uid, min_slices=2)
      except ct.CTReadError as error:
        report.skip(str(folder / info.folder), f"unreadable series: {error}")
        rejected.append({**info.summary(), "reason": f"unreadable: {error}"})
        continue
      chosen = (info, volume)
      for other in ranking.eligible[position + 1:]:
        rejected.append({
            **other.summary(),
            "reason": (
                f"spacing {other.spacing_mm:.2f} mm, images {other.num_images}: ranked below"
                f" the chosen {info.spacing_mm:.2f} mm, {info.num_images} images"
            ),
        })
      break

    self._choices[name] = {
        "chosen": None if chosen is None else {
            **chosen[0].summary(),
            "gantry_tilt_deg": round(chosen[1].provenance.gantry_tilt_deg, 3),
        },
        "rejected": rejected,
    }
    text = "; ".join(f"{item['folder']!r}: {item['reason']}" for item in rejected) or "none"
    if chosen is None:
      report.skip(str(folder), f"no usable series: {len(infos)} series, rejected: {text}")
      return None
    info, volume = chosen
    logger.info(
        "%s: chose %r (%.2f mm, %d images, tilt %.2f degrees); rejected %s",
        name, info.folder, info.spacing_mm, info.num_images,
        volume.provenance.gantry_tilt_deg, text,
    )
    if abs(info.spacing_mm - release.TARGET_SPACING_MM) > SPACING_NOTE_MM:
      report.note(
          str(folder / info.folder), f"no series near 5 mm: chose {info.spacing_mm:.2f} mm"
      )
    _report_reader_warnings(volume, str(folder / info.folder), report)
    return chosen

  def _carry_boxes(
      self,
      number: int,
      source: ct.CTVolume,
      stored: ct.CTVolume,
      series_folder: str,
      plan: _Plan,
  ) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """Return the BHX boxes and classes per stored slice, and whether the scan's boxes are known."""
    report = plan.report
    size = self.builder_config.image_size
    empty_boxes = [np.zeros((0, 4), np.float32) for _ in range(stored.num_slices)]
    empty_classes = [np.zeros((0,), np.int32) for _ in range(stored.num_slices)]
    if not plan.bhx.present:
      return empty_boxes, empty_classes, False
    sop_uids = source.provenance.sop_instance_uids
    file_name, found = plan.bhx.boxes_for(set(sop_uids))
    positive = bool(plan.reads[number].majority[uem_ich_jax.CQ500_LABELS.index("ICH")])
    if not found:
      if positive:
        report.note(
            series_folder, "no BHX boxes: ICH-positive scan without boxes on its chosen series"
        )
      return empty_boxes, empty_classes, not positive
    self._bhx_stats["scans_with_boxes"] += 1
    self._bhx_stats[f"boxes_from:{file_name}"] += 1
    # Boxes of this series on slices the CT reader skipped (damaged files).
    read = sum(len(boxes) for boxes in found.values())
    on_series = plan.bhx.boxes_per_series[file_name][source.provenance.series_uid]
    if on_series > read:
      self._bhx_stats["boxes_on_unread_slices"] += on_series - read
      report.note(series_folder, f"BHX boxes on unread slices: {on_series - read} boxes")

    boxes = [[] for _ in range(stored.num_slices)]
    classes = [[] for _ in range(stored.num_slices)]
    try:
      source_of_stored = source_slices(source, stored)
      stored_of_source = {int(k): j for j, k in enumerate(source_of_stored)}
      for source_index, uid in enumerate(sop_uids):
        for box in found.get(uid, ()):
          if box.class_id == 0:
            self._bhx_stats["chronic_boxes_left_out"] += 1
            continue
          target = stored_of_source[source_index]
          edges = carry_box(
              np.array([box.row_min, box.column_min, box.row_max, box.column_max]),
              source, source_index, stored, target,
          )
          edges = np.clip(edges, 0.0, float(size))
          if edges[2] <= edges[0] or edges[3] <= edges[1]:
            self._bhx_stats["boxes_outside_image"] += 1
            report.note(series_folder, f"BHX box outside the image: slice {uid}")
            continue
          boxes[target].append(edges)
          classes[target].append(box.class_id)
    except (BoxCarryError, KeyError) as error:
      self._bhx_stats["scans_boxes_not_carried"] += 1
      report.note(series_folder, f"boxes not carried: {error}")
      return empty_boxes, empty_classes, False
    self._bhx_stats["boxes_written"] += sum(len(item) for item in boxes)
    return (
        [np.asarray(item, np.float32).reshape(-1, 4) for item in boxes],
        [np.asarray(item, np.int32) for item in classes],
        True,
    )

  def _read_scan(self, number: int, plan: _Plan) -> _Scan | None:
    chosen = self._choose_and_read(number, plan)
    if chosen is None:
      return None
    info, source = chosen
    series_folder = str(plan.folders[number] / info.folder)
    corrected = ct.correct_tilt(source)
    stored, _ = common.square_inplane(corrected, None, self.builder_config.image_size)
    try:
      source_index = source_slices(source, stored)
      sop_uids = tuple(source.provenance.sop_instance_uids[k] for k in source_index)
    except BoxCarryError as error:
      plan.report.note(series_folder, f"slice planes moved: {error}")
      sop_uids = ("",) * stored.num_slices
    boxes, classes, known = self._carry_boxes(number, source, stored, series_folder, plan)
    return _Scan(
        number=number,
        volume=stored,
        source_sop_uids=sop_uids,
        boxes=boxes,
        box_classes=classes,
        boxes_known=known,
        series=info,
        source_tilt_deg=float(source.provenance.gantry_tilt_deg),
    )

  def _examples(self, scan: _Scan, plan: _Plan) -> Iterator[dict]:
    reads = plan.reads[scan.number]
    name = release.case_id(scan.number)
    image = ct.windows_uint8(scan.volume.hu)
    spacing = np.asarray(scan.volume.spacing, np.float32)
    # TODO: store per-slice positions (scan.volume.positions). With a slice
    # missing mid-series the spacing varies, the affine is built from the
    # median step (affine_is_approximate), and slices after the gap are placed
    # one step off by `affine`.
    affine = np.asarray(scan.volume.affine, np.float32)
    common_features = {
        "spacing": spacing,
        "affine": affine,
        "scan_id": name,
        "patient_id": name,
        "fold": plan.folds[name],
        "cq500_labels": reads.majority,
    }
    if self.builder_config.layout == SCANS:
      yield {
          **common_features,
          "image": image,
          "labels": reads.scan_labels,
          "reader_cq500_labels": reads.readers,
          "category": reads.category,
          "series_description": scan.series.description,
          "source_gantry_tilt_deg": np.float32(scan.source_tilt_deg),
      }
      return
    for index in range(scan.volume.num_slices):
      yield {
          **common_features,
          "image": image[index],
          "scan_labels": reads.scan_labels,
          "boxes": scan.boxes[index],
          "box_classes": scan.box_classes[index],
          "boxes_known": scan.boxes_known,
          "sop_instance_uid": scan.source_sop_uids[index],
          "slice_index": index,
      }

  def _generate_examples(self, plan: _Plan) -> Iterator[tuple[int, dict]]:
    self._choices: dict[str, dict] = {}
    self._bhx_stats: collections.Counter = collections.Counter()
    report = plan.report
    example_folds = []
    key = 0
    for number in plan.cases:
      reads = plan.reads[number]
      majority = dict(zip(uem_ich_jax.CQ500_LABELS, reads.majority))
      subtypes = [release.SCAN_LABEL_FINDINGS[n] for n in uem_ich_jax.SUBTYPES]
      if not majority["ICH"] and any(majority[s] for s in subtypes):
        report.note(
            str(plan.folders[number]),
            "inconsistent reads: a subtype majority without an ICH majority",
        )
      scan = self._read_scan(number, plan)
      if scan is None:
        continue
      for example in self._examples(scan, plan):
        example_folds.append(example["fold"])
        yield key, example
        key += 1

    # Stored with the dataset info, which TFDS writes after this generator
    # ends, so the ranges and counts describe what was written.
    metadata = self.info.metadata
    metadata["image_size"] = self.builder_config.image_size
    metadata["series_choice"] = self._choices
    metadata["bhx"] = {
        "files": {name: str(path.relative_to(plan.root)) for name, path in plan.bhx.files.items()},
        **{name: int(count) for name, count in sorted(self._bhx_stats.items())},
    }
    common.store_build_metadata(
        metadata, num_folds=self.builder_config.num_folds, folds=example_folds, report=report
    )
