"""Conversion of one CT slice's pixel data to stored values and HU (`stored_values`, `slice_hu`)."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from uem_ich_jax.ct.dicom_tags import _finite_number, _integer, _single_value, _transfer_syntax
from uem_ich_jax.ct.volume import AIR_HU, CTReadError, apply_air_floor

# Largest image accepted (Rows x Columns). CT images are 512x512, rarely 1024
# or 2048 square. The check comes before decoding, so a damaged header cannot
# make the reader allocate gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# HU beyond this (before the air floor) come from an invalid rescale, not
# from a scanner. Extended-range CT scales reach a few 10^4 HU (an estimate).
MAX_ABS_HU = 1e6
# 12-bit unsigned slices whose RescaleIntercept is above this cannot store
# air (-1000 HU). Such files in the RSNA 2019 release store negative HU
# modulo 4096, so that air reads as +3072 HU or more.
WRAP_INTERCEPT_ABOVE = -100.0
WRAP_MODULUS = 4096


class _MissingDecoderError(CTReadError):
  """Compressed pixel data that no installed pydicom plugin decodes."""


def _image_size(dataset: Dataset, source: str) -> tuple[int, int]:
  """Return (Rows, Columns), checked before any pixel data is allocated."""
  rows = _integer(dataset, "Rows", source)
  columns = _integer(dataset, "Columns", source)
  if rows <= 0 or columns <= 0:
    raise CTReadError(f"{source}: invalid image size Rows {rows}, Columns {columns}")
  if rows * columns > MAX_IMAGE_PIXELS:
    raise CTReadError(
        f"{source}: image size {rows}x{columns} exceeds the limit of {MAX_IMAGE_PIXELS} "
        "pixels (Rows or Columns is damaged)"
    )
  return rows, columns


def _raw_native_array(
    dataset: Dataset, source: str, rows: int, columns: int, transfer_syntax: UID
) -> np.ndarray:
  """Return the uncompressed pixel data as unsigned integers of BitsAllocated.

  The data must be exactly Rows x Columns x BitsAllocated/8 bytes, plus one pad
  byte when that is odd: a longer one means Rows, Columns or BitsAllocated is
  wrong, and reading it would misplace every pixel.
  """
  bits_allocated = _integer(dataset, "BitsAllocated", source)
  if bits_allocated not in (8, 16, 32):
    raise CTReadError(f"{source}: BitsAllocated {bits_allocated} is not supported")
  byte_order = ">" if transfer_syntax == pydicom.uid.ExplicitVRBigEndian else "<"
  dtype = np.dtype(f"{byte_order}u{bits_allocated // 8}")
  expected = rows * columns * dtype.itemsize
  data = dataset.PixelData
  if not data:
    raise CTReadError(f"{source}: pixel data is empty")
  shape = f"{rows}x{columns} at {bits_allocated} bits"
  if len(data) < expected:
    raise CTReadError(
        f"{source}: pixel data is truncated ({len(data)} bytes, expected {expected} for {shape})"
    )
  if len(data) != expected and not (expected % 2 == 1 and len(data) == expected + 1):
    raise CTReadError(
        f"{source}: pixel data is longer than the header says ({len(data)} bytes, expected "
        f"{expected} for {shape}); Rows, Columns or BitsAllocated is wrong"
    )
  return np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)


def _decoded_array(dataset: Dataset, source: str, transfer_syntax: UID) -> np.ndarray:
  """Decode compressed pixel data with pydicom and view it as unsigned integers."""
  try:
    decoder = get_decoder(transfer_syntax)
  except NotImplementedError as error:
    raise CTReadError(
        f"{source}: pydicom has no decoder for transfer syntax {transfer_syntax.name}"
    ) from error
  if not decoder.is_available:
    raise _MissingDecoderError(
        f"{source}: no decoder installed for transfer syntax {transfer_syntax.name}; "
        "install the pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle "
        "packages"
    )
  try:
    array = dataset.pixel_array
  except RuntimeError as error:
    if "missing dependencies" in str(error):
      raise _MissingDecoderError(f"{source}: no decoder installed ({error})") from error
    raise CTReadError(f"{source}: pixel data cannot be decoded ({error})") from error
  except (ValueError, TypeError, EOFError, AttributeError, KeyError) as error:
    raise CTReadError(f"{source}: pixel data cannot be decoded ({error})") from error
  array = np.ascontiguousarray(array)
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def stored_values(dataset: Dataset, source: str = "") -> np.ndarray:
  """Return a single-frame slice's stored values as int64 (rows, columns).

  The bits above HighBit are masked off and the value is sign-extended when
  PixelRepresentation is 1, on the raw array, so the result does not depend on
  how a pydicom version treats those bits. Compressed transfer syntaxes are
  decoded by pydicom first and then masked the same way.

  Raises:
    CTReadError: missing, empty, truncated or overlong pixel data, missing or
      invalid image tags, an image larger than `MAX_IMAGE_PIXELS`, more than
      one frame or sample, an unknown transfer syntax, or compressed data
      without an installed decoder.
  """
  source = source or str(getattr(dataset, "filename", "") or "dataset")
  if "PixelData" not in dataset:
    raise CTReadError(f"{source}: no pixel data")
  samples = _integer(dataset, "SamplesPerPixel", source, default=1)
  if samples != 1:
    raise CTReadError(f"{source}: SamplesPerPixel {samples} is not grayscale")
  # TODO: multi-frame (Enhanced CT) files are rejected, so scanners that export
  # a whole series as one file cannot be read yet.
  frames = _integer(dataset, "NumberOfFrames", source, default=1)
  if frames not in (0, 1):
    raise CTReadError(f"{source}: multi-frame images ({frames} frames) are not supported")
  rows, columns = _image_size(dataset, source)

  transfer_syntax = _transfer_syntax(dataset, source)
  if transfer_syntax.is_compressed:
    raw = _decoded_array(dataset, source, transfer_syntax)
    if raw.shape != (rows, columns):
      raise CTReadError(f"{source}: decoded image is {raw.shape}, not {rows}x{columns}")
  else:
    raw = _raw_native_array(dataset, source, rows, columns, transfer_syntax)

  bits_allocated = _integer(dataset, "BitsAllocated", source)
  bits_stored = _integer(dataset, "BitsStored", source, default=bits_allocated)
  high_bit = _integer(dataset, "HighBit", source, default=bits_stored - 1)
  if not 0 < bits_stored <= bits_allocated or not bits_stored - 1 <= high_bit < bits_allocated:
    raise CTReadError(
        f"{source}: inconsistent BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
        f"HighBit {high_bit}"
    )
  values = raw.astype(np.int64) >> (high_bit + 1 - bits_stored)
  values &= (1 << bits_stored) - 1
  pixel_representation = _integer(dataset, "PixelRepresentation", source, default=0)
  if pixel_representation not in (0, 1):
    raise CTReadError(f"{source}: PixelRepresentation {pixel_representation} is neither 0 nor 1")
  if pixel_representation == 1:
    sign_bit = 1 << (bits_stored - 1)
    values = np.where(values & sign_bit, values - (1 << bits_stored), values)
  return values


def _padding_mask(dataset: Dataset, values: np.ndarray, source: str) -> np.ndarray:
  """Return where `values` (stored values) are PixelPaddingValue or in its range."""
  if _single_value(dataset, "PixelPaddingValue", source) is None:
    return np.zeros(values.shape, dtype=bool)
  padding = _integer(dataset, "PixelPaddingValue", source)
  if _single_value(dataset, "PixelPaddingRangeLimit", source) is None:
    return values == padding
  limit = _integer(dataset, "PixelPaddingRangeLimit", source)
  low, high = sorted((padding, limit))
  return (values >= low) & (values <= high)


def _rescale(dataset: Dataset, source: str) -> tuple[float, float]:
  """Return (RescaleSlope, RescaleIntercept).

  The CT Image module makes both tags type 1 (present, with a value). Without
  them a reader would have to guess an intercept, and a guess of 0 makes a
  scan stored with intercept -1024 read 1024 HU too bright, so neither tag
  gets a default.

  Raises:
    CTReadError: a tag missing or empty, a value that is not a single finite
      number, or slope 0.
  """
  for keyword in ("RescaleSlope", "RescaleIntercept"):
    if _single_value(dataset, keyword, source) is None:
      raise CTReadError(
          f"{source}: {keyword} is missing or empty; the CT Image module requires it, and"
          " without it the HU of this slice are unknown"
      )
  slope = _finite_number(dataset, "RescaleSlope", source, default=1.0)
  intercept = _finite_number(dataset, "RescaleIntercept", source, default=0.0)
  if slope == 0:
    raise CTReadError(f"{source}: RescaleSlope is 0, so every voxel would have one HU value")
  return slope, intercept


def may_store_hu_modulo_4096(dataset: Dataset, source: str = "") -> bool:
  """Check whether a slice's header cannot store air, so negative HU may be stored modulo 4096.

  True for BitsStored 12, PixelRepresentation 0 and RescaleIntercept above
  `WRAP_INTERCEPT_ABOVE`, the files that the RSNA 2019 release wraps. Only the
  header is read, so a slice without air at all also matches.
  """
  try:
    bits_stored = _integer(dataset, "BitsStored", source, default=0)
    pixel_representation = _integer(dataset, "PixelRepresentation", source, default=0)
    intercept = _finite_number(dataset, "RescaleIntercept", source, default=0.0)
  except CTReadError:
    return False
  return bits_stored == 12 and pixel_representation == 0 and intercept > WRAP_INTERCEPT_ABOVE


def unwrap_stored_values(values: np.ndarray, *, slope: float, intercept: float) -> np.ndarray:
  """Move down by 4096 the stored values whose HU, read that way, is air (`AIR_HU`) or denser.

  The wrapped files can store 4096 consecutive HU values. This reads them as
  HU -1024 up to 3071 (for slope 1), whatever the intercept: with intercept
  0, stored values 3072..4095 become HU -1024..-1. A solution of 2019
  (appian42 `rescale_image`) instead adds 1000, wraps at 4096 and sets the
  intercept to -1000, which cuts at HU -1000 and turns air from -1024 to
  -1001 HU into +3072..+3095 HU.
  """
  negative = slope * (values.astype(np.float64) - WRAP_MODULUS) + intercept >= AIR_HU
  return np.where(negative, values - WRAP_MODULUS, values)


def slice_hu(dataset: Dataset, source: str = "") -> np.ndarray:
  """Return one slice in HU (float32), with padding and out-of-field voxels as air.

  Out of field means below `AIR_HU` after rescaling (see `apply_air_floor`).
  Scanners fill the corners outside the reconstruction circle with such values
  (-1500 HU in the GE scan of the tests), and nothing inside the field is less
  dense than air. PixelPaddingValue (and the range up to
  PixelPaddingRangeLimit) also becomes `AIR_HU`. MONOCHROME1 only inverts the
  display, so it does not change HU.

  Raises:
    CTReadError: see `stored_values`; also a missing or invalid RescaleSlope
      or RescaleIntercept (not one finite number, or slope 0), or HU beyond
      `MAX_ABS_HU`, which only an invalid rescale produces.
  """
  return _hu(dataset, source, unwrap=False)


def unwrapped_slice_hu(dataset: Dataset, source: str = "") -> np.ndarray:
  """Return one slice in HU like `slice_hu`, reading its stored values modulo 4096.

  For slices whose negative HU are stored modulo 4096
  (`may_store_hu_modulo_4096`): `unwrap_stored_values` turns the stored values
  back into HU from -1024 up to 3071 (for slope 1) before the rescale.
  PixelPaddingValue is compared with the values as stored. The caller
  chooses the slices to unwrap, for example with `may_store_hu_modulo_4096`.
  """
  return _hu(dataset, source, unwrap=True)


def _hu(dataset: Dataset, source: str, *, unwrap: bool) -> np.ndarray:
  source = source or str(getattr(dataset, "filename", "") or "dataset")
  values = stored_values(dataset, source)
  slope, intercept = _rescale(dataset, source)
  padding = _padding_mask(dataset, values, source)
  if unwrap:
    values = unwrap_stored_values(values, slope=slope, intercept=intercept)
  hu = values.astype(np.float64) * slope + intercept
  hu[padding] = AIR_HU
  bits_allocated = _integer(dataset, "BitsAllocated", source)
  bits_stored = _integer(dataset, "BitsStored", source, default=bits_allocated)
  # The bound from the stored bit count spares a pass over the pixels in the usual case.
  bound = abs(slope) * 2.0**bits_stored + abs(intercept)
  if bound > MAX_ABS_HU and not np.all(np.abs(hu) <= MAX_ABS_HU):
    raise CTReadError(
        f"{source}: HU up to {float(np.max(np.abs(hu))):.6g} from RescaleSlope {slope:g} and "
        f"RescaleIntercept {intercept:g}; beyond {MAX_ABS_HU:g} HU the rescale is invalid"
    )
  return apply_air_floor(hu).astype(np.float32)
