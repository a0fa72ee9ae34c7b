"""Synthetic head CT with hemorrhage labels; importing this registers `synthetic_ich`."""

from uem_ich_jax.datasets.synthetic_ich.synthetic_ich_dataset_builder import (
    SyntheticIch,
    SyntheticIchConfig,
    fold_ranges,
    plan_scans,
)
