"""TokenCache: which batches it encodes, the replay order, its checkpoint state and size limit."""

import numpy as np
import pytest

from uem_ich_jax.errors import InputError
from uem_ich_jax.train import token_cache


def _numbered_batches():
  """An endless input whose batch n holds n in `x` and `valid`."""
  number = 0
  while True:
    yield {"x": np.full((2, 3), number, np.float32), "valid": np.array([number, number])}
    number += 1


def _cache(**changes):
  settings = {"copies": 2, "batches_per_copy": 3, "keep": ("valid",), "seed": 0,
              "max_bytes": 2**20} | changes
  cache = token_cache.TokenCache(_numbered_batches(), **settings)
  cache.prepare(lambda batch: batch["x"] * 10)
  return cache


def _numbers(cache, count):
  return [int(next(cache)["valid"][0]) for _ in range(count)]


def test_each_pass_replays_every_batch():
  cache = _cache()
  numbers = _numbers(cache, 18)
  for replay in range(3):
    assert sorted(numbers[6 * replay: 6 * (replay + 1)]) == [0, 1, 2, 3, 4, 5]
  # Three passes in the same order would mean the order is not redrawn.
  assert len({tuple(numbers[6 * k: 6 * (k + 1)]) for k in range(3)}) > 1


def test_tokens_come_from_encode():
  batch = next(_cache())
  np.testing.assert_array_equal(batch["tokens"], np.full((2, 3), 10 * batch["valid"][0]))
  assert set(batch) == {"tokens", "valid"}


def test_restored_position_continues_sequence():
  original = _cache()
  _numbers(original, 4)
  state = original.get_state()
  expected = _numbers(original, 9)
  restored = _cache()
  restored.set_state(state)
  restored.start_prefetch()
  assert _numbers(restored, 9) == expected


def test_seed_changes_order():
  assert _numbers(_cache(seed=0), 6) != _numbers(_cache(seed=1), 6)


def test_read_before_prepare_raises():
  cache = token_cache.TokenCache(
      _numbered_batches(), copies=1, batches_per_copy=1, keep=(), seed=0, max_bytes=2**20
  )
  with pytest.raises(RuntimeError, match="prepare must run before"):
    next(cache)


def test_oversized_cache_rejected():
  # 6 batches of 2 x 3 float32 tokens and 2 int64 flags: 40 bytes each.
  with pytest.raises(InputError, match="would take .* more than the allowed"):
    _cache(max_bytes=6 * 40 - 1)
  _cache(max_bytes=6 * 40)


def test_missing_kept_field_named():
  with pytest.raises(InputError, match=r"lack the fields \['labels'\]"):
    _cache(keep=("labels",))
