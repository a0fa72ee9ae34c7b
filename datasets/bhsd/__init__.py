"""BHSD and MBH-Seg 2025 head CT; importing this registers the `bhsd` builder."""

from uem_ich_jax.datasets.bhsd.bhsd_dataset_builder import (
    Bhsd,
    BhsdConfig,
    ClassMapError,
    CaseLabelError,
    merge_raters,
    parse_case_name,
    parse_class_map,
    read_case_labels,
    slice_labels_from_mask,
)
