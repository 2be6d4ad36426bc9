"""AdamW with linear warmup and cosine decay, and gradient clipping (the paper's finetuning
defaults: learning rate 2e-5, warmup 3% of the steps, weight decay 0)."""

from __future__ import annotations

import jax
import optax

from specjax.errors import SpecjaxError


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """0 -> learning_rate over warmup_fraction of the steps, then cosine to final_lr_fraction of it."""
  if not 0 <= config.warmup_fraction < 1:
    raise SpecjaxError(f"config field `warmup_fraction`={config.warmup_fraction}: must be in [0, 1)")
  if config.learning_rate <= 0:
    raise SpecjaxError(f"config field `learning_rate`={config.learning_rate}: must be > 0")
  warmup = int(round(config.warmup_fraction * total_steps))
  if warmup == 0:
    return optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1), alpha=config.final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=config.learning_rate * config.final_lr_fraction,
  )


def _decay_mask(params):
  """Weight decay on matrices only (embeddings, projections), never on norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(config, total_steps)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=config.adam_b1,
      b2=config.adam_b2,
      eps=config.adam_eps,
      weight_decay=config.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts), schedule
