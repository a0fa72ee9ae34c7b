"""Reading head CT (DICOM series, NIfTI) into `CTVolume`, windowing and resampling."""

from uem_ich_jax.ct.dicom import DicomSeries, list_dicom_series, read_dicom_files, read_dicom_series
from uem_ich_jax.ct.dicom_write import write_dicom_series
from uem_ich_jax.ct.nifti import read_nifti, read_nifti_pair, write_nifti
from uem_ich_jax.ct.resample import (
    correct_tilt,
    resample_mask,
    resample_to_grid,
    resample_z,
    resize_inplane,
    resize_mask_inplane,
)
from uem_ich_jax.ct.volume import (
    AIR_HU,
    MASK_IMAGE_GEOMETRY_ASSUMED,
    MASK_REORIENTED,
    MASK_SAME_GRID,
    CTReadError,
    CTVolume,
    Provenance,
    VolumeTooLargeError,
)
from uem_ich_jax.ct.windowing import WINDOWS, uint8_to_model_input, windows, windows_uint8
