"""Logits parity with transformers' PyTorch LlamaForCausalLM, through a saved checkpoint.

Each case builds a tiny random transformers model, saves it with `save_pretrained`, loads the
directory with `load_hf_checkpoint` and compares float32 logits on random tokens.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.models.hf import load_hf_checkpoint
from tests.helpers import max_abs_diff, random_tokens, torch_llama, torch_logits

PARITY_TOL = 1e-4  # float32; the measured differences are of order 1e-6.
SEQ_LEN = 40  # longer than the llama3 case's original_max_position_embeddings=16

LLAMA3_SCALING = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}

CASES = {
  # (a) multi-head attention: kv heads == heads, head_dim = hidden / heads.
  "multi_head": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4),
  # (b) grouped-query attention, 3 query heads per kv head, head_dim (16) != hidden / heads (8).
  "gqa_head_dim": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
  # (c) lm_head shares the embedding matrix.
  "tied": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
  # (d) Llama-3 wavelength-dependent rope scaling with a non-default theta.
  "llama3_rope": dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=5000.0,
    rope_scaling=LLAMA3_SCALING,
  ),
  # (e) linear rope scaling (positions divided by factor).
  "linear_rope": dict(
    hidden_size=48, num_attention_heads=4, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}
  ),
}


def _save_and_load(tmp_path, case, seed, dtype="float32"):
  torch_model = torch_llama(seed=seed, **CASES[case])
  path = str(tmp_path / case)
  torch_model.save_pretrained(path)
  model, config = load_hf_checkpoint(path, dtype=dtype)
  return torch_model, model, config, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  seed = sorted(CASES).index(case)
  torch_model, model, config, _ = _save_and_load(tmp_path, case, seed)
  tokens = random_tokens((2, SEQ_LEN), config.vocab_size, seed)
  expected = torch_logits(torch_model, tokens)
  got = np.asarray(model(jnp.asarray(tokens)))
  assert got.dtype == np.float32 and got.shape == expected.shape == (2, SEQ_LEN, config.vocab_size)
  diff = max_abs_diff(got, expected)
  print(f"\nparity[{case}]: max|diff|={diff:.3e} (max|logit|={np.abs(expected).max():.3f})")
  assert diff <= PARITY_TOL, f"{case}: max abs logits difference {diff}"


def test_config_translation(tmp_path):
  """The fields the parity cases rely on are read from transformers' config.json as intended."""
  _, _, config, _ = _save_and_load(tmp_path, "gqa_head_dim", 1)
  assert (config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size) == (6, 2, 16, 48)
  assert config.tie_word_embeddings is False and config.rope_scaling is None
  _, model, config, _ = _save_and_load(tmp_path, "tied", 2)
  assert config.tie_word_embeddings is True and model.lm_head is None


@pytest.mark.parametrize("case", ["llama3_rope", "linear_rope"])
def test_rope_scaling_is_exercised(tmp_path, case):
  """Guards the parity test above: ignoring the scaling would change these logits by far more
  than the tolerance, so the parity test really checks the scaled frequencies."""
  seed = sorted(CASES).index(case)
  torch_model, model, config, path = _save_and_load(tmp_path, case, seed)
  assert config.rope_scaling is not None
  assert config.rope_scaling.rope_type == CASES[case]["rope_scaling"]["rope_type"]
  with open(f"{path}/config.json") as f:
    hf = json.load(f)
  theta = config.rope_theta
  hf.pop("rope_scaling", None)
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
  with open(f"{path}/config.json", "w") as f:
    json.dump(hf, f)
  unscaled, unscaled_config = load_hf_checkpoint(path)
  assert unscaled_config.rope_scaling is None and unscaled_config.rope_theta == theta
  tokens = random_tokens((2, SEQ_LEN), config.vocab_size, seed)
  expected = torch_logits(torch_model, tokens)
  diff = max_abs_diff(np.asarray(unscaled(jnp.asarray(tokens))), expected)
  assert diff > 100 * PARITY_TOL, f"{case}: scaling barely matters ({diff}); the parity case is too weak"


def test_bfloat16_load_close_to_float32(tmp_path):
  torch_model, model32, config, path = _save_and_load(tmp_path, "gqa_head_dim", 1)
  model16, config16 = load_hf_checkpoint(path, dtype="bfloat16")
  assert config16.dtype == config16.param_dtype == "bfloat16"
  kernel = model16.layers[0].self_attn.q_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  assert model16.embed_tokens.embedding[...].dtype == jnp.bfloat16
  assert model16.layers[1].mlp.down_proj.kernel[...].dtype == jnp.bfloat16
  assert model16.norm.weight[...].dtype == jnp.bfloat16
  # The bf16 weights are the float32 ones rounded (to nearest), nothing else.
  kernel32 = model32.layers[0].self_attn.q_proj.kernel[...]
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(kernel32.astype(jnp.bfloat16)))

  tokens = random_tokens((2, SEQ_LEN), config.vocab_size, 1)
  logits32 = np.asarray(model32(jnp.asarray(tokens)))
  logits16 = model16(jnp.asarray(tokens))
  assert logits16.dtype == jnp.float32  # logits are always returned in float32
  scale = float(np.abs(logits32).max())
  diff = max_abs_diff(logits16, logits32)
  print(f"\nbf16 vs f32: max|diff|={diff:.3e}, max|logit|={scale:.3f}")
  # bfloat16 keeps 8 significant bits (relative rounding error 2^-8 ~ 0.4%, ~3 decimal digits).
  # Every weight, activation and the residual stream are rounded at that precision through two
  # layers, so errors of a few roundings accumulate: allow 5% of the largest logit. A real bug
  # (a wrong cast, a dropped norm) moves logits by a sizeable fraction of their scale instead.
  assert diff <= 0.05 * scale, f"bf16 logits off by {diff} (max |logit| {scale})"
  # And bf16 is really in use: the logits are not bit-identical to float32.
  assert diff > 0
