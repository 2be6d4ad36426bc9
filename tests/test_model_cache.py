"""The explicit KV cache: incremental decoding equals the full causal forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax.models.llama import KVCache
from tests.helpers import max_abs_diff, random_model, random_tokens, tiny_config

TOL = 1e-5
MAX_LEN = 32


@pytest.fixture(scope="module")
def model():
  return random_model(tiny_config(), seed=3)


@jax.jit
def _jit_forward(graphdef, state, tokens_BT, cache=None, positions_BT=None):
  return nnx.merge(graphdef, state)(tokens_BT, cache, positions_BT)


@pytest.fixture(scope="module")
def step():
  """The cached forward, jitted (compiled once per input shape)."""

  def _step(model, tokens, cache, positions=None):
    return _jit_forward(*nnx.split(model), jnp.asarray(tokens), cache, positions)

  return _step


def _full(model, tokens):
  """The plain causal forward, no cache."""
  return np.asarray(_jit_forward(*nnx.split(model), jnp.asarray(tokens)))


def _decode(model, step, tokens, prefix, chunks):
  """Prefill tokens[:, :prefix], then feed the rest in pieces of the given sizes; returns
  the logits of every position [B, T, V] and the final cache."""
  B, T = tokens.shape
  cache = KVCache.zeros(model.config, B, MAX_LEN)
  pieces = [prefix] + list(chunks)
  assert sum(pieces) == T
  outs, start = [], 0
  for n in pieces:
    logits, cache = step(model, tokens[:, start : start + n], cache)
    assert logits.shape == (B, n, model.config.vocab_size)
    start += n
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), [start] * B)
    outs.append(np.asarray(logits))
  return np.concatenate(outs, axis=1), cache


def all_keys(cache) -> np.ndarray:
  """Every layer's keys as [L, B, K, S, E]."""
  return np.stack([np.asarray(cache.keys(layer)) for layer in range(len(cache.k_RSE))])


def test_prefill_only_matches_full_forward(model, step):
  tokens = random_tokens((2, 12), 256, 0)
  logits, cache = step(model, tokens, KVCache.zeros(model.config, 2, MAX_LEN))
  assert max_abs_diff(logits, _full(model, tokens)) <= TOL
  # Only the first 12 slots were written; the rest are still zero.
  k = all_keys(cache)
  assert np.abs(k[..., :12, :]).max() > 0 and np.abs(k[..., 12:, :]).max() == 0


def test_token_by_token_matches_full_forward(model, step):
  tokens = random_tokens((2, 14), 256, 1)
  logits, _ = _decode(model, step, tokens, prefix=5, chunks=[1] * 9)
  diff = max_abs_diff(logits, _full(model, tokens))
  assert diff <= TOL, diff


def test_chunks_match_full_forward(model, step):
  tokens = random_tokens((2, 16), 256, 2)
  logits, _ = _decode(model, step, tokens, prefix=4, chunks=[3, 1, 5, 3])
  diff = max_abs_diff(logits, _full(model, tokens))
  assert diff <= TOL, diff


def test_cache_depends_on_prefix(model, step):
  """Non-tautology guard: continuing from another prefix gives different logits, so the comparisons
  above really test that the cached keys/values are used."""
  tokens = random_tokens((1, 10), 256, 4)
  other = tokens.copy()
  other[:, :6] = random_tokens((1, 6), 256, 5)
  a, _ = _decode(model, step, tokens, prefix=6, chunks=[4])
  b, _ = _decode(model, step, other, prefix=6, chunks=[4])
  assert max_abs_diff(a[:, 6:], b[:, 6:]) > 1e3 * TOL


def test_ragged_batch_matches_one_by_one(model, step):
  """Right-padded prompts of different lengths prefilled together, lengths set to the true prompt
  lengths, then decoded together: every row equals the same prompt decoded alone."""
  prompt_lens = np.array([3, 9, 6], np.int32)
  B, P, steps = len(prompt_lens), int(prompt_lens.max()), 5
  prompts = [random_tokens((1, n), 256, 10 + i) for i, n in enumerate(prompt_lens)]
  continuations = random_tokens((B, steps), 256, 20)
  padded = np.full((B, P), 7, np.int32)  # a real token id, so padding is not trivially zero
  for i, p in enumerate(prompts):
    padded[i, : p.shape[1]] = p[0]

  cache = KVCache.zeros(model.config, B, MAX_LEN)
  prefill_logits, cache = step(model, padded, cache)
  cache = cache.replace(lengths_B=jnp.asarray(prompt_lens))
  batch_steps = []
  for t in range(steps):
    logits, cache = step(model, continuations[:, t : t + 1], cache)
    batch_steps.append(np.asarray(logits[:, 0]))
  np.testing.assert_array_equal(np.asarray(cache.lengths_B), prompt_lens + steps)

  for i, p in enumerate(prompts):
    n = p.shape[1]
    single = KVCache.zeros(model.config, 1, MAX_LEN)
    single_prefill, single = step(model, p, single)
    # The real prompt positions of the padded prefill equal the unpadded prefill.
    assert max_abs_diff(prefill_logits[i : i + 1, :n], single_prefill) <= TOL
    for t in range(steps):
      logits, single = step(model, continuations[i : i + 1, t : t + 1], single)
      diff = max_abs_diff(batch_steps[t][i], logits[0, 0])
      assert diff <= TOL, f"row {i} step {t}: {diff}"
    # Also equal to the uncached forward of the whole row.
    full = _full(model, np.concatenate([p, continuations[i : i + 1]], axis=1))
    assert max_abs_diff(np.stack([s[i] for s in batch_steps]), full[0, n:]) <= TOL


def test_stale_entries_beyond_length_are_ignored(model, step):
  """Garbage written past the committed length (rejected drafts) and rolled back does not
  change later logits: it is overwritten or masked."""
  tokens = random_tokens((2, 12), 256, 6)
  garbage = random_tokens((2, 6), 256, 7)
  clean, _ = _decode(model, step, tokens, prefix=8, chunks=[1, 1, 1, 1])

  cache = KVCache.zeros(model.config, 2, MAX_LEN)
  _, cache = step(model, tokens[:, :8], cache)
  _, dirty = step(model, garbage, cache)  # writes slots 8..13
  assert np.abs(all_keys(dirty)[..., 8:14, :] - all_keys(cache)[..., 8:14, :]).max() > 0
  dirty = dirty.replace(lengths_B=jnp.array([8, 8], jnp.int32))  # reject them all
  outs = []
  for t in range(8, 12):
    logits, dirty = step(model, tokens[:, t : t + 1], dirty)
    outs.append(np.asarray(logits))
  # After 4 steps slots 12..13 still hold garbage, and the last queries must not see it.
  assert np.abs(all_keys(dirty)[..., 12:14, :]).max() > 0
  diff = max_abs_diff(np.concatenate(outs, axis=1), clean[:, 8:])
  assert diff <= TOL, diff


def test_stale_entries_per_row(model, step):
  """Rolling back rows by different amounts (as after a ragged acceptance) matches decoding each
  row from its kept prefix."""
  tokens = random_tokens((2, 10), 256, 8)
  garbage = random_tokens((2, 4), 256, 9)
  cache = KVCache.zeros(model.config, 2, MAX_LEN)
  _, cache = step(model, tokens[:, :6], cache)
  _, cache = step(model, garbage, cache)
  keep = np.array([7, 6], np.int32)  # row 0 keeps one garbage token, row 1 none
  cache = cache.replace(lengths_B=jnp.asarray(keep))
  nxt = random_tokens((2, 1), 256, 11)
  logits, cache = step(model, nxt, cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths_B), keep + 1)
  row0 = np.concatenate([tokens[:1, :6], garbage[:1, :1], nxt[:1]], axis=1)
  row1 = np.concatenate([tokens[1:, :6], nxt[1:]], axis=1)
  assert max_abs_diff(logits[0, 0], _full(model, row0)[0, -1]) <= TOL
  assert max_abs_diff(logits[1, 0], _full(model, row1)[0, -1]) <= TOL


def test_explicit_positions(model, step):
  """positions_BT overrides lengths: the chunk is written and masked at the given positions,
  whatever lengths_B says; lengths_B is still advanced by T."""
  tokens = random_tokens((2, 9), 256, 12)
  cache = KVCache.zeros(model.config, 2, MAX_LEN)
  _, cache = step(model, tokens[:, :5], cache)
  default_logits, _ = step(model, tokens[:, 5:], cache)
  cache = cache.replace(lengths_B=jnp.array([0, 2], jnp.int32))  # deliberately not the positions
  positions = jnp.broadcast_to(jnp.arange(5, 9, dtype=jnp.int32), (2, 4))
  explicit_logits, new_cache = step(model, tokens[:, 5:], cache, positions)
  assert max_abs_diff(default_logits, explicit_logits) <= TOL
  assert max_abs_diff(explicit_logits, _full(model, tokens)[:, 5:]) <= TOL
  np.testing.assert_array_equal(np.asarray(new_cache.lengths_B), [4, 6])


@pytest.mark.parametrize("batch", [3, 20])  # one slice update per row, and one scatter
def test_cache_write_paths_agree_with_full_forward(model, batch):
  from specjax.models import llama

  assert (batch > llama.MAX_ROWS_FOR_SLICE_WRITES) == (batch == 20)
  tokens = random_tokens((batch, 9), 256, 11)
  cache = KVCache.zeros(model.config, batch, MAX_LEN)
  logits_a, cache = model(tokens[:, :5], cache)
  logits_b, cache = model(tokens[:, 5:], cache)
  diff = max_abs_diff(np.concatenate([logits_a, logits_b], axis=1), _full(model, tokens))
  assert diff <= TOL, diff
