"""Shared helpers for the model tests: tiny configs, random weights, reference PyTorch models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax.models.config import LlamaConfig
from specjax.models.llama import Llama, init_model

# Weight scale for test models. The library's (and transformers') init std of 0.02 makes every
# logit tiny (|logit| < 0.6) and attention almost uniform, so a wrong mask or rotary angle moves
# the logits by little more than the tolerance. 0.1 gives |logits| of a few units and peaked
# attention, so those mistakes show up as differences of order 1.
TEST_INIT_STD = 0.1


def tiny_config(**overrides) -> LlamaConfig:
  """Grouped-query (4 heads over 2 kv heads), 2 layers, hidden 64, vocab 256."""
  base = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
  )
  base.update(overrides)
  return LlamaConfig(**base)


def random_model(config: LlamaConfig, seed: int = 0, std: float = TEST_INIT_STD) -> Llama:
  """A specjax Llama whose matrices are N(0, std^2) and whose norm weights are 1 + N(0, 0.1^2)
  (not all-ones, so a norm weight that is loaded or applied wrongly changes the output)."""
  model = init_model(config, seed)
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  key = jax.random.key(seed + 1000)
  new = []
  for i, (path, variable) in enumerate(flat):
    value = variable[...]
    k = jax.random.fold_in(key, i)
    if str(path[-1]) == "weight":  # RMSNorm scale
      fresh = 1.0 + 0.1 * jax.random.normal(k, value.shape, jnp.float32)
    else:
      fresh = std * jax.random.normal(k, value.shape, jnp.float32)
    new.append((path, variable.replace(fresh.astype(value.dtype))))
  nnx.update(model, nnx.from_flat_state(new))
  return model


def random_tokens(shape, vocab_size: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab_size, size=shape).astype(np.int32)


def max_abs_diff(a, b) -> float:
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def flat_params(model) -> dict[str, np.ndarray]:
  """'layers/0/mlp/up_proj/kernel' -> numpy array (float32 or bfloat16 as stored)."""
  state = nnx.state(model, nnx.Param)
  return {"/".join(str(p) for p in path): np.asarray(jax.device_get(v[...])) for path, v in nnx.to_flat_state(state)}


def torch_llama(seed: int = 0, initializer_range: float = TEST_INIT_STD, **hf_kwargs):
  """A transformers LlamaForCausalLM with random weights (torch is imported only here), in eval
  mode. hf_kwargs are transformers.LlamaConfig fields; small defaults are filled in."""
  import torch
  import transformers

  kwargs = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=initializer_range,
  )
  kwargs.update(hf_kwargs)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
  # transformers initialises norm weights to exactly 1; perturb them so they are checked too.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.add_(0.1 * torch.randn_like(param))
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()
