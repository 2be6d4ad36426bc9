"""Reduced-vocabulary drafters: the subset is chosen from responses, decoding with it stays
lossless (greedy equality in float32, sampling follows the target), it survives export and
load (with SGLang's token map), and training scores only the subset."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax.decoding import Decoder
from specjax.errors import SpecjaxError
from specjax.models import get_preset, init_model, load_hf_checkpoint, save_hf_checkpoint
from specjax.models.draft_vocab import (
  DRAFT_VOCAB_FILE,
  TOKEN_MAP_FILE,
  choose_token_ids,
  coverage_of,
  draft_token_ids,
  set_draft_vocab,
)
from specjax.train import losses
from specjax.train.step import StepSpec, _micro_sums
from tests.test_speculative_sampling import SAMPLES, VOCAB, _peaked_model, chi2_pvalue, exact_joint, sample_pairs

NO_EOS = -1


def test_choose_token_ids_covers_the_responses():
  responses = [[5] * 50 + [6] * 30 + [7] * 15 + [8] * 5]  # 100 tokens
  assert choose_token_ids(responses, 20, coverage=0.8, multiple=1).tolist() == [5, 6]
  assert choose_token_ids(responses, 20, coverage=0.95, always=[2], multiple=1).tolist() == [2, 5, 6, 7]
  padded = choose_token_ids(responses, 20, coverage=0.8, multiple=8)
  assert len(padded) == 8 and {5, 6, 7, 8} <= set(padded.tolist())  # padding takes the next most frequent
  assert coverage_of(np.array([5, 6]), responses) == pytest.approx(0.8)
  with pytest.raises(SpecjaxError, match="coverage"):
    choose_token_ids(responses, 20, coverage=0)
  with pytest.raises(SpecjaxError, match="outside the vocabulary"):
    choose_token_ids([[25]], 20)


@pytest.fixture(scope="module")
def target():
  return init_model(get_preset("tiny"), 0)


def test_greedy_with_a_reduced_vocabulary_equals_plain_decoding(target):
  """float32: the drafter can only propose subset tokens, and the output is the target's exactly."""
  prompts = [[3, 9, 27, 81 % 256], [5, 6], list(range(10, 40))]
  plain = Decoder(target, method="ar", max_new_tokens=24, batch_size=4).generate(prompts, eos_id=NO_EOS)
  emitted = sorted({t for row in plain.new_tokens for t in row})
  drafter = init_model(get_preset("tiny"), 0)  # the target itself, restricted to part of its outputs
  keep = np.array(emitted[: max(1, len(emitted) // 2)], np.int32)
  set_draft_vocab(drafter, keep)
  result = Decoder(target, drafter, method="sps", gamma=4, max_new_tokens=24, batch_size=4).generate(
    prompts, eos_id=NO_EOS
  )
  assert result.new_tokens == plain.new_tokens
  full = Decoder(
    target, init_model(get_preset("tiny"), 0), method="sps", gamma=4, max_new_tokens=24, batch_size=4
  ).generate(prompts, eos_id=NO_EOS)
  assert full.accepted.sum() == full.proposed.sum()  # the same model accepts everything...
  assert result.accepted.sum() < result.proposed.sum()  # ...but not tokens outside its subset
  # Every accepted draft was a subset token: accepted drafts are what both models chose.
  inside = np.isin(np.concatenate([np.array(r) for r in plain.new_tokens]), keep).sum()
  assert result.accepted.sum() <= inside


def test_sampling_with_a_reduced_vocabulary_follows_the_target():
  target, drafter = _peaked_model(0, 32, 2, 15.0), _peaked_model(1, 16, 1, 15.0)
  set_draft_vocab(drafter, np.arange(0, VOCAB, 2, dtype=np.int32))  # half the vocabulary
  joint = exact_joint(target, 1.0, 0, 1.0)
  decoder = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=2, batch_size=SAMPLES // 4)
  counts, result = sample_pairs(decoder, 1.0, 0, 1.0)
  assert chi2_pvalue(counts, joint) > 1e-3
  assert 0 < result.accepted.sum() < result.proposed.sum()


def test_export_and_load_keep_the_subset(tmp_path):
  import torch

  drafter = init_model(get_preset("tiny-drafter"), 3)
  ids = np.array([2, 7, 40, 41, 200], np.int32)
  set_draft_vocab(drafter, ids)
  save_hf_checkpoint(drafter, drafter.config, str(tmp_path / "d"))
  assert json.load(open(tmp_path / "d" / DRAFT_VOCAB_FILE))["token_ids"] == ids.tolist()
  assert torch.load(tmp_path / "d" / TOKEN_MAP_FILE, weights_only=True).tolist() == ids.tolist()  # SGLang's format
  loaded, config = load_hf_checkpoint(str(tmp_path / "d"))
  assert draft_token_ids(loaded).tolist() == ids.tolist()
  assert config.vocab_size == 256  # the export stays a full-vocabulary model
  from transformers import LlamaForCausalLM

  assert LlamaForCausalLM.from_pretrained(str(tmp_path / "d")).lm_head.weight.shape[0] == 256
  with pytest.raises(SpecjaxError, match="sorted distinct"):
    set_draft_vocab(drafter, np.array([5, 3]))


def test_training_scores_only_the_subset():
  model = init_model(get_preset("tiny-drafter"), 4)
  graphdef, params = nnx.split(model, nnx.Param)
  ids_W = jnp.array([1, 4, 9, 16, 25], jnp.int32)
  tokens = jnp.array([[1, 4, 9, 16, 25, 30]])
  targets = jnp.array([[4, 9, 16, 99, 25, 1]])  # 99 lies outside the subset
  micro = {
    "decoder_input_tokens": tokens,
    "decoder_target_tokens": targets,
    "decoder_loss_weights": jnp.ones_like(tokens),
    "decoder_positions": jnp.arange(6)[None],
    "decoder_segment_ids": jnp.ones_like(tokens),
  }
  loss_sum, aux = _micro_sums(params, None, micro, graphdef, None, StepSpec(), ids_W)
  logits_W = model(tokens)[..., ids_W]
  index = {int(t): k for k, t in enumerate(ids_W)}
  expected = [
    losses.cross_entropy(logits_W[:, t : t + 1], jnp.array([[index[int(targets[0, t])]]]))[0, 0]
    for t in range(6)
    if int(targets[0, t]) in index
  ]
  assert float(aux["weight"]) == 5.0
  np.testing.assert_allclose(float(loss_sum), float(sum(expected)), rtol=1e-5)


def test_min_size_pads_with_the_next_most_frequent():
  responses = [[5] * 50 + [6] * 30 + [7] * 15 + [8] * 5]
  assert choose_token_ids(responses, 20, coverage=0.8, multiple=1, min_size=3).tolist() == [5, 6, 7]
