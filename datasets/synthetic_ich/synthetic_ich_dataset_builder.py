"""The `synthetic_ich` TFDS builder: seeded phantom head CT with hemorrhage labels.

Needs no download and no TensorFlow: examples are written as array_record and
images are stored as zlib-compressed uint8 `Tensor` features, which TFDS encodes
and decodes in numpy (`tfds.features.Image` would call TensorFlow to encode).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

import uem_ich_jax
from uem_ich_jax import phantom
from uem_ich_jax.ct.windowing import windows_uint8
from uem_ich_jax.datasets.common import BuildReport, fold_ranges
from uem_ich_jax.datasets.synthetic_ich import variants
from uem_ich_jax.phantom import PhantomScan

_DESCRIPTION = """\
Synthetic non-contrast head CT from the uem_ich_jax phantom generator, with
slice labels (any, epidural, intraparenchymal, intraventricular, subarachnoid,
subdural), BHSD-style masks (class ids 1..5), boxes, hematoma volumes, the 14
CQ500 scan labels (bleed side, chronic bleed, fractures, mass effect, midline
shift) and the voxel-to-patient affine. Every example carries a patient-level
`fold`; train on folds != k and evaluate on fold k.
"""

SLICES = "slices"
SCANS = "scans"


@dataclasses.dataclass
class SyntheticIchConfig(tfds.core.BuilderConfig):
  """Size and layout of one `synthetic_ich` build.

  Attributes:
    layout: `slices` (one example per slice) or `scans` (one example per scan).
    num_scans: number of generated scans, follow-up scans included.
    num_slices: slices per scan.
    image_size: rows and columns of every slice, in pixels.
    field_of_view_mm: in-plane width of the image; the pixel spacing is this
      divided by `image_size`, so every size shows the whole head.
    coverage_mm: craniocaudal extent of the scan. The slice spacing is this
      divided by `num_slices`, so that few slices still span the brain,
      because the phantom rejects grids too thin to hold a bleed.
    num_folds: number of patient-level folds.
    seed: scan i is generated from seed `seed + i`; folds are shuffled with it.
    followup_every: every n-th patient gets a second (follow-up) scan, so that
      scans of one patient exist and fold assignment must keep them together;
      0 gives every patient a single scan. NOTE: a follow-up is a new phantom
      from its own seed that shares only the patient id, not the same head.
    mirrors: "dataset/config" of a real builder whose features this config
      stores (see `variants`); empty for the phantom's own features.
    extra_slices: with `mirrors` only: scan i has `num_slices + i %
      (extra_slices + 1)` slices, because real scans differ in length.
  """

  layout: str = SLICES
  num_scans: int = 40
  num_slices: int = 24
  image_size: int = 128
  field_of_view_mm: float = 230.0
  coverage_mm: float = 120.0
  num_folds: int = 5
  seed: int = 0
  followup_every: int = 3
  mirrors: str = ""
  extra_slices: int = 0


# Size of the `*_curriculum` configs. It was chosen so that the SSL,
# multi-task and aggregator stages train within an hour on 2 CPU cores (an
# estimate from step times measured on a shared machine).
CURRICULUM_SCANS = 200
CURRICULUM_SLICES = 16
CURRICULUM_IMAGE_SIZE = 96


def _configs() -> list[SyntheticIchConfig]:
  configs = []
  for layout in (SLICES, SCANS):
    configs.append(
        SyntheticIchConfig(
            name=layout,
            layout=layout,
            description=f"{layout}: 40 scans x 24 slices x 128 px (the default, builds fast)",
        )
    )
    configs.append(
        SyntheticIchConfig(
            name=f"{layout}_large",
            layout=layout,
            num_scans=400,
            num_slices=32,
            image_size=256,
            description=f"{layout}: 400 scans x 32 slices x 256 px",
        )
    )
    # The same patients, scans and folds in both layouts (plan_scans does not
    # depend on the layout), for experiments/curriculum_synthetic.py.
    configs.append(
        SyntheticIchConfig(
            name=f"{layout}_curriculum",
            layout=layout,
            num_scans=CURRICULUM_SCANS,
            num_slices=CURRICULUM_SLICES,
            image_size=CURRICULUM_IMAGE_SIZE,
            description=(
                f"{layout}: {CURRICULUM_SCANS} scans x {CURRICULUM_SLICES} slices x"
                f" {CURRICULUM_IMAGE_SIZE} px, the curriculum experiment's data"
            ),
        )
    )
  for dataset, real_config, layout in variants.REAL_CONFIGS:
    configs.append(
        SyntheticIchConfig(
            name=variants.variant_name(dataset, real_config),
            layout=layout,
            num_scans=variants.VARIANT_SCANS,
            num_slices=variants.VARIANT_SLICES,
            extra_slices=variants.VARIANT_EXTRA_SLICES,
            image_size=variants.VARIANT_IMAGE_SIZE,
            mirrors=f"{dataset}/{real_config}",
            description=(
                f"phantom scans with the features of {dataset}/{real_config}:"
                f" {variants.VARIANT_SCANS} scans x {variants.VARIANT_SLICES}-"
                f"{variants.VARIANT_SLICES + variants.VARIANT_EXTRA_SLICES} slices x"
                f" {variants.VARIANT_IMAGE_SIZE} px"
            ),
        )
    )
  return configs


def num_slices_of(config: SyntheticIchConfig, scan_index: int) -> int:
  """Return the slice count of scan `scan_index` (`num_slices` unless `extra_slices` is set)."""
  if config.extra_slices and not config.mirrors:
    raise ValueError(
        f"config {config.name!r}: extra_slices needs `mirrors`, because the phantom's own"
        " scans feature has a fixed slice count"
    )
  return config.num_slices + scan_index % (config.extra_slices + 1)


@dataclasses.dataclass(frozen=True)
class PlannedScan:
  """One scan to generate: its position in the build, its seed and its patient."""

  scan_index: int
  seed: int
  patient_id: str
  fold: int


def plan_scans(config: SyntheticIchConfig) -> list[PlannedScan]:
  """Assign seeds, patients and folds to the scans of a build.

  Folds come from a seeded balanced assignment: the patients are permuted with
  `config.seed` and patient j of the permutation goes to fold j mod k. So fold
  sizes differ by at most one patient, and the same config always gives the same
  folds.
  """
  if config.num_scans < 1:
    raise ValueError(f"num_scans must be at least 1, got {config.num_scans}")
  if config.num_folds < 1:
    raise ValueError(f"num_folds must be at least 1, got {config.num_folds}")

  patient_of_scan = []
  patient = 0
  while len(patient_of_scan) < config.num_scans:
    scans_of_patient = 1
    if config.followup_every and patient % config.followup_every == config.followup_every - 1:
      scans_of_patient = 2
    patient_of_scan.extend([patient] * scans_of_patient)
    patient += 1
  patient_of_scan = patient_of_scan[: config.num_scans]

  num_patients = patient_of_scan[-1] + 1
  order = np.random.default_rng(config.seed).permutation(num_patients)
  fold_of_patient = np.empty(num_patients, dtype=np.int64)
  fold_of_patient[order] = np.arange(num_patients) % config.num_folds

  return [
      PlannedScan(
          scan_index=index,
          seed=config.seed + index,
          patient_id=f"synth-{config.seed}-{patient:05d}",
          fold=int(fold_of_patient[patient]),
      )
      for index, patient in enumerate(patient_of_scan)
  ]


def _generate_scan(planned: PlannedScan, config: SyntheticIchConfig) -> PhantomScan:
  num_slices = num_slices_of(config, planned.scan_index)
  shape = (num_slices, config.image_size, config.image_size)
  pixel_mm = config.field_of_view_mm / config.image_size
  return phantom.generate_scan(
      planned.seed,
      shape,
      spacing_mm=(config.coverage_mm / num_slices, pixel_mm, pixel_mm),
      patient_id=planned.patient_id,
  )


def _mirrored_features(config: SyntheticIchConfig) -> tfds.features.FeaturesDict:
  """Return a copy of the features of the real config that `config` mirrors, at its image size."""
  dataset, _, real_config = config.mirrors.partition("/")
  features = variants.real_features(dataset, real_config, config.image_size)
  image_rank = len(features["image"].shape)
  if image_rank != {SLICES: 3, SCANS: 4}[config.layout]:
    raise variants.VariantFeatureError(
        f"synthetic_ich config {config.name!r} has layout {config.layout!r}, but the images of"
        f" {config.mirrors} have rank {image_rank}"
    )
  # A copy, so that the two builders never share one FeaturesDict.
  return tfds.features.FeaturesDict.from_json(features.to_json())


class SyntheticIch(tfds.core.GeneratorBasedBuilder):
  """Seeded synthetic head CT with the five hemorrhage subtypes and the CQ500 findings."""

  name = "synthetic_ich"
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: slices and scans layouts, patient folds.",
      "1.1.0": (
          "Phantom findings for the 14 CQ500 labels (chronic subdural collections,"
          " calvarial and other fractures, midline shift from mass effect, bleed"
          " side). Scans gain `cq500_labels`, `midline_shift_mm` and `affine`;"
          " slices gain `affine`. Scans without the new findings are unchanged."
      ),
      "1.2.0": (
          "Boxes per bleed, as a reader draws them: pieces of a class at most 5 mm"
          " apart on a slice share a box, and bleeds under 20 mm2 on a slice get"
          " none. Images, masks and labels are unchanged."
      ),
  }
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = SLICES
  # Configs that `uem-ich build-dataset synthetic_ich` builds when no config is
  # named; the large variants are built only on request.
  DEFAULT_BUILD_CONFIGS = (SLICES, SCANS)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if config.mirrors:
      return tfds.core.DatasetInfo(
          builder=self,
          description=_DESCRIPTION + f"\nFeatures of {config.mirrors}.\n",
          features=_mirrored_features(config),
          metadata=tfds.core.MetadataDict(),
          disable_shuffling=True,
      )
    size = config.image_size
    text = tfds.features.Text()
    zlib = tfds.features.Encoding.ZLIB
    if config.layout == SLICES:
      features = {
          "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=zlib),
          "mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=zlib),
          "labels": tfds.features.Tensor(shape=(len(uem_ich_jax.SLICE_LABELS),), dtype=np.uint8),
          # (row_min, column_min, row_max, column_max) in pixel edges, max exclusive.
          "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
          "box_classes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
          # The scan's map from (slice, row, column) to LPS mm; this slice is
          # index `slice_index`.
          "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
          "slice_index": np.int32,
          "scan_id": text,
          "patient_id": text,
          "fold": np.int32,
      }
    elif config.layout == SCANS:
      slices = config.num_slices
      features = {
          "image": tfds.features.Tensor(
              shape=(slices, size, size, 3), dtype=np.uint8, encoding=zlib
          ),
          "mask": tfds.features.Tensor(shape=(slices, size, size), dtype=np.uint8, encoding=zlib),
          "labels": tfds.features.Tensor(shape=(len(uem_ich_jax.SLICE_LABELS),), dtype=np.uint8),
          "slice_labels": tfds.features.Tensor(
              shape=(slices, len(uem_ich_jax.SLICE_LABELS)), dtype=np.uint8
          ),
          # mL of blood per subtype, in the order of `uem_ich_jax.SUBTYPES`.
          "hematoma_ml": tfds.features.Tensor(
              shape=(len(uem_ich_jax.SUBTYPES),), dtype=np.float32
          ),
          # The 14 CQ500 labels, in the order of `uem_ich_jax.CQ500_LABELS`.
          "cq500_labels": tfds.features.Tensor(
              shape=(len(uem_ich_jax.CQ500_LABELS),), dtype=np.uint8
          ),
          "midline_shift_mm": np.float32,
          "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
          # Map from (slice, row, column) to LPS mm (+x is the patient's left).
          "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
          "scan_id": text,
          "patient_id": text,
          "fold": np.int32,
      }
    else:
      raise ValueError(f"unknown layout {config.layout!r}; expected {SLICES!r} or {SCANS!r}")
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        # Examples keep generation order on disk, so example i of the split is
        # key i and the fold ranges in the metadata index the data source
        # directly. The grain pipeline shuffles at read time.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    plan = plan_scans(config)
    if config.layout == SLICES:
      example_folds = [
          p.fold for p in plan for _ in range(num_slices_of(config, p.scan_index))
      ]
    else:
      example_folds = [p.fold for p in plan]
    # Saved with the dataset info, so that readers select folds without
    # decoding examples.
    self.info.metadata["num_folds"] = config.num_folds
    self.info.metadata["fold_ranges"] = {"train": fold_ranges(example_folds)}
    if config.mirrors:
      # The real builders list their bad files; the phantom has none.
      self.info.metadata["bad_files"] = BuildReport(self.name).to_metadata()
      num_mask_classes = variants.num_mask_classes(config.mirrors)
      if num_mask_classes is not None:
        self.info.metadata["num_mask_classes"] = num_mask_classes
      return {"train": self._generate_mirrored_examples(plan)}
    return {"train": self._generate_examples(plan)}

  def _generate_mirrored_examples(self, plan: list[PlannedScan]) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    dataset, real_config = config.mirrors.split("/")
    features = self.info.features
    key = 0
    for planned in plan:
      scan = _generate_scan(planned, config)
      fill = functools.partial(
          variants.fill_example,
          features,
          dataset=dataset,
          config=real_config,
          scan=scan,
          windows=windows_uint8(scan.volume.hu),
          fold=planned.fold,
      )
      if config.layout == SCANS:
        yield key, fill(slice_index=None)
        key += 1
        continue
      for slice_index in range(scan.mask.shape[0]):
        yield key, fill(slice_index=slice_index)
        key += 1

  def _generate_examples(self, plan: list[PlannedScan]) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    for planned in plan:
      scan = _generate_scan(planned, config)
      image = windows_uint8(scan.volume.hu)
      spacing = np.asarray(scan.volume.spacing, dtype=np.float32)
      affine = np.asarray(scan.volume.affine, dtype=np.float32)
      labels = np.asarray(
          [scan.scan_labels[name] for name in uem_ich_jax.SLICE_LABELS], dtype=np.uint8
      )
      if config.layout == SCANS:
        yield planned.scan_index, {
            "image": image,
            "mask": scan.mask.astype(np.uint8),
            "labels": labels,
            "slice_labels": scan.slice_labels.astype(np.uint8),
            "hematoma_ml": np.asarray(
                [scan.hematoma_ml.get(name, 0.0) for name in uem_ich_jax.SUBTYPES],
                dtype=np.float32,
            ),
            "cq500_labels": np.asarray(
                [scan.scan_labels[name] for name in uem_ich_jax.CQ500_LABELS], dtype=np.uint8
            ),
            "midline_shift_mm": np.float32(scan.midline_shift_mm),
            "spacing": spacing,
            "affine": affine,
            "scan_id": scan.scan_id,
            "patient_id": scan.patient_id,
            "fold": planned.fold,
        }
        continue
      for slice_index in range(config.num_slices):
        yield planned.scan_index * config.num_slices + slice_index, {
            "image": image[slice_index],
            "mask": scan.mask[slice_index].astype(np.uint8),
            "labels": scan.slice_labels[slice_index].astype(np.uint8),
            "boxes": np.asarray(scan.boxes[slice_index], dtype=np.float32).reshape(-1, 4),
            "box_classes": np.asarray(scan.box_classes[slice_index], dtype=np.int32),
            "spacing": spacing,
            "affine": affine,
            "slice_index": slice_index,
            "scan_id": scan.scan_id,
            "patient_id": scan.patient_id,
            "fold": planned.fold,
        }
