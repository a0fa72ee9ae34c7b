"""Seeded synthetic head CT with the five hemorrhage subtypes and their ground truth."""

from uem_ich_jax.phantom.generate import generate_scan
from uem_ich_jax.phantom.scan import PhantomScan
from uem_ich_jax.phantom.write import write_dicom, write_nifti
