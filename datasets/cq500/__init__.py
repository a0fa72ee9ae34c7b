"""CQ500 head CT with reader labels and BHX boxes; importing this registers `cq500`."""

from uem_ich_jax.datasets.cq500.cq500_dataset_builder import (
    Cq500,
    Cq500Config,
    carry_box,
    source_slices,
)
