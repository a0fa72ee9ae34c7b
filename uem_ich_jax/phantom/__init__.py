"""Seeded synthetic head CT with hemorrhages, the other CQ500 findings and their truth."""

from uem_ich_jax.phantom.generate import generate_scan
from uem_ich_jax.phantom.scan import PhantomScan
from uem_ich_jax.phantom.write import write_dicom, write_nifti
