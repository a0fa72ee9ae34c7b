"""Turn the per-process numpy batches of the grain pipelines into global `jax.Array`s."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_global_batch(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """Assemble each process's batch into global arrays laid out by `sharding`.

  Every process passes its own batch (leading axis = per-process batch size);
  the global batch is their concatenation along axis 0, as
  `jax.make_array_from_process_local_data` builds it. `sharding` should split
  axis 0 over the data-parallel mesh axes, for example
  `NamedSharding(mesh, PartitionSpec(("data", "fsdp")))`. Text fields such as
  `scan_id` (numpy bytes arrays) cannot become `jax.Array`s and stay
  process-local numpy arrays.
  """
  out = {}
  for key, value in batch.items():
    array = np.asarray(value)
    if array.dtype.kind in "SUO":
      out[key] = array
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, array)
  return out
