"""Training batches whose images a frozen encoder turned into tokens once, replayed at every step.

A stage that trains a head on a frozen encoder spends most of a step encoding
images whose features never change. `TokenCache` reads the first `batches`
batches of the training input (for the aggregator, enough for K passes over
the training scans, each with its own shuffle and augmentation), encodes each
once and keeps the tokens in host memory. Training then replays the cached
batches, each once per replay, in an order drawn afresh for every replay from
(seed, replay number). The order depends only on the position, so the
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
# Marks a saved state as this iterator's, so a checkpoint of another input is recognised.
STATE_KIND = "token_cache"


class TokenCache:
  """An endless iterator over cached token batches (see the module docstring).

  Args:
    images: the training input iterator; `prepare` reads its first `batches`
      batches.
    batches: how many batches to encode and cache.
    keep: batch fields stored beside the tokens (labels, masks, `valid`).
    seed: seeds the replay order.
    max_bytes: the largest cache allowed. Filling stops with an error as soon
      as the cache exceeds it.
  """

  def __init__(
      self,
      images: Iterator[Mapping[str, Any]],
      *,
      batches: int,
      keep: tuple[str, ...],
      seed: int,
      max_bytes: float,
  ):
    if batches < 1:
      raise InputError(f"a token cache needs at least one batch, got batches={batches}")
    self._images = images
    self._count = batches
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
    """Encode the cached batches with `encode` (image batch -> tokens), once.

    The cache is kept only when every batch is encoded, so a failed call
    leaves it empty.
    """
    if self._batches:
      return
    start = time.perf_counter()
    filled: list[dict[str, np.ndarray]] = []
    total_bytes = 0
    for index in range(self._count):
      batch = next(self._images)
      missing = [key for key in self._keep if key not in batch]
      if missing:
        raise InputError(
            f"training batches are missing the fields {missing} that the token cache keeps"
        )
      cached = {key: np.asarray(batch[key]) for key in self._keep}
      cached[TOKENS] = np.asarray(encode(batch))
      total_bytes += sum(value.nbytes for value in cached.values())
      self._check_size(total_bytes, index + 1)
      filled.append(cached)
      if (index + 1) % max(1, self._count // 10) == 0 or index + 1 == self._count:
        elapsed = time.perf_counter() - start
        logger.info(
            "token cache: encoded %d of %d batches in %.0f s (%.2f s a batch), %.1f MiB",
            index + 1,
            self._count,
            elapsed,
            elapsed / (index + 1),
            total_bytes / 2**20,
        )
    self._batches = filled

  def _check_size(self, total_bytes: int, filled: int) -> None:
    if total_bytes <= self._max_bytes:
      return
    raise InputError(
        f"the token cache exceeded {self._max_bytes / 2**30:.2f} GiB of host memory after"
        f" {filled} of {self._count} batches ({total_bytes / 2**30:.2f} GiB); lower"
        " config.aggregator.cache_tokens, raise config.aggregator.cache_max_gib, or set"
        " cache_tokens to 0 to encode at every step"
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
    return json.dumps({"kind": STATE_KIND, "position": self._position}).encode()

  def set_state(self, state: bytes) -> None:
    """Continue from a state `get_state` returned.

    Raises:
      InputError: for the saved state of another input, such as a run saved
        without the token cache.
    """
    try:
      saved = json.loads(state)
    except ValueError:
      saved = None
    if not isinstance(saved, dict) or saved.get("kind") != STATE_KIND:
      raise InputError(
          "the checkpoint contains the position of another training input, not of a token cache;"
          " resume with the config.aggregator.cache_tokens of the saved run, or start a new"
          " work directory"
      )
    self._position = int(saved["position"])

  def start_prefetch(self) -> None:
    """Do nothing, because the batches are in memory. grain's checkpoint handler calls it."""

  def close(self) -> None:
    close = getattr(self._images, "close", None)
    if close is not None:
      close()
