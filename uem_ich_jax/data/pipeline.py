"""grain input pipelines over TFDS array_record data sources.

`tfds.data_source` gives random access to the examples. The pipelines pick the
examples of the requested folds and shard them over processes. They then
shuffle, read, augment, convert the stored uint8 windows to float32 in [-1, 1]
and batch.

Scan examples (`image` (S, H, W, 3), one example per scan) get a boolean
`slice_mask` (S,). Batching pads the per-slice fields (`SLICE_FIELDS`) of a
batch's scans with zeros to the smallest of the `slice_buckets` that fits its
longest scan, with `slice_mask` False on the padding, so that scans of any length
share a few shapes. Scans longer than the largest bucket are subsampled evenly.

Batches hold numpy arrays for this process only (`batch_size` is per process);
the trainer turns them into global `jax.Array`s. Every batch has a boolean
`valid` (batch,): all True in training, False on the padding that evaluation
adds so that no example is dropped and none is counted twice.

Worker processes: with `worker_count > 0`, grain 0.2.18's `mp_prefetch` starts
its workers with the multiprocessing "spawn" method, so they never fork a
process in which JAX has started. grain 0.2.18 imports the jax module itself,
but the transforms here use numpy only, so a worker never starts a JAX backend. Batches from workers live in shared memory until
they are garbage collected; close the iterator (`iterator.close()`) when done.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pathlib
import pkgutil
from collections.abc import Sequence
from typing import Any

import grain
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from uem_ich_jax.ct.windowing import uint8_to_model_input
from uem_ich_jax.data import augment as augment_lib
from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)


class DataPipelineError(InputError):
  """Invalid pipeline input (folds, shard, batch size); the message names the value."""


def load_source(name: str, *, split: str = "train", data_dir: str | None = None):
  """Open `split` of the built TFDS dataset `name` (for example "synthetic_ich/slices").

  Only array_record datasets support random access; build them with
  `uem-ich build-dataset`. A dataset that is not built is an error here: TFDS
  would otherwise start building it as TFRecord, which needs TensorFlow.
  """
  dataset, _, config = name.partition("/")
  try:
    importlib.import_module(f"uem_ich_jax.datasets.{dataset}")
  except ModuleNotFoundError as error:
    if error.name != f"uem_ich_jax.datasets.{dataset}":
      raise
    # Not one of this project's builders: TFDS may still know it.
  build_command = f"uem-ich build-dataset {dataset}"
  if config:
    build_command += f" --config={config}"
  if data_dir is not None and dataset in project_builders():
    # Checked before TFDS looks, because TFDS logs a warning about a missing
    # dataset_info.json that misleads when nothing was ever built there.
    folder = pathlib.Path(data_dir) / dataset / config if config else pathlib.Path(data_dir) / dataset
    if not folder.is_dir():
      raise DataPipelineError(
          f"dataset {name!r} is not built in {data_dir} (no folder {folder});"
          f" build it first: {build_command} --data-dir={data_dir}"
      )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
    message = str(error).splitlines()[0]
    raise DataPipelineError(
        f"cannot open dataset {name!r}: {message} The builders of this version of uem-ich-jax"
        f" are {project_builders()}."
    ) from error
  if not builder.is_prepared():
    raise DataPipelineError(
        f"dataset {name!r} is not built in {builder.data_dir_root};"
        f" build it first: {build_command} --data-dir={builder.data_dir_root}"
    )
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def project_builders() -> list[str]:
  """Name the TFDS builders that ship with this project (the packages in `uem_ich_jax.datasets`)."""
  import uem_ich_jax.datasets

  return sorted(module.name for module in pkgutil.iter_modules(uem_ich_jax.datasets.__path__) if module.ispkg)


# Batch fields that the pipelines add themselves, so no dataset needs them.
PIPELINE_FIELDS = ("valid", "slice_mask")


def check_fields(source: Any, fields: Sequence[str], *, scans: bool, name: str) -> None:
  """Check that `source` stores `fields` and examples of the expected layout, before any reading.

  Args:
    source: a TFDS data source.
    fields: batch fields a stage needs; `PIPELINE_FIELDS` are skipped.
    scans: True when the stage needs scan examples (`image` (S, H, W, 3)),
      False for slice examples (`image` (H, W, 3)).
    name: the dataset name, for the message.

  Raises:
    DataPipelineError: a field is not a feature of the dataset, or the image
      rank is that of the other layout. A source without `dataset_info`
      features passes unchecked.
  """
  info = getattr(source, "dataset_info", None)
  features = getattr(info, "features", None)
  if features is None:
    return
  stored = set(features.keys())
  # The layout is checked first, because a scan dataset also lacks slice
  # fields such as `slice_index`, and the layout is what the user must change.
  if "image" in stored:
    rank = len(features["image"].shape)
    if rank != (4 if scans else 3):
      layouts = {3: "slices (H, W, 3)", 4: "scans (S, H, W, 3)"}
      stored_layout = layouts.get(rank, f"images of rank {rank}")
      needed_layout = layouts[4 if scans else 3]
      raise DataPipelineError(
          f"dataset {name!r} stores {stored_layout}, but this stage needs {needed_layout};"
          " choose a config of the dataset with that layout"
      )
  missing = [field for field in fields if field not in PIPELINE_FIELDS and field not in stored]
  if missing:
    raise DataPipelineError(
        f"dataset {name!r} has no feature {', '.join(map(repr, missing))}, which this stage"
        f" needs; its features are {sorted(stored)}"
    )


def _metadata_fold_ranges(source: Any) -> list | None:
  info = getattr(source, "dataset_info", None)
  metadata = getattr(info, "metadata", None)
  if metadata is None:
    return None
  # TFDS's LazyMetadataDict loads its file in items(), not in get().
  entries = dict(metadata.items())
  split = str(getattr(source, "split", "train"))
  ranges = entries.get("fold_ranges", {}).get(split)
  if ranges is None:
    return None
  total = sum(stop - start for start, stop, _ in ranges)
  if total != len(source):
    # A split slice such as "train[:50%]" no longer matches the stored ranges.
    logger.warning(
        "fold_ranges in the metadata of %s cover %d examples but the split %r has %d;"
        " reading the fold of every example instead",
        info.name,
        total,
        split,
        len(source),
    )
    return None
  return ranges


def fold_indices(source: Any, folds: Sequence[int]) -> np.ndarray:
  """Indices of the examples of `source` whose `fold` is in `folds`, ascending.

  Uses the `fold_ranges` a builder stores in its metadata (see the synthetic_ich
  builder), which costs nothing; without it every example is read once.
  """
  requested = {int(fold) for fold in folds}
  if not requested:
    raise DataPipelineError("folds is empty; name at least one fold to read")

  ranges = _metadata_fold_ranges(source)
  if ranges is not None:
    parts = [np.arange(start, stop) for start, stop, fold in ranges if fold in requested]
    indices = np.concatenate(parts) if parts else np.zeros((0,), dtype=np.int64)
    return np.sort(indices).astype(np.int64)

  # TODO: a builder without stored fold ranges costs a full read of the split
  # (images included) here; store the ranges in every builder's metadata.
  logger.warning("no fold_ranges in the dataset metadata; reading all %d examples", len(source))
  return np.array(
      [index for index in range(len(source)) if int(source[index]["fold"]) in requested],
      dtype=np.int64,
  )


def other_folds(fold: int, num_folds: int) -> list[int]:
  """Return all folds but `fold`: the training folds when `fold` is evaluated."""
  if not 0 <= fold < num_folds:
    raise DataPipelineError(f"fold {fold} is outside 0..{num_folds - 1}")
  return [k for k in range(num_folds) if k != fold]


def patient_subset(
    source: Any, indices: np.ndarray, fraction: float, *, seed: int = 0
) -> np.ndarray:
  """Keep the examples of a seeded random `fraction` of the patients among `indices`.

  Patients are the distinct `patient_id`s of the examples. round(fraction x
  count) of them are kept (at least one), drawn by a permutation seeded with
  `seed`, so the same seed keeps the same patients whatever the training seed.
  All examples of a kept patient stay, so that no patient is split. This is how
  a "10% of the labelled patients" experiment is set up.
  """
  if not 0.0 < fraction <= 1.0:
    raise DataPipelineError(f"the patient fraction must be in (0, 1], got {fraction}")
  if fraction == 1.0:
    return indices
  # TODO: reading the ids decodes every example of the training folds once.
  # Builders could store the patient of each example in their metadata, as
  # they do for folds.
  patients = np.asarray([_text(source[int(index)]["patient_id"]) for index in indices])
  if np.any(patients == ""):
    raise DataPipelineError("some examples have no patient_id; cannot select a fraction of patients")
  unique = np.unique(patients)
  count = max(1, round(fraction * len(unique)))
  kept = np.random.default_rng(seed).permutation(unique)[:count]
  selected = indices[np.isin(patients, kept)]
  logger.info(
      "kept %d of %d patients (%d of %d examples), patient seed %d",
      count,
      len(unique),
      len(selected),
      len(indices),
      seed,
  )
  return selected


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    # jax.process_index() starts the JAX backend, so it runs only when the
    # caller gives no shard.
    import jax

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise DataPipelineError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
  return shard_index, shard_count


@dataclasses.dataclass
class ReadExample(grain.transforms.Map):
  """Read example `index` of the data source; index -1 gives a padding example."""

  source: Any
  padding: dict[str, Any] | None = None

  def map(self, index: int) -> dict[str, Any]:
    if index < 0:
      if self.padding is None:
        raise DataPipelineError("padding index -1 in a pipeline without a padding example")
      return dict(self.padding)
    example = dict(self.source[int(index)])
    example["valid"] = np.bool_(True)
    return example


@dataclasses.dataclass
class ToModelInput(grain.transforms.Map):
  """Convert the uint8 image to float32 in [-1, 1] and text ids to bytes."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    out = dict(example)
    out["image"] = np.asarray(uint8_to_model_input(np.asarray(example["image"])), np.float32)
    for key in ("scan_id", "patient_id"):
      if key in out and isinstance(out[key], str):
        out[key] = out[key].encode()
    return out


@dataclasses.dataclass
class RandomAugment(grain.transforms.RandomMap):
  """`augment.random_augment` with grain's per-example generator."""

  config: augment_lib.AugmentConfig

  def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return augment_lib.random_augment(example, rng, self.config)


@dataclasses.dataclass
class PadBoxes(grain.transforms.Map):
  """Pad `boxes` to (max_boxes, 4) and `box_classes` to (max_boxes,) with class 0.

  Class 0 (background) marks padding. Boxes beyond `max_boxes` are dropped with
  a warning.
  """

  max_boxes: int

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    if "boxes" not in example:
      return example
    out = dict(example)
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    classes = np.asarray(example["box_classes"], np.int32).reshape(-1)
    if boxes.shape[0] > self.max_boxes:
      logger.warning(
          "example of scan %r has %d boxes; keeping the first max_boxes=%d",
          example.get("scan_id"),
          boxes.shape[0],
          self.max_boxes,
      )
      boxes, classes = boxes[: self.max_boxes], classes[: self.max_boxes]
    out["boxes"] = np.zeros((self.max_boxes, 4), np.float32)
    out["boxes"][: boxes.shape[0]] = boxes
    out["box_classes"] = np.zeros((self.max_boxes,), np.int32)
    out["box_classes"][: classes.shape[0]] = classes
    return out


# Scan fields with one entry per slice along axis 0; batching pads them and
# subsampling picks from them. After the common ones come the per-slice
# features of the real builders' scan configs (RSNA, PhysioNet), so that
# their scans of different lengths batch together.
SLICE_FIELDS = (
    "image", "mask", "slice_labels", "slice_mask",
    "hu_unwrapped", "sop_instance_uids", "slice_fracture", "slice_numbers",
)

# Subsampled scans are logged one by one up to this count per process, and
# later ones are not, so that a dataset of long scans does not flood the log.
_MAX_SUBSAMPLE_WARNINGS = 10


def check_slice_buckets(slice_buckets: Sequence[int] | None) -> tuple[int, ...] | None:
  """Return `slice_buckets` as a tuple, or raise DataPipelineError unless it is strictly increasing positive integers."""
  if slice_buckets is None:
    return None
  buckets = tuple(slice_buckets)
  if not buckets or any(
      isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1
      for size in buckets
  ):
    raise DataPipelineError(
        f"slice_buckets must be positive integer slice counts, got {slice_buckets!r}"
    )
  if any(later <= earlier for earlier, later in zip(buckets, buckets[1:])):
    raise DataPipelineError(f"slice_buckets must be strictly increasing, got {slice_buckets!r}")
  return tuple(int(size) for size in buckets)


def slice_bucket(num_slices: int, slice_buckets: Sequence[int] | None) -> int:
  """Return the smallest bucket of at least `num_slices` slices (`num_slices` itself without buckets).

  Raises DataPipelineError when the largest bucket is smaller; `FitSlices`
  subsamples such scans before batching.
  """
  if slice_buckets is None:
    return num_slices
  for size in slice_buckets:
    if size >= num_slices:
      return size
  raise DataPipelineError(
      f"a scan of {num_slices} slices does not fit the largest slice bucket {slice_buckets[-1]}"
  )


def even_slice_indices(num_slices: int, count: int) -> np.ndarray:
  """Pick `count` of `num_slices` slice indices, evenly spaced, first and last included.

  The indices are int(linspace(0, num_slices - 1, count)), as the upstream
  picks 64 slices of a longer scan.
  """
  return np.linspace(0, num_slices - 1, count).astype(np.int64)


@dataclasses.dataclass
class FitSlices(grain.transforms.Map):
  """Add `slice_mask` to scan examples and subsample those longer than the largest bucket.

  Slice examples (`image` of rank 3) pass through unchanged.
  NOTE: a subsampled scan keeps its stored `spacing` (and any `affine`), which
  then describe the original slice grid, not the kept slices.
  """

  slice_buckets: tuple[int, ...] | None = None

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(example["image"])
    if image.ndim != 4:
      return example
    out = dict(example)
    num_slices = image.shape[0]
    out["slice_mask"] = np.ones((num_slices,), np.bool_)
    if self.slice_buckets is None or num_slices <= self.slice_buckets[-1]:
      return out
    count = self.slice_buckets[-1]
    _warn_subsampled(example.get("scan_id"), num_slices, count)
    kept = even_slice_indices(num_slices, count)
    for key in SLICE_FIELDS:
      if key in out:
        out[key] = np.asarray(out[key])[kept]
    return out


_subsample_warnings = 0


def _warn_subsampled(scan_id: Any, num_slices: int, count: int) -> None:
  global _subsample_warnings
  _subsample_warnings += 1
  if _subsample_warnings <= _MAX_SUBSAMPLE_WARNINGS:
    logger.warning(
        "scan %r has %d slices, more than the largest slice bucket; keeping %d evenly spaced"
        " slices%s",
        scan_id,
        num_slices,
        count,
        "; further subsampled scans are not logged"
        if _subsample_warnings == _MAX_SUBSAMPLE_WARNINGS
        else "",
    )


def _pad_slices(example: dict[str, Any], num_slices: int) -> dict[str, Any]:
  """Pad the per-slice fields of a scan example with zeros to `num_slices`."""
  out = dict(example)
  for key in SLICE_FIELDS:
    if key not in out:
      continue
    value = np.asarray(out[key])
    missing = num_slices - value.shape[0]
    if missing:
      padding = np.zeros((missing, *value.shape[1:]), value.dtype)
      out[key] = np.concatenate([value, padding], axis=0)
  return out


@dataclasses.dataclass
class BatchScans:
  """Batch scan examples, padded to the smallest slice bucket that fits the longest of them.

  Without buckets the scans are padded to the longest scan of the batch.
  """

  slice_buckets: tuple[int, ...] | None = None

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    longest = max(np.shape(example["slice_mask"])[0] for example in examples)
    size = slice_bucket(longest, self.slice_buckets)
    padded = [_pad_slices(example, size) for example in examples]
    batch = {}
    for key in padded[0]:
      shapes = {np.shape(example[key]) for example in padded}
      if len(shapes) > 1:
        raise DataPipelineError(
            f"scan field {key!r} has the shapes {sorted(shapes)} in one batch; a field with one"
            f" entry per slice must be listed in pipeline.SLICE_FIELDS {SLICE_FIELDS} to be padded"
        )
      batch[key] = np.stack([example[key] for example in padded])
    return batch


def _is_scan_source(source: Any, index: int) -> bool:
  return np.ndim(source[int(index)]["image"]) == 4


def _batch(
    dataset: grain.MapDataset,
    batch_size: int,
    *,
    drop_remainder: bool,
    scans: bool,
    slice_buckets: tuple[int, ...] | None,
) -> grain.MapDataset:
  if not scans:
    return dataset.batch(batch_size, drop_remainder=drop_remainder)
  # TODO: each process pads its own batch, so several processes can pick
  # different buckets and then fail to form one global batch. A single bucket
  # avoids that until the processes agree on the bucket.
  return dataset.batch(
      batch_size, drop_remainder=drop_remainder, batch_fn=BatchScans(slice_buckets)
  )


def _padding_example(source: Any, index: int) -> dict[str, Any]:
  """Build an example shaped like `source[index]`: zeros, empty ids, `valid` False."""
  example = dict(source[int(index)])
  padding = {}
  for key, value in example.items():
    if isinstance(value, (bytes, str)):
      padding[key] = type(value)()
    else:
      array = np.asarray(value)
      if array.ndim and 0 in array.shape:
        padding[key] = array
      else:
        padding[key] = np.zeros_like(array)
  padding["valid"] = np.bool_(False)
  if "boxes" in padding:
    padding["boxes"] = np.zeros((0, 4), np.float32)
    padding["box_classes"] = np.zeros((0,), np.int32)
  return padding


def _finish(
    dataset: grain.MapDataset, worker_count: int, read_threads: int
) -> grain.IterDataset:
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
  if worker_count > 0:
    # grain 0.2.18 reads its absl flags when it starts workers, which fails in
    # a program that never parsed absl flags (pytest, the uem-ich command), so
    # their defaults are taken as parsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter_dataset


def train_shard(
    source: Any,
    *,
    folds: Sequence[int],
    batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    patient_fraction: float = 1.0,
    patient_seed: int = 0,
) -> np.ndarray:
  """Return the example indices one pass of `train_dataset` reads in this shard, before shuffling.

  The arguments mean what they mean in `train_dataset`.
  """
  if batch_size < 1:
    raise DataPipelineError(f"batch_size must be at least 1, got {batch_size}")
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  indices = patient_subset(
      source, fold_indices(source, folds), patient_fraction, seed=patient_seed
  )
  per_shard = len(indices) // shard_count
  if per_shard < batch_size:
    raise DataPipelineError(
        f"folds {list(folds)} hold {len(indices)} examples, {per_shard} per shard over"
        f" {shard_count} shards: fewer than one batch of {batch_size}"
    )
  return indices[: per_shard * shard_count][shard_index::shard_count]


def train_dataset(
    source: Any,
    *,
    folds: Sequence[int],
    batch_size: int,
    seed: int,
    augment: augment_lib.AugmentConfig | None = augment_lib.AugmentConfig(),
    max_boxes: int = 16,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 4,
    patient_fraction: float = 1.0,
    patient_seed: int = 0,
    slice_buckets: Sequence[int] | None = None,
) -> grain.IterDataset:
  """Shuffled, augmented training batches of the examples in `folds`.

  Args:
    source: a TFDS data source (`load_source`).
    folds: folds to train on (see `other_folds`).
    batch_size: examples per batch in this process. With `num_epochs` None a
      batch may span two passes; with a finite `num_epochs` the last partial
      batch is dropped.
    seed: seeds the shuffle and the augmentation; the same seed, shard and
      sizes give the same batches.
    augment: augmentation ranges, or None for none.
    max_boxes: boxes per example after padding.
    num_epochs: passes over the data, or None to repeat forever.
    shard_index, shard_count: this process's share of the examples; default
      `jax.process_index()` and `jax.process_count()`. Every shard gets the same
      number of examples (up to shard_count - 1 are left out), so that every
      process takes the same number of steps.
    worker_count: grain worker processes (0 reads in this process).
    read_threads: threads that read and transform examples in each process.
    patient_fraction, patient_seed: train on the examples of this fraction of
      the patients only (see `patient_subset`).
    slice_buckets: increasing slice counts that scan batches are padded to
      (see `BatchScans`); None pads each batch to its longest scan. Slice
      datasets ignore it.

  Returns:
    A grain `IterDataset`; its iterators support `get_state`/`set_state`.
  """
  slice_buckets = check_slice_buckets(slice_buckets)
  shard = train_shard(
      source,
      folds=folds,
      batch_size=batch_size,
      shard_index=shard_index,
      shard_count=shard_count,
      patient_fraction=patient_fraction,
      patient_seed=patient_seed,
  )
  dataset = grain.MapDataset.source(shard.tolist()).shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.map(ReadExample(source))
  dataset = dataset.map(ToModelInput())
  if augment is not None:
    dataset = dataset.random_map(RandomAugment(augment), seed=seed)
  dataset = dataset.map(PadBoxes(max_boxes))
  dataset = dataset.map(FitSlices(slice_buckets))
  dataset = _batch(
      dataset,
      batch_size,
      drop_remainder=True,
      scans=_is_scan_source(source, shard[0]),
      slice_buckets=slice_buckets,
  )
  return _finish(dataset, worker_count, read_threads)


def eval_dataset(
    source: Any,
    *,
    folds: Sequence[int],
    batch_size: int,
    max_boxes: int = 16,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 4,
    slice_buckets: Sequence[int] | None = None,
) -> grain.IterDataset:
  """One ordered pass over the examples in `folds`, padded to whole batches.

  Each shard gets `ceil(ceil(n / shard_count) / batch_size)` batches, so every
  process runs the same number of evaluation steps. The padding examples are
  zeros with `valid` False; summing over `valid` counts every example exactly
  once over all shards. Scan batches are padded to `slice_buckets` as in
  `train_dataset`.
  """
  if batch_size < 1:
    raise DataPipelineError(f"batch_size must be at least 1, got {batch_size}")
  slice_buckets = check_slice_buckets(slice_buckets)
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  indices = fold_indices(source, folds)
  if len(indices) == 0:
    raise DataPipelineError(f"folds {list(folds)} hold no examples")

  shard = indices[shard_index::shard_count]
  per_shard = -(-len(indices) // shard_count)
  num_batches = -(-per_shard // batch_size)
  padded = np.full((num_batches * batch_size,), -1, dtype=np.int64)
  padded[: len(shard)] = shard

  dataset = grain.MapDataset.source(padded.tolist())
  dataset = dataset.map(ReadExample(source, padding=_padding_example(source, indices[0])))
  dataset = dataset.map(ToModelInput())
  dataset = dataset.map(PadBoxes(max_boxes))
  dataset = dataset.map(FitSlices(slice_buckets))
  dataset = _batch(
      dataset,
      batch_size,
      drop_remainder=False,
      scans=_is_scan_source(source, indices[0]),
      slice_buckets=slice_buckets,
  )
  return _finish(dataset, worker_count, read_threads)
