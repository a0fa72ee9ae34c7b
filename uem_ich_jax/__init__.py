"""UEM-ICH in JAX/Flax: intracranial hemorrhage analysis of non-contrast head CT."""

__version__ = "0.1.0"

# Slice and scan labels, in the order used everywhere in this project. The RSNA
# 2019 CSV lists `any` last; its builder reorders to this.
SUBTYPES = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SLICE_LABELS = ("any",) + SUBTYPES

# Voxel class ids of the BHSD `dataset.json` label map (0 is background),
# which MBH-Seg uses as well.
MASK_CLASS_IDS = {name: index + 1 for index, name in enumerate(SUBTYPES)}

# The 14 scan-level findings of the CQ500 `reads.csv`, in its column order
# (each reader's columns are `R1:<name>`, `R2:<name>`, `R3:<name>`).
CQ500_LABELS = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "ChronicBleed",
    "Fracture",
    "CalvarialFracture",
    "OtherFracture",
    "MassEffect",
    "MidlineShift",
)
