"""specjax's CPU kernels (specjax.models.cpu_kernels) against XLA's dot and attention, and in decoding."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax.decoding.decoder import Decoder
from specjax.decoding.sampling import SamplingMode
from specjax.models import LlamaConfig, cpu_kernels, init_model
from specjax.models.llama import KVCache

pytestmark = pytest.mark.skipif(
  not cpu_kernels.available(), reason=f"specjax CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"
)

# (in, out): the real target's shapes, and odd ones that exercise every tail loop
SHAPES = [(576, 192), (1536, 576), (37, 53), (8, 16), (3, 5), (130, 1000)]


def _operands(I, O, M, seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal((M, I), np.float32)),
    jnp.asarray(rng.standard_normal((I, O), np.float32) / np.sqrt(I)),
  )


@pytest.mark.parametrize("I,O", SHAPES)
def test_dense_and_attend_equal_xla_dot(I, O):
  for M in [*range(1, 18), 31, cpu_kernels.MAX_ROWS]:  # every row count a block of 8 can leave
    x_UI, w_IJ = _operands(I, O, M)
    with cpu_kernels.enabled(True):
      assert cpu_kernels.applies(x_UI, w_IJ)
      y = jax.jit(cpu_kernels.dense)(x_UI, w_IJ)
      y_t = jax.jit(cpu_kernels.attend)(x_UI, w_IJ.T.copy())
    want = np.asarray(x_UI, np.float64) @ np.asarray(w_IJ, np.float64)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_t), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("I,O", SHAPES[:3])
def test_a_row_gives_the_same_bits_in_any_number_of_rows(I, O):
  """What keeps speculative output token-identical to plain output: a verification's rows
  are summed exactly as a plain step's single row."""
  x_UI, w_IJ = _operands(I, O, 20, seed=1)  # rows in three blocks of 8
  w_JI = w_IJ.T.copy()
  with cpu_kernels.enabled(True):
    full, full_t = cpu_kernels.dense(x_UI, w_IJ), cpu_kernels.attend(x_UI, w_JI)
    for m in range(20):
      for rows in (slice(m, m + 1), slice(0, m + 1), slice(m, 20)):
        np.testing.assert_array_equal(np.asarray(cpu_kernels.dense(x_UI[rows], w_IJ)), np.asarray(full[rows]))
        np.testing.assert_array_equal(np.asarray(cpu_kernels.attend(x_UI[rows], w_JI)), np.asarray(full_t[rows]))


def _attention_operands(R, M, S, E, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in ((R, M, E), (R, S, E), (R, E, S)))
  return q, k, v, jnp.asarray(rng.integers(0, S + 1, (R, M)), jnp.int32)


@pytest.mark.parametrize("R,M,S,E", [(3, 3, 64, 64), (6, 12, 50, 37), (1, 1, 7, 16), (4, 8, 256, 128)])
def test_attend_cache_equals_masked_softmax(R, M, S, E):
  q, k, v, visible_RM = _attention_operands(R, M, S, E)
  got = jax.jit(lambda *a: cpu_kernels.attend_cache(*a, np.sqrt(E)))(q, k, v, visible_RM)
  scores_RMS = jnp.einsum("rme,rse->rms", q, k) / np.sqrt(E)
  mask_RMS = jnp.arange(S)[None, None] < visible_RM[..., None]
  probs_RMS = jax.nn.softmax(jnp.where(mask_RMS, scores_RMS, jnp.finfo(jnp.float32).min), axis=-1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum("rms,res->rme", probs_RMS, v)), atol=2e-6)
  # each query row alone gives the same bits as within the whole block
  for m in range(M):
    alone = cpu_kernels.attend_cache(q[:, m : m + 1], k, v, visible_RM[:, m : m + 1], np.sqrt(E))
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(got[:, m : m + 1]))


def test_applies_only_inside_enabled_to_few_float32_rows():
  x, w = _operands(16, 8, 4)
  assert not cpu_kernels.applies(x, w)
  with cpu_kernels.enabled(True):
    assert cpu_kernels.applies(x, w)
    assert cpu_kernels.applies(x.reshape(2, 2, 16), w)
    assert cpu_kernels.applies(jnp.ones((cpu_kernels.MAX_ROWS, 16)), w)
    assert not cpu_kernels.applies(jnp.ones((cpu_kernels.MAX_ROWS + 1, 16)), w)
    assert not cpu_kernels.applies(jnp.ones((cpu_kernels.MAX_ROWS_TIED + 1, 16)), w, cpu_kernels.MAX_ROWS_TIED)
    assert not cpu_kernels.applies(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    with cpu_kernels.enabled(False):
      assert not cpu_kernels.applies(x, w)
    assert cpu_kernels.applies(x, w)
  assert not cpu_kernels.applies(x, w)


def _tiny(tie: bool) -> LlamaConfig:
  return LlamaConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=136,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=tie,
  )


@pytest.mark.parametrize("tie", [True, False])
def test_cached_forward_with_kernels_equals_xla(tie):
  model = init_model(_tiny(tie), seed=3)
  graph, state = nnx.split(model)
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 3)), jnp.int32)

  def forward(state, on):
    with cpu_kernels.enabled(on):
      m = nnx.merge(graph, state)
      cache = KVCache.zeros(m.config, 2, 16)
      logits_BTV, _ = m(tokens_BT, cache)
      return logits_BTV

  text = jax.jit(forward, static_argnums=1).lower(state, True).as_text()
  assert "specjax_rows_matmul" in text and ("specjax_rows_matmul_t" in text) == tie and "specjax_attend" in text
  np.testing.assert_allclose(
    np.asarray(jax.jit(forward, static_argnums=1)(state, True)),
    np.asarray(jax.jit(forward, static_argnums=1)(state, False)),
    rtol=1e-5,
    atol=1e-5,
  )


def test_decoder_uses_kernels_on_one_cpu_device_and_matches_xla():
  target, drafter = init_model(_tiny(True), seed=5), init_model(_tiny(True).replace(num_layers=1), seed=6)
  prompts = [list(np.random.default_rng(i).integers(0, 300, 5 + 3 * i)) for i in range(3)]
  outputs = {}
  for method in ("ar", "sps", "pld"):
    for on in (True, False):
      d = Decoder(target, drafter, method=method, gamma=3, max_new_tokens=20, cpu_kernels=on)
      text = d.lower(len(prompts[-1]), SamplingMode()).as_text()
      assert ("specjax_rows_matmul" in text) == on
      outputs[method, on] = d.generate(prompts).new_tokens
  assert outputs["sps", True] == outputs["ar", True] == outputs["pld", True]
  assert outputs["ar", True] == outputs["ar", False]


def test_unavailable_falls_back_to_xla_with_a_reason():
  code = (
    "from specjax.models import cpu_kernels; import jax.numpy as jnp\n"
    "assert not cpu_kernels.available(); print(cpu_kernels.unavailable_reason())\n"
    "with cpu_kernels.enabled(True): assert not cpu_kernels.applies(jnp.ones((1, 4)), jnp.ones((4, 4)))\n"
  )
  env = {**os.environ, "SPECJAX_CPU_KERNELS": "0"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "SPECJAX_CPU_KERNELS=0" in done.stdout
