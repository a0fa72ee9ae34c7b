"""Synthetic head CT with hemorrhage labels; importing this registers `synthetic_ich`."""

from uem_ich_jax.datasets.synthetic_ich.synthetic_ich_dataset_builder import (
    SyntheticIch,
    SyntheticIchConfig,
    fold_ranges,
    num_slices_of,
    plan_scans,
)
from uem_ich_jax.datasets.synthetic_ich.variants import (
    REAL_CONFIGS,
    VariantFeatureError,
    real_features,
    variant_name,
)
