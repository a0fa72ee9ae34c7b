"""The device mesh, multi-host start-up, and the rule table that shards parameters.

One mesh with axes `data` and `fsdp` serves every stage: the batch is split over
both axes, and parameters plus optimizer state are split over `fsdp` by
`SHARDING_RULES`. With `fsdp` = 1 every parameter is replicated and the run is
plain data parallel.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_SPEC = PartitionSpec(MESH_AXES)

# Parameter path (joined with "/") -> tactic; the first matching rule wins.
# "fsdp" splits the largest dimension that the fsdp axis divides evenly and
# falls back to replication when none does. Arrays smaller than
# `min_shard_size` elements are replicated whatever their rule, because splitting
# them saves little memory and costs a collective each.
SHARDING_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(bias|scale|gamma|beta)$", "replicate"),  # norms, GRN, biases
    (r"(^|/)(count|step)$", "replicate"),  # optimizer counters
    (r"(^|/)(kernel|embedding|weight)$", "fsdp"),  # convolutions and dense layers
    (r".*", "fsdp"),
)


class MeshError(InputError):
  """The configured mesh does not fit the devices; the message gives both."""


def _environment_asks_for_distributed() -> bool:
  # The variables jax.distributed.initialize() reads by itself, the cluster
  # managers it detects (SLURM, Open MPI), and this project's own variables.
  names = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "UEM_ICH_NUM_PROCESSES")
  return any(name in os.environ for name in names)


def maybe_initialize_distributed(mode: str) -> bool:
  """Call `jax.distributed.initialize()` when requested, before any other JAX call.

  `mode` (config.distributed) "on" always initialises, "off" never does, and
  "auto" initialises when the environment names a coordinator or a cluster
  (`JAX_COORDINATOR_ADDRESS`, SLURM, Open MPI, `UEM_ICH_NUM_PROCESSES`). On a
  Cloud TPU pod or under SLURM, JAX finds the addresses and process ids
  itself. Elsewhere set `JAX_COORDINATOR_ADDRESS=host:port`,
  `UEM_ICH_NUM_PROCESSES` and `UEM_ICH_PROCESS_ID` in every process. With
  `JAX_PLATFORMS=cpu` the CPU collectives switch to gloo, which lets several
  processes on one machine stand in for several hosts.
  Returns whether JAX runs distributed.

  NOTE: tested with two processes on one CPU machine (gloo), not yet on a TPU
  pod or on several GPU hosts.
  """
  if mode not in ("on", "off", "auto"):
    raise MeshError(f"config.distributed must be 'on', 'off' or 'auto', got {mode!r}")
  requested = _environment_asks_for_distributed() if mode == "auto" else mode == "on"
  if not requested:
    return False
  if jax.distributed.is_initialized():
    return True

  options = {}
  if "UEM_ICH_NUM_PROCESSES" in os.environ:
    try:
      options["num_processes"] = int(os.environ["UEM_ICH_NUM_PROCESSES"])
      options["process_id"] = int(os.environ["UEM_ICH_PROCESS_ID"])
    except (KeyError, ValueError) as error:
      raise MeshError(
          "UEM_ICH_NUM_PROCESSES needs UEM_ICH_PROCESS_ID, both integers; got"
          f" {os.environ.get('UEM_ICH_NUM_PROCESSES')!r} and"
          f" {os.environ.get('UEM_ICH_PROCESS_ID')!r}"
      ) from error
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**options)
  logger.info(
      "jax.distributed started: process %d of %d, %d local and %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return True


def mesh_shape(axis_sizes: Mapping[str, int], device_count: int) -> tuple[int, ...]:
  """Resolve the configured axis sizes (at most one -1, meaning fill) to a shape."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(axis_sizes.get(axis, 1)) for axis in MESH_AXES]
  fill = [index for index, size in enumerate(sizes) if size == -1]
  if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise MeshError(f"config.mesh {dict(axis_sizes)}: sizes must be positive, with at most one -1")
  fixed = math.prod(size for size in sizes if size != -1)
  if fill:
    if device_count % fixed:
      raise MeshError(
          f"config.mesh {dict(axis_sizes)}: {device_count} devices do not divide by {fixed}"
      )
    sizes[fill[0]] = device_count // fixed
  if math.prod(sizes) != device_count:
    raise MeshError(
        f"config.mesh {dict(axis_sizes)} needs {math.prod(sizes)} devices, but there are"
        f" {device_count}"
    )
  return tuple(sizes)


def create_mesh(
    axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Build the (data, fsdp) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axis_sizes, len(devices))
  # Auto axes: the jitted steps state their shardings at the boundary and XLA
  # places the intermediates (jax.make_mesh defaults to Explicit axes, which
  # would require a sharding on every convolution inside the model).
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    # Orders devices so that fsdp neighbours share the fastest links.
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def path_name(path: tuple[Any, ...]) -> str:
  """Join a pytree key path into "a/b/c" for the rule table and for logs."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _tactic(name: str, rules: Sequence[tuple[str, str]]) -> str:
  for pattern, tactic in rules:
    if re.search(pattern, name):
      return tactic
  return "replicate"


def partition_spec(
    name: str,
    shape: Sequence[int],
    fsdp_size: int,
    *,
    rules: Sequence[tuple[str, str]] = SHARDING_RULES,
    min_shard_size: int = 2**14,
) -> PartitionSpec:
  """Return the PartitionSpec of one array named `name` (its "/"-joined path)."""
  if fsdp_size == 1 or math.prod(shape) < min_shard_size:
    return PartitionSpec()
  if _tactic(name, rules) != "fsdp":
    return PartitionSpec()
  # The largest evenly divisible dimension; the later one wins a tie, which
  # puts convolution kernels' output channels on fsdp.
  candidates = [(size, index) for index, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, *, min_shard_size: int = 2**14) -> Any:
  """NamedShardings for every array leaf of `tree` (params, optimizer state, or both).

  Leaves are matched by path, so optimizer moments (`.../mu/encoder/.../kernel`)
  get the same spec as the parameter they track.
  """
  fsdp_size = mesh.shape["fsdp"]

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    spec = partition_spec(path_name(path), shape, fsdp_size, min_shard_size=min_shard_size)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)


def replicated_share(tree: Any, shardings: Any) -> float:
  """Return the fraction of the bytes of `tree` that every device stores in full."""
  total = 0
  replicated = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += size
    if sharding.is_fully_replicated:
      replicated += size
  return replicated / total if total else 0.0


def check_replicated_share(share: float, fsdp_size: int, limit: float) -> None:
  """Raise MeshError when fsdp splits parameters but more than `limit` of their bytes stay whole.

  `share` is `replicated_share` of the parameters. With `fsdp_size` 1 every
  parameter is replicated by design, so nothing is checked.
  """
  if fsdp_size > 1 and share > limit:
    raise MeshError(
        f"{100 * share:.1f}% of the parameter bytes would be stored whole on every device with"
        f" fsdp = {fsdp_size}, above config.max_replicated_share = {limit}. Lower"
        " config.min_shard_size, pick an fsdp size that divides the channel counts, or add a rule"
        " to mesh.SHARDING_RULES"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over both mesh axes, the rest whole."""
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
