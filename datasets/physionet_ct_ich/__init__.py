"""PhysioNet CT-ICH 1.3.1 head CT; importing this registers the `physionet_ct_ich` builder."""

from uem_ich_jax.datasets.physionet_ct_ich.physionet_ct_ich_dataset_builder import (
    PhysionetCtIch,
    PhysionetCtIchConfig,
)
