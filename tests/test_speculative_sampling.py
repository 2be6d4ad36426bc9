"""Speculative sampling follows the target's distribution (chi-squared tests), and sampled
outputs do not depend on batch composition or on the mesh.

Setup: a tiny vocabulary (16 tokens) and peaked random models, so target and drafter differ a
lot and rejections are frequent. Each row decodes the same prompt with its own row id (an
independent stream of randomness); the empirical joint distribution of the first two new
tokens is compared with the target's exact joint distribution under the same processing.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specjax.decoding import Decoder, SamplingMode, processed_probs
from specjax.models import LlamaConfig, init_model
from specjax.sharding import make_mesh, shard_model

VOCAB = 16
SAMPLES = 24000
PROMPT = [3, 7, 1, 12]


def _peaked_model(seed, hidden, layers, scale):
  config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    num_layers=layers,
    num_heads=2,
    num_kv_heads=1,
    head_dim=hidden // 2,
    max_position_embeddings=64,
    eos_token_id=VOCAB + 1,
  )  # no EOS: every row yields two tokens
  model = init_model(config, seed)
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * scale
  return model


@pytest.fixture(scope="module")
def models():
  return _peaked_model(0, 32, 2, 15.0), _peaked_model(1, 16, 1, 15.0)


def exact_joint(target, temperature, top_k, top_p, prompt=PROMPT):
  """P(t1, t2 | prompt) under the processed target distribution: [V, V]."""
  mode = SamplingMode.from_values(temperature, top_k, top_p)
  seqs = np.array([prompt + [a] for a in range(VOCAB)])
  logits = target(jnp.asarray(seqs))
  p1 = processed_probs(logits[0, len(prompt) - 1], temperature, top_k, top_p, mode)
  p2 = processed_probs(logits[:, len(prompt)], temperature, top_k, top_p, mode)
  joint = np.asarray(p1, np.float64)[:, None] * np.asarray(p2, np.float64)
  return joint / joint.sum()


def sample_pairs(decoder, temperature, top_k, top_p, seed=0, prompt=PROMPT):
  result = decoder.generate(
    [prompt] * SAMPLES,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    row_ids=range(SAMPLES),
    eos_id=VOCAB + 1,
  )
  pairs = np.array([t[:2] for t in result.new_tokens])
  counts = np.zeros((VOCAB, VOCAB))
  np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
  return counts, result


def chi2_pvalue(counts, probs):
  """Pearson chi-squared over cells with expected count >= 5 (the rest pooled into one cell)."""
  expected = probs.ravel() * counts.sum()
  observed = counts.ravel()
  big = expected >= 5
  assert big.sum() >= 8, f"only {big.sum()} testable cells: the setting leaves too little to test"
  obs = np.append(observed[big], observed[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] < 5:  # pooled tail too small to test: fold it into the largest cell
    obs[np.argmax(exp[:-1])] += obs[-1]
    exp[np.argmax(exp[:-1])] += exp[-1]
    obs, exp = obs[:-1], exp[:-1]
  # Cells the target gives probability 0 must never be sampled.
  assert observed[probs.ravel() == 0].sum() == 0, "sampled a token the processed target excludes"
  return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize(
  "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (0.7, 0, 0.8)], ids=["T1", "T0.7-topk5", "T0.7-topp0.8"]
)
def test_speculative_sampling_matches_target(models, temperature, top_k, top_p):
  target, drafter = models
  joint = exact_joint(target, temperature, top_k, top_p)
  decoder = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=2, batch_size=SAMPLES // 4)
  counts, result = sample_pairs(decoder, temperature, top_k, top_p)
  # The drafter must be wrong often, or the test would not exercise rejection.
  acceptance = result.accepted.sum() / result.proposed.sum()
  assert 0.05 < acceptance < 0.9, acceptance
  assert chi2_pvalue(counts, joint) > 1e-3
  # Power: the same samples reject a distribution at total-variation distance 0.02.
  assert chi2_pvalue(counts, shifted(joint, 0.02)) < 1e-3


def shifted(joint, mass):
  """`joint` with `mass` moved from its likeliest cell to its second likeliest."""
  order = np.argsort(joint.ravel())[::-1]
  out = joint.ravel().copy()
  out[order[0]] -= mass
  out[order[1]] += mass
  return out.reshape(joint.shape)


def test_prompt_lookup_sampling_matches_target(models):
  """A deterministic drafter (q one-hot): residual is p without the rejected token."""
  target, _ = models
  joint = exact_joint(target, 1.0, 0, 1.0)
  decoder = Decoder(target, method="pld", gamma=3, max_new_tokens=2, batch_size=SAMPLES // 4, ngram_min=1)
  counts, result = sample_pairs(decoder, 1.0, 0, 1.0)
  assert result.proposed.sum() > 0
  assert chi2_pvalue(counts, joint) > 1e-3
  assert chi2_pvalue(counts, shifted(joint, 0.02)) < 1e-3


def test_lookup_then_drafter_sampling_matches_target(models):
  """lookup_drafts: the first draft is prompt lookup's (the prompt's last token, 12, occurred
  just before: one token to copy), the next ones the drafter's, in one round."""
  target, drafter = models
  prompt = [3, 7, 12, 12]
  joint = exact_joint(target, 1.0, 0, 1.0, prompt)
  decoder = Decoder(
    target, drafter, method="sps", gamma=3, lookup_drafts=True, max_new_tokens=2, batch_size=SAMPLES // 4
  )
  counts, result = sample_pairs(decoder, 1.0, 0, 1.0, prompt=prompt)
  acceptance = result.accepted.sum() / result.proposed.sum()
  assert 0.05 < acceptance < 0.9, acceptance
  assert chi2_pvalue(counts, joint) > 1e-3
  assert chi2_pvalue(counts, shifted(joint, 0.02)) < 1e-3


def test_plain_sampling_matches_target(models):
  target, _ = models
  joint = exact_joint(target, 0.7, 5, 1.0)
  counts, _ = sample_pairs(Decoder(target, method="ar", max_new_tokens=2, batch_size=SAMPLES // 4), 0.7, 5, 1.0)
  assert chi2_pvalue(counts, joint) > 1e-3


def test_sampled_output_independent_of_batch_and_mesh(models):
  """Row i's sample depends on (seed, row id, position) only."""
  target, drafter = models
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, VOCAB, size=rng.randint(2, 9)).tolist() for _ in range(8)]
  kw = dict(temperature=1.0, seed=5, row_ids=range(100, 108), eos_id=VOCAB + 1)
  batched = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=12, batch_size=8).generate(prompts, **kw)
  single = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=12, batch_size=1).generate(prompts, **kw)
  assert batched.new_tokens == single.new_tokens
  shuffled = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=12, batch_size=8).generate(
    prompts[::-1], temperature=1.0, seed=5, row_ids=range(107, 99, -1), eos_id=VOCAB + 1
  )
  assert shuffled.new_tokens[::-1] == batched.new_tokens
  other_seed = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=12, batch_size=8).generate(
    prompts, **{**kw, "seed": 6}
  )
  assert other_seed.new_tokens != batched.new_tokens

  mesh = make_mesh((2, 2, 2))
  t_sharded = shard_model(init_model(target.config, 0), mesh)
  t_sharded.lm_head.kernel[...] = target.lm_head.kernel[...]
  d_sharded = shard_model(init_model(drafter.config, 1), mesh)
  d_sharded.lm_head.kernel[...] = drafter.lm_head.kernel[...]
  on_mesh = Decoder(t_sharded, d_sharded, method="sps", gamma=3, max_new_tokens=12, batch_size=8, mesh=mesh).generate(
    prompts, **kw
  )
  assert on_mesh.new_tokens == batched.new_tokens
