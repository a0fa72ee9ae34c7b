"""Single tag values of a DICOM header, with errors that name the file and the tag.

pydicom converts a stored value only when it is accessed, so the helpers here
raise `CTReadError` for a damaged value (such as "abc" in a decimal string).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from uem_ich_jax.ct.volume import CTReadError

logger = logging.getLogger(__name__)


def _tag_value(dataset: Dataset, keyword: str, source: str) -> Any:
  """Return the value of `keyword`, or None when it is absent or empty.

  Raises:
    CTReadError: pydicom cannot convert the stored value (such as "abc" in a
      decimal string), which it reports only when the value is accessed.
  """
  try:
    value = dataset.get(keyword)
  except Exception as error:  # pylint: disable=broad-except
    # The conversion error type depends on the VR and on pydicom's settings.
    raise CTReadError(f"{source}: invalid {keyword} ({error})") from error
  if value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value):
    return None
  return value


def _single_value(dataset: Dataset, keyword: str, source: str) -> Any:
  value = _tag_value(dataset, keyword, source)
  if isinstance(value, (list, tuple, MultiValue)):
    if len(value) != 1:
      raise CTReadError(f"{source}: {keyword} must have one value, got {len(value)}: {list(value)}")
    value = value[0]
  return value


def _integer(dataset: Dataset, keyword: str, source: str, default: int | None = None) -> int:
  """Return a single integer tag, or `default` when it is absent.

  Raises:
    CTReadError: the tag is absent without a default, multi-valued or not an integer.
  """
  value = _single_value(dataset, keyword, source)
  if value is None:
    if default is None:
      raise CTReadError(f"{source}: {keyword} is missing")
    return default
  try:
    return int(value)
  except (TypeError, ValueError) as error:
    raise CTReadError(f"{source}: {keyword} is not an integer ({value!r})") from error


def _finite_number(dataset: Dataset, keyword: str, source: str, default: float) -> float:
  """Return a single finite decimal tag, or `default` when it is absent or empty."""
  value = _single_value(dataset, keyword, source)
  if value is None:
    return default
  try:
    number = float(value)
  except (TypeError, ValueError, OverflowError) as error:
    raise CTReadError(f"{source}: {keyword} is not a number ({value!r})") from error
  if not np.isfinite(number):
    raise CTReadError(f"{source}: {keyword} is not finite ({value!r})")
  return number


def _transfer_syntax(dataset: Dataset, source: str) -> UID:
  """Return the transfer syntax, from the file meta or, without one, as pydicom parsed the file.

  Raises:
    CTReadError: the UID is not a transfer syntax that pydicom supports, so the pixel
      encoding is unknown.
  """
  file_meta = getattr(dataset, "file_meta", None)
  value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
  if value:
    uid = UID(str(value))
    if not uid.is_transfer_syntax:
      raise CTReadError(f"{source}: TransferSyntaxUID {uid} is not a known transfer syntax")
    return uid
  # No TransferSyntaxUID (a raw dataset without file meta, or a damaged file
  # meta): pydicom has already found the encoding by parsing the file.
  implicit_vr, little_endian = dataset.original_encoding
  if implicit_vr is None:
    raise CTReadError(f"{source}: TransferSyntaxUID is missing")
  if implicit_vr:
    return pydicom.uid.ImplicitVRLittleEndian
  return pydicom.uid.ExplicitVRLittleEndian if little_endian else pydicom.uid.ExplicitVRBigEndian


def _first_number(dataset: Dataset, keyword: str, source: str) -> float | None:
  """Return the first value of a possibly multi-valued decimal tag, or None."""
  try:
    value = _tag_value(dataset, keyword, source)
    if isinstance(value, (list, tuple, MultiValue)):
      value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)
  except (CTReadError, TypeError, ValueError, IndexError) as error:
    logger.warning("%s: %s ignored, not a number (%s)", source, keyword, error)
    return None


def _kernel(dataset: Dataset) -> str:
  value = dataset.get("ConvolutionKernel", "")
  if isinstance(value, (list, tuple, MultiValue)):
    return "\\".join(str(item) for item in value)
  return str(value)
