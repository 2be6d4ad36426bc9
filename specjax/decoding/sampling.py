"""Logit processing and per-row random keys, shared by plain and speculative decoding.

Drafter and target probabilities both come from `processed_probs`, in float32, with the
same temperature / top-k / top-p: the losslessness of speculative sampling depends on it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Purposes a random draw can serve at one (row, position); each gets its own key.
TAG_SAMPLE, TAG_DRAFT, TAG_ACCEPT, TAG_RESIDUAL = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SamplingMode:
  """The static part of sampling (what changes the compiled program); values are arrays."""

  greedy: bool = True
  use_top_k: bool = False
  use_top_p: bool = False

  @classmethod
  def from_values(cls, temperature: float, top_k: int, top_p: float) -> "SamplingMode":
    if temperature <= 0:
      return cls(greedy=True)
    return cls(greedy=False, use_top_k=top_k > 0, use_top_p=top_p < 1.0)


def processed_logits(logits_ZV: jax.Array, temperature_Z, top_k_Z, top_p_Z, mode: SamplingMode) -> jax.Array:
  """Temperature, then top-k, then top-p (transformers' order); masked entries are -inf.

  Leading dims of logits are arbitrary; the parameter arrays broadcast against them.
  """
  logits = logits_ZV.astype(jnp.float32) / jnp.asarray(temperature_Z, jnp.float32)[..., None]
  if not (mode.use_top_k or mode.use_top_p):
    return logits
  vocab = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  if mode.use_top_k:
    k = jnp.broadcast_to(jnp.asarray(top_k_Z, jnp.int32), logits.shape[:-1])
    k = jnp.where(k <= 0, vocab, jnp.minimum(k, vocab))
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[..., None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_desc = jnp.where(jnp.arange(vocab) < k[..., None], sorted_desc, -jnp.inf)
  if mode.use_top_p:
    p = jnp.broadcast_to(jnp.asarray(top_p_Z, jnp.float32), logits.shape[:-1])[..., None]
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep = (mass_before < p) | (jnp.arange(vocab) == 0)  # the top token always stays
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def processed_probs(logits_ZV, temperature_Z, top_k_Z, top_p_Z, mode: SamplingMode) -> jax.Array:
  """float32 probabilities after processing; for greedy mode, the one-hot of the argmax."""
  if mode.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_ZV, axis=-1), logits_ZV.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(processed_logits(logits_ZV, temperature_Z, top_k_Z, top_p_Z, mode), axis=-1)


def row_keys(seed, row_ids_B, positions_B, tag: int) -> jax.Array:
  """One key per row from (seed, row id, position, purpose): a row's draws do not depend on
  which other rows share its batch, nor on the mesh."""
  base = jax.random.key(seed)

  def one(row, pos):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, row), pos), tag)

  return jax.vmap(one)(row_ids_B, positions_B)


def sample_from_probs(keys_B, probs_BV) -> jax.Array:
  """Draw one token per row from (unnormalised, nonnegative) probabilities."""
  logp = jnp.where(probs_BV > 0, jnp.log(jnp.maximum(probs_BV, 1e-38)), -jnp.inf)
  return jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys_B, logp).astype(jnp.int32)


def choose_tokens(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, mode: SamplingMode):
  """(tokens_B, probs_BV): argmax for greedy, else a draw from the processed distribution."""
  if mode.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), None
  probs_BV = processed_probs(logits_BV, temperature_B, top_k_B, top_p_B, mode)
  return sample_from_probs(keys_B, probs_BV), probs_BV
