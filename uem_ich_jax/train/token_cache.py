"""Training batches whose images a frozen encoder turned into tokens once, replayed at every step.

A stage that trains a head on a frozen encoder spends most of a step encoding
images whose features never change. `TokenCache` reads `copies` passes of the
training input, each with its own shuffle and augmentation, encodes every
batch once and keeps the tokens in host memory. Training then replays these
batches, all of them once per pass, in an order drawn afresh for each pass
from (seed, pass). The order depends only on the position, so the
checkpointed state is one integer. A resumed run encodes the same batches
again, because the input pipeline and the frozen encoder are deterministic.

It implements the iterator protocol of grain's checkpoint handler
(`get_state` returning bytes, `set_state`, `start_prefetch`), so the trainer
saves and restores it as it does a grain iterator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from uem_ich_jax.errors import InputError

logger = logging.getLogger(__name__)

# Field the tokens are stored under in a cached batch.
TOKENS = "tokens"


class TokenCache:
  """An endless iterator over cached token batches (see the module docstring).

  Args:
    images: the training input iterator; only its first
      `copies * batches_per_copy` batches are read, by `prepare`.
    copies: passes of the training input to encode.
    batches_per_copy: batches in one pass of the training input.
    keep: batch fields stored beside the tokens (labels, masks, `valid`).
    seed: seeds the replay order.
    max_bytes: the largest cache allowed, checked after the first batch.
  """

  def __init__(
      self,
      images: Iterator[Mapping[str, Any]],
      *,
      copies: int,
      batches_per_copy: int,
      keep: tuple[str, ...],
      seed: int,
      max_bytes: float,
  ):
    if copies < 1 or batches_per_copy < 1:
      raise InputError(
          f"a token cache needs at least one copy and one batch per copy, got copies={copies}"
          f" and batches_per_copy={batches_per_copy}"
      )
    self._images = images
    self._count = copies * batches_per_copy
    self._keep = tuple(keep)
    self._seed = seed
    self._max_bytes = max_bytes
    self._batches: list[dict[str, np.ndarray]] = []
    self._position = 0

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """The fields of every batch this iterator yields."""
    return (TOKENS, *self._keep)

  def prepare(self, encode: Callable[[Mapping[str, Any]], np.ndarray]) -> None:
    """Encode the cached batches with `encode` (image batch -> tokens), once."""
    if self._batches:
      return
    start = time.perf_counter()
    for index in range(self._count):
      batch = next(self._images)
      missing = [key for key in self._keep if key not in batch]
      if missing:
        raise InputError(f"training batches lack the fields {missing} that the token cache keeps")
      cached = {key: np.asarray(batch[key]) for key in self._keep}
      cached[TOKENS] = np.asarray(encode(batch))
      if index == 0:
        self._check_size(sum(value.nbytes for value in cached.values()))
      self._batches.append(cached)
      if (index + 1) % max(1, self._count // 10) == 0 or index + 1 == self._count:
        elapsed = time.perf_counter() - start
        logger.info(
            "token cache: encoded %d of %d batches in %.0f s (%.2f s a batch)",
            index + 1,
            self._count,
            elapsed,
            elapsed / (index + 1),
        )

  def _check_size(self, batch_bytes: int) -> None:
    total = batch_bytes * self._count
    if total > self._max_bytes:
      raise InputError(
          f"the token cache would take {total / 2**30:.1f} GiB of host memory ({self._count}"
          f" batches of {batch_bytes / 2**20:.1f} MiB), more than the allowed"
          f" {self._max_bytes / 2**30:.1f} GiB; lower config.aggregator.cache_tokens, raise"
          " config.aggregator.cache_max_gib, or set cache_tokens to 0 to encode at every step"
      )
    logger.info(
        "token cache: %d batches, %.1f MiB in host memory", self._count, total / 2**20
    )

  def __iter__(self) -> TokenCache:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._batches:
      raise RuntimeError("TokenCache.prepare must run before the first batch is read")
    count = len(self._batches)
    replay, index = divmod(self._position, count)
    order = np.random.default_rng([self._seed, replay]).permutation(count)
    self._position += 1
    return self._batches[order[index]]

  def get_state(self) -> bytes:
    return json.dumps({"position": self._position}).encode()

  def set_state(self, state: bytes) -> None:
    self._position = int(json.loads(state)["position"])

  def start_prefetch(self) -> None:
    """Nothing to prefetch: the batches are in memory. grain's checkpoint handler calls it."""

  def close(self) -> None:
    close = getattr(self._images, "close", None)
    if close is not None:
      close()
