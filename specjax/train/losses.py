"""Per-token training losses: cross-entropy on response tokens and divergences to the target.

Every function returns per-token values [B, T] in float32; the train step weights them by
`decoder_loss_weights` (0 on prompts and padding) and divides by the weight sum of the whole
(accumulated) batch, so gradient accumulation equals one large batch exactly.

Divergences are computed from the full softmax of both models, as DistillSpec does: forward KL
KL(p_target || q_drafter) and total variation 0.5 * sum |p - q|. Total variation is what
speculative decoding pays for: one step's acceptance probability is 1 - TV(p, q).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.errors import SpecjaxError

LOSSES = ("cross_entropy", "forward_kl", "total_variation")


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """-log q(target) per token."""
  logq_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logq_BTV, targets_BT[..., None], axis=-1)[..., 0]


def forward_kl(student_logits_BTV: jax.Array, target_logits_BTV: jax.Array) -> jax.Array:
  """KL(p || q) per token, p the target's distribution, q the student's. Zero when equal."""
  logp_BTV = jax.nn.log_softmax(target_logits_BTV.astype(jnp.float32), axis=-1)
  logq_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - logq_BTV), axis=-1)


def total_variation(student_logits_BTV: jax.Array, target_logits_BTV: jax.Array) -> jax.Array:
  """0.5 * sum |p - q| per token: the probability that one speculative step rejects."""
  p_BTV = jax.nn.softmax(target_logits_BTV.astype(jnp.float32), axis=-1)
  q_BTV = jax.nn.softmax(student_logits_BTV.astype(jnp.float32), axis=-1)
  return 0.5 * jnp.sum(jnp.abs(p_BTV - q_BTV), axis=-1)


def token_losses(kind: str, student_logits_BTV, targets_BT, target_logits_BTV=None) -> jax.Array:
  """The training loss of `kind` per token."""
  if kind == "cross_entropy":
    return cross_entropy(student_logits_BTV, targets_BT)
  if target_logits_BTV is None:
    raise SpecjaxError(f"loss={kind!r} needs the target model's logits (config field `target`)")
  if kind == "forward_kl":
    return forward_kl(student_logits_BTV, target_logits_BTV)
  if kind == "total_variation":
    return total_variation(student_logits_BTV, target_logits_BTV)
  raise SpecjaxError(f"loss={kind!r}: expected one of {', '.join(LOSSES)}")
