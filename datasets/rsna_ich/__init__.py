"""RSNA 2019 Intracranial Hemorrhage Detection; importing this registers `rsna_ich`."""

from uem_ich_jax.datasets.rsna_ich.rsna_ich_dataset_builder import (
    LabelTable,
    RsnaIch,
    RsnaIchConfig,
    RsnaLabelsError,
    beam_available,
    read_labels,
)
