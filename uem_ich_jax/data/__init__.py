"""grain input pipelines: fold selection, augmentation, batching, eval padding.

`uem_ich_jax.data.global_batch.to_global_batch` turns the per-process batches
into global `jax.Array`s.
"""

from uem_ich_jax.data.augment import AugmentConfig, AugmentParams, apply_augmentation
from uem_ich_jax.data.pipeline import (
    DataPipelineError,
    eval_dataset,
    fold_indices,
    load_source,
    other_folds,
    train_dataset,
)
