"""Choosing the one series of a study to read: the CQ500 rule, shared by predict and the builder.

A study folder often contains several series: a localizer, thin and thick
axial reconstructions, bone-kernel copies, reformats, contrast series. The
CQ500 TFDS builder (`uem_ich_jax.datasets.cq500`) and `uem-ich predict` pick
one of them by the same fixed rule (`rank_series`), read from headers only:

1. Rejected, checked in this order, with the first reason kept: localizers
   (ImageType LOCALIZER); contrast-enhanced series (`contrast_reason`);
   reformats (`reformat_reason`); bone (sharp) kernels (`bone_kernel_reason`);
   fewer than `MIN_SERIES_IMAGES` images; no measurable slice spacing.
2. The rest are ranked by |slice spacing - 5 mm| (to 0.01 mm), then by more
   images, then by folder and SeriesInstanceUID, so the rank never depends
   on file order. The first series that the CT reader reads is used.

`read_study` applies the rule to a folder for prediction. It also rejects
series whose Modality is not CT, which the CQ500 release does not contain.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Callable, Iterable

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from uem_ich_jax.ct.dicom import (
    DUPLICATE_TOLERANCE_MM,
    DicomSeries,
    list_dicom_series,
    read_dicom_files,
    read_dicom_series,
)
from uem_ich_jax.ct.volume import CTReadError, CTVolume

logger = logging.getLogger(__name__)

TARGET_SPACING_MM = 5.0
# A series with fewer images is a localizer or a partial series, not a head scan.
MIN_SERIES_IMAGES = 8
# A slice normal further than this from the patient's superior axis is not
# axial: a coronal or sagittal reformat. Gantry tilt stays well below it.
MAX_AXIAL_ANGLE_DEG = 45.0

# Series descriptions are matched in upper case with runs of spaces made one.
_NON_CONTRAST = re.compile(r"\b(PRE|NON|WITHOUT|W/O)[- ]?(IV )?CONTRAST\b|\bNONCONTRAST\b")
_CONTRAST = re.compile(
    r"CONTRAST|\bPOST\b|\d\s*CC\b|\bIV\b|\bORAL\b|\bANGIO|\bCTA\b|\bPERFUSION\b|\bVENO"
    r"|\bARTERIAL\b|\bDELAYED\b|\bENHANCED\b|\bC\+"
)
# "C" and "C THIN" in the CQ500 series list: a description that is the
# letter C alone or followed by one word is read as contrast-enhanced.
# NOTE: inferred from the names alone, not from the headers of such series.
_CONTRAST_LETTER = re.compile(r"^C(\s+\w+)?$")
_REFORMAT = re.compile(
    r"\b(3D|MPR|DMPR|MIP|MINIP|VRT?|COR|CORONAL|SAG|SAGITTAL|OBL|OBLIQUE|REFORMAT\w*|RECON 3D)\b"
)
_REFORMAT_IMAGE_TYPES = frozenset(
    {"REFORMATTED", "MPR", "MIP", "MINIP", "VOLUME", "PROJECTION IMAGE", "CURVED", "3D",
     "VOLUME_RENDER", "VR"}
)
_SHARP_WORDS = re.compile(r"BONE|\bHRCT\b|\bLUNG\b|\bSHARP\b|\bEDGE\b|\bDETAIL\b|\bHI ?RES\b")
# Kernel tags that name a sharp reconstruction: GE (BONE, BONEPLUS, LUNG,
# EDGE, DETAIL), Siemens H/J kernels 60 and up (H60s, J70h), Philips D, E, L,
# YD, YE and YF. NOTE: any other kernel name counts as soft tissue.
_SHARP_SIEMENS = re.compile(r"^[HJ]([6-9]\d)[A-Z]?$")
_SHARP_PHILIPS = frozenset({"D", "E", "L", "YD", "YE", "YF"})
_NO_AGENT = frozenset({"", "NONE", "NO", "N", "-", "NIL"})


def normalize_description(text: str) -> str:
  """Upper-case a series description and make each run of spaces one space."""
  return re.sub(r"\s+", " ", text).strip().upper()


def contrast_reason(description: str, contrast_agent: str = "") -> str | None:
  """Return why the series is contrast-enhanced, or None for a non-contrast series.

  "PRE CONTRAST" and "NON CONTRAST" mark a non-contrast series, and the
  ContrastBolusAgent tag, when it names an agent, marks a contrast one.
  """
  agent = normalize_description(contrast_agent)
  if agent not in _NO_AGENT:
    return f"contrast: ContrastBolusAgent {contrast_agent.strip()!r}"
  text = normalize_description(description)
  if _NON_CONTRAST.search(text):
    return None
  match = _CONTRAST.search(text) or _CONTRAST_LETTER.search(text)
  if match:
    return f"contrast: description {description.strip()!r} contains {match.group(0).strip()!r}"
  return None


def reformat_reason(
    description: str, image_type: Iterable[str] = (), normal_angle_deg: float | None = None
) -> str | None:
  """Return why the series is a reformat (3D, MPR, coronal, sagittal), or None for axial images."""
  types = {normalize_description(value) for value in image_type}
  found = sorted(types & _REFORMAT_IMAGE_TYPES)
  if found:
    return f"reformat: ImageType contains {found[0]}"
  match = _REFORMAT.search(normalize_description(description))
  if match:
    return f"reformat: description {description.strip()!r} contains {match.group(0)!r}"
  if normal_angle_deg is not None and normal_angle_deg > MAX_AXIAL_ANGLE_DEG:
    return f"reformat: slices are {normal_angle_deg:.0f} degrees from axial"
  return None


def _sharp_kernel(kernel: str) -> bool:
  for part in re.split(r"[\\/,]", kernel):
    part = normalize_description(part)
    if not part:
      continue
    if _SHARP_WORDS.search(part) or part in _SHARP_PHILIPS or _SHARP_SIEMENS.match(part):
      return True
  return False


def bone_kernel_reason(description: str, kernel: str = "") -> str | None:
  """Return why the series is a bone (sharp) reconstruction, or None for a soft-tissue one."""
  match = _SHARP_WORDS.search(normalize_description(description))
  if match:
    return f"bone kernel: description {description.strip()!r} contains {match.group(0)!r}"
  if _sharp_kernel(kernel):
    return f"bone kernel: ConvolutionKernel {kernel!r}"
  return None


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
  """Header facts of one series, for the choice.

  Attributes:
    series_uid: SeriesInstanceUID.
    folder: the folder of the series' files, relative to the patient folder.
    description: SeriesDescription, or the folder name less "CT " when it is empty.
    kernel: ConvolutionKernel.
    image_type: ImageType values.
    contrast_agent: ContrastBolusAgent.
    study_uid: StudyInstanceUID.
    files: the image files.
    normal_angle_deg: angle between the slice normal and the superior axis.
    spacing_mm: median distance between slice planes, None when unmeasured.
  """

  series_uid: str
  folder: str
  description: str
  kernel: str
  image_type: tuple[str, ...]
  contrast_agent: str
  study_uid: str
  files: tuple[pathlib.Path, ...]
  normal_angle_deg: float | None
  spacing_mm: float | None

  @property
  def num_images(self) -> int:
    return len(self.files)

  def summary(self) -> dict:
    """JSON-ready description for the build log and the metadata."""
    return {
        "folder": self.folder,
        "description": self.description,
        "series_uid": self.series_uid,
        "kernel": self.kernel,
        "images": self.num_images,
        "spacing_mm": None if self.spacing_mm is None else round(self.spacing_mm, 3),
    }


def _header_text(dataset: pydicom.Dataset, keyword: str) -> str:
  value = dataset.get(keyword, "")
  if isinstance(value, (list, tuple, MultiValue)):
    return "\\".join(str(item) for item in value)
  return str(value)


def _plane_geometry(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Return (position, unit normal) of one file's slice plane, from its header."""
  dataset = pydicom.dcmread(
      path, stop_before_pixels=True, force=True,
      specific_tags=["ImagePositionPatient", "ImageOrientationPatient"],
  )
  position = np.asarray([float(v) for v in dataset.ImagePositionPatient], np.float64)
  orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], np.float64)
  if position.shape != (3,) or orientation.shape != (6,):
    raise ValueError("ImagePositionPatient or ImageOrientationPatient has the wrong length")
  normal = np.cross(orientation[:3], orientation[3:])
  length = float(np.linalg.norm(normal))
  if not length > 0:
    raise ValueError("ImageOrientationPatient has parallel or zero direction cosines")
  return position, normal / length


def measure_spacing(files: Iterable[pathlib.Path]) -> float:
  """Return the median distance between the distinct slice planes of `files`, in mm.

  Only for choosing a series: the volume's spacing comes from the CT reader.

  Raises:
    ValueError: a header without geometry, or fewer than two distinct planes.
  """
  files = list(files)
  _, normal = _plane_geometry(files[0])
  heights = np.sort([float(_plane_geometry(path)[0] @ normal) for path in files])
  gaps = np.diff(heights)
  gaps = gaps[gaps > DUPLICATE_TOLERANCE_MM]
  if not len(gaps):
    raise ValueError("fewer than two distinct slice positions")
  return float(np.median(gaps))


def describe_series(series: DicomSeries, patient_folder: pathlib.Path) -> SeriesInfo:
  """Read the header facts of a series found by `ct.list_dicom_series`."""
  first = pydicom.dcmread(series.files[0], stop_before_pixels=True, force=True)
  folder = series.files[0].parent
  try:
    relative = str(folder.relative_to(patient_folder))
  except ValueError:
    relative = str(folder)
  description = series.description.strip() or re.sub(r"^CT\s+", "", folder.name)
  angle = None
  try:
    _, normal = _plane_geometry(series.files[0])
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
  except (AttributeError, ValueError, TypeError):
    pass  # No usable orientation; the CT reader reports it if the series is chosen.
  return SeriesInfo(
      series_uid=series.series_uid,
      folder=relative,
      description=description,
      kernel=_header_text(first, "ConvolutionKernel"),
      image_type=tuple(str(v) for v in (first.get("ImageType") or ())),
      contrast_agent=_header_text(first, "ContrastBolusAgent"),
      study_uid=str(first.get("StudyInstanceUID", "")),
      files=tuple(series.files),
      normal_angle_deg=angle,
      spacing_mm=None,
  )


def rejection_reason(info: SeriesInfo) -> str | None:
  """Return why a series cannot be the study's scan (spacing aside), or None when it can."""
  if any(normalize_description(value) == "LOCALIZER" for value in info.image_type):
    return "localizer: ImageType contains LOCALIZER"
  reason = (
      contrast_reason(info.description, info.contrast_agent)
      or reformat_reason(info.description, info.image_type, info.normal_angle_deg)
      or bone_kernel_reason(info.description, info.kernel)
  )
  if reason:
    return reason
  if info.num_images < MIN_SERIES_IMAGES:
    return f"too few images: {info.num_images}, at least {MIN_SERIES_IMAGES} needed"
  return None


@dataclasses.dataclass(frozen=True)
class SeriesRanking:
  """The eligible series, best first, and the rejected ones with their reasons."""

  eligible: tuple[SeriesInfo, ...]
  rejected: tuple[tuple[SeriesInfo, str], ...]


def rank_series(
    infos: Iterable[SeriesInfo],
    *,
    measure: Callable[[Iterable[pathlib.Path]], float] = measure_spacing,
) -> SeriesRanking:
  """Rank a study's series by the fixed rule.

  Rejected: localizers, contrast-enhanced series, reformats, bone kernels,
  fewer than `MIN_SERIES_IMAGES` images, and unmeasurable slice spacing. The
  rest are ranked by |spacing - 5 mm| (to 0.01 mm), then more images, then
  folder and SeriesInstanceUID, so the rank never depends on file order.
  `measure` returns a series' slice spacing in mm from its files (the
  CQ500 builder passes its own name for `measure_spacing`).
  """
  eligible = []
  rejected = []
  for info in infos:
    reason = rejection_reason(info)
    if reason is None:
      try:
        info = dataclasses.replace(info, spacing_mm=measure(info.files))
      except (AttributeError, ValueError, TypeError, OSError) as error:
        reason = f"invalid geometry: {error}"
    if reason is None:
      eligible.append(info)
    else:
      rejected.append((info, reason))
  eligible.sort(
      key=lambda info: (
          round(abs(info.spacing_mm - TARGET_SPACING_MM), 2),
          -info.num_images,
          info.folder,
          info.series_uid,
      )
  )
  return SeriesRanking(tuple(eligible), tuple(rejected))


# --- Reading one study folder for prediction -----------------------------------

RULE = (
    "CQ500 rule: reject series that are not CT, localizers, contrast-enhanced, reformats,"
    f" bone (sharp) kernels, with fewer than {MIN_SERIES_IMAGES} images or without a measurable"
    f" slice spacing; rank the rest by |slice spacing - {TARGET_SPACING_MM:g} mm|, then more"
    " images, then folder and SeriesInstanceUID; read the first one that reads"
)


@dataclasses.dataclass(frozen=True)
class SeriesChoice:
  """The series of a DICOM folder that was read, and why each other series was not.

  Attributes:
    chosen_by: "only series" (the folder contains one), "series_uid" (requested
      by the caller) or "rule" (`RULE`).
    chosen: {series_uid, description, slices} of the series read, with
      {folder, kernel, spacing_mm} when the rule chose it.
    candidates: the other series, each {series_uid, description, slices,
      reason}, where `reason` states why it was not chosen.
  """

  chosen_by: str
  chosen: dict
  candidates: tuple[dict, ...] = ()

  def to_json(self) -> dict:
    """Return the choice as the JSON-ready `series_choice` section of a predict report."""
    return {
        "chosen_by": self.chosen_by,
        "rule": RULE,
        "chosen": dict(self.chosen),
        "series_candidates": [dict(item) for item in self.candidates],
    }


def _listed(series: DicomSeries, reason: str | None = None) -> dict:
  entry = {
      "series_uid": series.series_uid,
      "description": series.description,
      "slices": series.num_files,
  }
  if reason is not None:
    entry["reason"] = reason
  return entry


def _ranked(info: SeriesInfo, reason: str | None = None) -> dict:
  entry = {
      "series_uid": info.series_uid,
      "description": info.description,
      "slices": info.num_images,
      "folder": info.folder,
      "kernel": info.kernel,
      "spacing_mm": None if info.spacing_mm is None else round(info.spacing_mm, 3),
  }
  if reason is not None:
    entry["reason"] = reason
  return entry


def read_study(
    folder: str | pathlib.Path,
    *,
    series_uid: str | None = None,
    max_voxels: int | None = None,
    unwrap_12bit: bool = False,
) -> tuple[CTVolume, SeriesChoice]:
  """Read the series of a DICOM folder that `series_uid` names, or else the one the rule picks.

  A folder with one series is read as it is, without the rule. With several
  series, those whose Modality is not CT are rejected first, and `RULE`
  applies to the rest. A series that the CT reader cannot read is listed
  with the error, and the next one in rank is tried. `max_voxels` and
  `unwrap_12bit` go to the CT reader (see `read_dicom_series`).

  Raises:
    CTReadError: no DICOM images, `series_uid` not found, or no series that
      fits the rule and reads; the message lists every series and its reason.
  """
  folder = pathlib.Path(folder)
  found = list_dicom_series(folder)
  if series_uid is not None or len(found) <= 1:
    # The reader raises the usual errors: no images, or the UID not found (listing the series).
    volume = read_dicom_series(
        folder, series_uid=series_uid, max_voxels=max_voxels, unwrap_12bit=unwrap_12bit
    )
    chosen = [item for item in found if item.series_uid == volume.provenance.series_uid]
    others = [item for item in found if item.series_uid != volume.provenance.series_uid]
    return volume, SeriesChoice(
        chosen_by="only series" if series_uid is None else "series_uid",
        chosen=_listed(chosen[0]) if chosen else {"series_uid": volume.provenance.series_uid},
        candidates=tuple(_listed(item, "not the requested series_uid") for item in others),
    )

  candidates = []
  infos = []
  for item in found:
    if item.modality != "CT":
      candidates.append(_listed(item, f"not CT: Modality {item.modality or '(missing)'}"))
      continue
    try:
      infos.append(describe_series(item, folder))
    except (OSError, ValueError, TypeError, AttributeError) as error:
      # pydicom converts header values lazily, and its errors vary by VR.
      candidates.append(_listed(item, f"unreadable series header: {error}"))
  ranking = rank_series(infos)
  candidates.extend(_ranked(info, reason) for info, reason in ranking.rejected)
  for position, info in enumerate(ranking.eligible):
    try:
      volume = read_dicom_files(
          info.files, series_uid=info.series_uid, min_slices=2, max_voxels=max_voxels,
          unwrap_12bit=unwrap_12bit,
      )
    except CTReadError as error:
      candidates.append(_ranked(info, f"unreadable: {error}"))
      continue
    for other in ranking.eligible[position + 1 :]:
      candidates.append(_ranked(other, (
          f"ranked below the chosen series: spacing {other.spacing_mm:.2f} mm and"
          f" {other.num_images} images against {info.spacing_mm:.2f} mm and"
          f" {info.num_images} images"
      )))
    logger.info(
        "%s: chose series %s (%r, %.2f mm, %d images) of %d by the CQ500 rule",
        folder, info.series_uid, info.description, info.spacing_mm, info.num_images, len(found),
    )
    return volume, SeriesChoice("rule", _ranked(info), tuple(candidates))

  listing = "\n".join(
      f"  {item['series_uid'] or '(no SeriesInstanceUID)'}: {item['description']!r},"
      f" {item['slices']} files: {item['reason']}"
      for item in candidates
  )
  raise CTReadError(
      f"{folder}: {len(found)} series found and none fits the series rule ({RULE}); choose one"
      f" with --series-uid:\n{listing}"
  )
