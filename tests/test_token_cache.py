"""TokenCache: which batches it encodes, the replay order, its checkpoint state and size limit."""

import numpy as np
import pytest

from uem_ich_jax.errors import InputError
from uem_ich_jax.train import token_cache


def _numbered_batches():
  """An endless input whose batch n contains n in `x` and `valid`."""
  number = 0
  while True:
    yield {"x": np.full((2, 3), number, np.float32), "valid": np.array([number, number])}
    number += 1


def _cache(**changes):
  settings = {"batches": 6, "keep": ("valid",), "seed": 0, "max_bytes": 2**20} | changes
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
  cache = token_cache.TokenCache(_numbered_batches(), batches=1, keep=(), seed=0, max_bytes=2**20)
  with pytest.raises(RuntimeError, match="prepare must run before"):
    next(cache)


def test_oversized_cache_rejected():
  # 6 batches of 2 x 3 float32 tokens and 2 int64 flags: 40 bytes each.
  with pytest.raises(InputError, match="exceeded .* after 6 of 6 batches"):
    _cache(max_bytes=6 * 40 - 1)
  _cache(max_bytes=6 * 40)


def test_growing_batches_checked_as_they_fill():
  def growing():
    for number in range(1, 10):
      yield {"x": np.zeros((number, 25), np.float32)}

  # 100, 200 and 300 bytes of tokens: the third batch passes 550.
  cache = token_cache.TokenCache(growing(), batches=4, keep=(), seed=0, max_bytes=550)
  with pytest.raises(InputError, match="after 3 of 4 batches"):
    cache.prepare(lambda batch: batch["x"])


def test_failed_prepare_leaves_cache_empty():
  calls = []

  def encode(batch):
    calls.append(1)
    if len(calls) == 2:
      raise ValueError("encoder failed")
    return batch["x"]

  cache = token_cache.TokenCache(_numbered_batches(), batches=3, keep=(), seed=0, max_bytes=2**20)
  with pytest.raises(ValueError, match="encoder failed"):
    cache.prepare(encode)
  with pytest.raises(RuntimeError, match="prepare must run before"):
    next(cache)


def test_foreign_state_rejected():
  cache = _cache()
  with pytest.raises(InputError, match="not of a token cache"):
    cache.set_state(b'{"next_index": 4}')
  with pytest.raises(InputError, match="cache_tokens of the saved run"):
    cache.set_state(b"not json")


def test_missing_kept_field_named():
  with pytest.raises(InputError, match=r"missing the fields \['labels'\]"):
    _cache(keep=("labels",))
