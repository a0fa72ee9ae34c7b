"""Reading head CT (DICOM series, NIfTI) into `CTVolume`, windowing and resampling."""

from uem_ich_jax.ct.volume import AIR_HU, CTReadError, CTVolume, Provenance
