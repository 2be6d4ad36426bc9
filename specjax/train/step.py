"""The train step: a pure function of (state, target weights, batch), jitted with explicit
shardings over the (data, fsdp, tensor) mesh and the state donated (nanodo's shape).

The state is a plain pytree: the drafter's `params` (an nnx.State of its Params), the optax
`opt_state`, the `step` and an `rng` key, so orbax saves and restores it as it is. Batches are
[accumulation, micro_batch, length]: the step scans over the micro-batches, sums weighted token
losses and their gradients, and divides once by the batch's loss-weight total, so accumulating
A micro-batches gives the same update as one batch A times larger.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from specjax import sharding as shd
from specjax.data.features import BATCH_FEATURES  # noqa: F401  (aot.py reads train_step.BATCH_FEATURES)
from specjax.train import losses


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.PRNGKey(seed),
  }


def state_shardings(state, mesh) -> Any:
  """Parameters and Adam moments by the logical rules (moments follow their parameter's path);
  counters and keys replicated."""
  return shd.state_shardings(state, mesh)


def batch_shardings(batch_shapes: dict[str, tuple[int, ...]], mesh) -> dict[str, NamedSharding]:
  return {k: shd.logical_sharding(shape, (None, "batch", "length"), mesh) for k, shape in batch_shapes.items()}


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the step computes; static under jit."""

  loss: str = "cross_entropy"  # losses.LOSSES
  with_target: bool = False  # the target's logits are computed (distillation losses)


def _micro_sums(params, target_params, micro, graphdef, target_graphdef, spec: StepSpec, draft_ids_W=None):
  """Weighted sums over one micro-batch: (loss_sum, aux dict of sums).

  draft_ids_W: a reduced-vocabulary drafter's tokens (specjax.models.draft_vocab). Its logits are
  then over those W tokens only (as it drafts), targets are their index in the subset, and tokens
  outside it (which it can never propose) carry no loss; so does the target's distribution,
  restricted to the subset and renormalised, for the distillation losses.
  """
  model = nnx.merge(graphdef, params)
  tokens_bL = micro["decoder_input_tokens"]
  kwargs = {"positions_BT": micro["decoder_positions"], "segment_ids_BT": micro["decoder_segment_ids"]}
  targets_bL = micro["decoder_target_tokens"]
  weights_bL = micro["decoder_loss_weights"].astype(jnp.float32)
  if draft_ids_W is None:
    logits_bLV = model(tokens_bL, **kwargs)
  else:
    h_bLD, _ = model.hidden_states(tokens_bL, **kwargs)
    logits_bLV = jnp.dot(h_bLD, model.head_DW(draft_ids_W).astype(h_bLD.dtype)).astype(jnp.float32)
    index_V = (
      jnp.full((model.config.vocab_size,), -1, jnp.int32)
      .at[draft_ids_W]
      .set(jnp.arange(draft_ids_W.shape[0], dtype=jnp.int32))
    )
    index_bL = index_V[targets_bL]
    weights_bL = weights_bL * (index_bL >= 0)
    targets_bL = jnp.maximum(index_bL, 0)
  target_logits_bLV = None
  if spec.with_target:
    target = nnx.merge(target_graphdef, target_params)
    target_logits_bLV = jax.lax.stop_gradient(target(tokens_bL, **kwargs))
    if draft_ids_W is not None:
      target_logits_bLV = target_logits_bLV[..., draft_ids_W]
  per_token_bL = losses.token_losses(spec.loss, logits_bLV, targets_bL, target_logits_bLV)
  ce_bL = per_token_bL if spec.loss == "cross_entropy" else losses.cross_entropy(logits_bLV, targets_bL)
  correct_bL = (jnp.argmax(logits_bLV, axis=-1) == targets_bL).astype(jnp.float32)
  aux = {
    "cross_entropy": jnp.sum(ce_bL * weights_bL),
    "correct": jnp.sum(correct_bL * weights_bL),
    "weight": jnp.sum(weights_bL),
  }
  if target_logits_bLV is not None:  # how often the target's greedy choice is the drafter's
    agree_bL = (jnp.argmax(logits_bLV, -1) == jnp.argmax(target_logits_bLV, -1)).astype(jnp.float32)
    aux["target_agreement"] = jnp.sum(agree_bL * weights_bL)
  return jnp.sum(per_token_bL * weights_bL), aux


def make_train_step(
  graphdef,
  target_graphdef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  spec: StepSpec,
  draft_ids_W=None,
) -> Callable:
  """(state, target_params, batch) -> (state, metrics); batch arrays are [A, b, L].
  draft_ids_W: train a reduced-vocabulary drafter over these tokens (see _micro_sums)."""
  grad_fn = jax.value_and_grad(functools.partial(_micro_sums, draft_ids_W=draft_ids_W), has_aux=True)

  def train_step(state, target_params, batch_ABL):
    params = state["params"]

    def accumulate(carry, micro):
      (loss_sum, aux), grads = grad_fn(params, target_params, micro, graphdef, target_graphdef, spec)
      acc_grads, acc_loss, acc_aux = carry
      return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss_sum, jax.tree.map(jnp.add, acc_aux, aux)), None

    aux_zero = jax.eval_shape(
      lambda: _micro_sums(
        params, target_params, jax.tree.map(lambda a: a[0], batch_ABL), graphdef, target_graphdef, spec, draft_ids_W
      )[1]
    )
    zero = (
      jax.tree.map(jnp.zeros_like, params),
      jnp.zeros((), jnp.float32),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_zero),
    )
    (grad_sums, loss_sum, aux), _ = jax.lax.scan(accumulate, zero, batch_ABL)
    weight = jnp.maximum(aux["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grad_sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
      "loss": loss_sum / weight,
      "cross_entropy": aux["cross_entropy"] / weight,
      "token_accuracy": aux["correct"] / weight,
      "loss_tokens": aux["weight"],
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(new_params),
      "learning_rate": schedule(state["step"]),
    }
    if "target_agreement" in aux:
      metrics["target_agreement"] = aux["target_agreement"] / weight
    new_state = {
      "params": new_params,
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "rng": jax.random.fold_in(state["rng"], state["step"]),
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, target_graphdef, spec: StepSpec, draft_ids_W=None) -> Callable:
  """Teacher-forced loss and accuracy sums on held-out batches [A, b, L] (no update)."""

  def eval_step(params, target_params, batch_ABL):
    def one(carry, micro):
      loss_sum, aux = _micro_sums(params, target_params, micro, graphdef, target_graphdef, spec, draft_ids_W)
      return jax.tree.map(jnp.add, carry, {"loss": loss_sum, **aux}), None

    first = jax.tree.map(lambda a: a[0], batch_ABL)
    shapes = jax.eval_shape(
      lambda: _micro_sums(params, target_params, first, graphdef, target_graphdef, spec, draft_ids_W)
    )
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), {"loss": shapes[0], **shapes[1]})
    return jax.lax.scan(one, zero, batch_ABL)[0]

  return eval_step


def jit_train_step(train_step, state, target_params, batch_shapes, mesh):
  """jax.jit with the state donated and every input and output placed by the rules table."""
  state_sh = state_shardings(state, mesh)
  target_sh = None if target_params is None else shd.state_shardings(target_params, mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    train_step,
    in_shardings=(state_sh, target_sh, batch_shardings(batch_shapes, mesh)),
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,),
  ), state_sh
