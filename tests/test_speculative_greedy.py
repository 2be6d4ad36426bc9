"""Greedy speculative decoding is lossless: token for token the output of plain greedy decoding,
for a drafter model and prompt lookup, several γ, batch 1 and 8, ragged prompts; plus the
edge cases of a round (EOS or the token budget inside a draft) and input validation."""

import jax
import numpy as np
import pytest
from flax import nnx

from specjax.decoding import Decoder
from specjax.errors import SpecjaxError
from specjax.models import get_preset, init_model

MAX_NEW = 24
NO_EOS = -1


def noisy_copy(model, scale, seed):
  """A drafter that agrees with the target often but not always."""
  copy = init_model(model.config, seed)
  weights, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(weights))
  noisy = [w + scale * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(weights, keys)]
  nnx.update(copy, jax.tree.unflatten(treedef, noisy))
  return copy


@pytest.fixture(scope="module")
def target():
  return init_model(get_preset("tiny"), 0)


@pytest.fixture(scope="module")
def drafter(target):
  return noisy_copy(target, 0.01, 7)


@pytest.fixture(scope="module")
def prompts():
  """50 prompts of ragged lengths; some repeat a phrase so that prompt lookup finds matches."""
  rng = np.random.RandomState(0)
  out = []
  for i in range(50):
    p = rng.randint(3, 256, size=rng.randint(1, 40)).tolist()
    if i % 3 == 0:
      p = p + p[: len(p) // 2]
    out.append(p)
  out[1] = [17]  # a one-token prompt: the drafter's first chunk starts at position 0
  return out


@pytest.fixture(scope="module")
def reference(target, prompts):
  return Decoder(target, method="ar", max_new_tokens=MAX_NEW, batch_size=8).generate(prompts, eos_id=NO_EOS)


def test_plain_batching_does_not_change_greedy_output(target, prompts, reference):
  single = Decoder(target, method="ar", max_new_tokens=MAX_NEW, batch_size=1).generate(prompts[:12], eos_id=NO_EOS)
  assert single.new_tokens == reference.new_tokens[:12]


@pytest.mark.parametrize(
  "method,gamma,batch_size,dynamic,lookup",
  [
    ("sps", 1, 8, False, False),
    ("sps", 3, 1, False, False),
    ("sps", 5, 8, False, False),
    ("sps", 8, 8, True, False),
    ("sps", 4, 8, False, True),
    ("sps", 6, 1, True, True),
    ("pld", 3, 8, False, False),
    ("pld", 5, 1, False, False),
  ],
)
def test_greedy_speculative_equals_plain(
  target, drafter, prompts, reference, method, gamma, batch_size, dynamic, lookup
):
  decoder = Decoder(
    target,
    drafter if method == "sps" else None,
    method=method,
    gamma=gamma,
    dynamic_gamma=dynamic,
    lookup_drafts=lookup,
    max_new_tokens=MAX_NEW,
    batch_size=batch_size,
  )
  result = decoder.generate(prompts, eos_id=NO_EOS)
  assert result.new_tokens == reference.new_tokens
  assert all(len(t) == MAX_NEW for t in result.new_tokens)
  # Partial acceptance actually happened (otherwise the test would prove little).
  hist = result.accept_hist.sum(0)
  assert hist[0] > 0 and hist[1:].sum() > 0, hist
  if lookup:  # prompt lookup's drafts were used: the rounds differ from the drafter's alone
    alone = Decoder(target, drafter, decoder.settings.replace(lookup_drafts=False)).generate(prompts, eos_id=NO_EOS)
    assert (alone.accepted != result.accepted).any()


def test_drafter_equal_to_target_accepts_everything(target, prompts):
  gamma = 4
  result = Decoder(target, target, method="sps", gamma=gamma, max_new_tokens=MAX_NEW, batch_size=8).generate(
    prompts, eos_id=NO_EOS
  )
  assert (result.accept_hist[:, gamma] == result.steps).all()
  assert (result.accepted == gamma * result.steps).all()
  # τ = γ+1 for every round; the last round commits only what the budget allows.
  assert (result.steps == -(-MAX_NEW // (gamma + 1))).all()
  batches = -(-len(prompts) // 8)
  assert result.target_calls == batches * (-(-MAX_NEW // (gamma + 1)))


def test_eos_inside_a_draft(target, prompts, reference):
  """EOS at a position inside a fully accepted draft: output stops right after it."""
  gamma = 4
  row = 5
  eos = reference.new_tokens[row][6]  # new token 7: the second token of round 2's draft
  plain = Decoder(target, method="ar", max_new_tokens=MAX_NEW, batch_size=8).generate(prompts, eos_id=eos)
  spec = Decoder(target, target, method="sps", gamma=gamma, max_new_tokens=MAX_NEW, batch_size=8).generate(
    prompts, eos_id=eos
  )
  assert spec.new_tokens == plain.new_tokens
  first = reference.new_tokens[row].index(eos)
  assert spec.new_tokens[row] == reference.new_tokens[row][: first + 1]


@pytest.mark.parametrize("max_new", [1, 7, 11])
def test_token_budget_reached_inside_a_draft(target, prompts, reference, max_new):
  spec = Decoder(target, target, method="sps", gamma=4, max_new_tokens=max_new, batch_size=8).generate(
    prompts[:8], eos_id=NO_EOS
  )
  assert spec.new_tokens == [t[:max_new] for t in reference.new_tokens[:8]]


def test_per_prompt_budgets(target, drafter, prompts, reference):
  budgets = [3, 9, 24, 1, 17, 5, 12, 2]
  spec = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=MAX_NEW, batch_size=4).generate(
    prompts[:8], eos_id=NO_EOS, max_new_tokens=budgets
  )
  assert spec.new_tokens == [t[:b] for t, b in zip(reference.new_tokens[:8], budgets)]


def test_new_prompt_length_in_bucket_does_not_recompile(target, drafter):
  decoder = Decoder(target, drafter, method="sps", gamma=3, max_new_tokens=8, batch_size=2)
  decoder.generate([[5, 6, 7]], eos_id=NO_EOS)
  decoder.generate([list(range(3, 40)), [9] * 20], eos_id=NO_EOS)
  (program,) = decoder.programs()
  assert program._cache_size() == 1


def test_same_shaped_drafters_share_one_compiled_program():
  """An evaluation swaps several same-shaped drafters: each program compiles once for all of them,
  and each call still runs its own drafter's weights (the target itself is accepted every time)."""
  small_target = init_model(get_preset("tiny-drafter"), 11)
  drafters = [small_target, init_model(get_preset("tiny-drafter"), 12)]
  decoders = [Decoder(small_target, d, method="sps", gamma=3, max_new_tokens=12, batch_size=2) for d in drafters]
  results = [decoder.generate([[5, 6, 7]], eos_id=NO_EOS) for decoder in decoders]
  (first,), (second,) = decoders[0].programs(), decoders[1].programs()
  assert first is second and first._cache_size() == 1
  plain = Decoder(small_target, method="ar", max_new_tokens=12, batch_size=2).generate([[5, 6, 7]], eos_id=NO_EOS)
  assert results[0].new_tokens == results[1].new_tokens == plain.new_tokens
  assert results[0].accepted[0] == results[0].proposed[0] > results[1].accepted[0]


def test_bad_input_is_a_clear_error(target):
  other_vocab = init_model(get_preset("tiny").replace(vocab_size=300), 0)
  with pytest.raises(SpecjaxError, match="gamma=0"):
    Decoder(target, target, method="sps", gamma=0)
  with pytest.raises(SpecjaxError, match="vocabulary"):
    Decoder(target, other_vocab, method="sps")
  with pytest.raises(SpecjaxError, match="needs a drafter"):
    Decoder(target, method="sps")
  with pytest.raises(SpecjaxError, match="method="):
    Decoder(target, method="beam")
  decoder = Decoder(target, target, method="sps", gamma=3, max_new_tokens=8, max_cache_len=64)
  with pytest.raises(SpecjaxError, match="q7: the prompt has 70 tokens, longer than the cache"):
    decoder.generate([[1] * 5, [1] * 70], names=["q6", "q7"])
  with pytest.raises(SpecjaxError, match="empty prompt"):
    decoder.generate([[]])
  with pytest.raises(SpecjaxError, match="outside the vocabulary"):
    decoder.generate([[1, 999]])


def test_per_position_counters_with_dynamic_gamma(target, drafter, prompts):
  """Under the dynamic schedule a round may propose fewer drafts; the counters stay consistent."""
  r = Decoder(
    target, drafter, method="sps", gamma=8, dynamic_gamma=True, max_new_tokens=MAX_NEW, batch_size=8
  ).generate(prompts[:16], eos_id=NO_EOS)
  assert (r.pos_accepted <= r.pos_reached).all() and (r.pos_reached <= r.pos_proposed).all()
  assert (r.pos_reached[:, 0] == r.pos_proposed[:, 0]).all()
  assert (r.pos_reached[:, 1:] <= r.pos_accepted[:, :-1]).all()
  assert (r.pos_proposed[:, 1:] < r.pos_proposed[:, :1]).any()  # γ really varied
  assert (r.accept_hist.sum(1) == r.steps).all() and (r.pos_accepted.sum(1) == r.accepted).all()


def test_plain_decoding_counts_one_token_rounds(target, prompts):
  r = Decoder(target, method="ar", max_new_tokens=5, batch_size=8).generate(prompts[:8], eos_id=NO_EOS)
  assert (r.steps == 5).all() and (r.accept_hist[:, 0] == 5).all() and (r.accepted == 0).all()


@pytest.mark.parametrize("method,gamma,dynamic", [("sps", 5, False), ("sps", 8, True), ("pld", 4, False)])
def test_cache_limit_gives_plain_output(target, drafter, prompts, method, gamma, dynamic):
  """When the cache limit, not EOS or the budget, ends generation, the last rounds draft fewer
  tokens and every row fills the cache as plain decoding does, token for token."""
  limit = 48
  kw = dict(max_new_tokens=40, batch_size=8, max_cache_len=limit)
  rows = [p for p in prompts if len(p) <= 30][:16]
  plain = Decoder(target, method="ar", **kw).generate(rows, eos_id=NO_EOS)
  assert [len(t) for t in plain.new_tokens] == [min(40, limit - len(p)) for p in rows]
  spec = Decoder(
    target, drafter if method == "sps" else None, method=method, gamma=gamma, dynamic_gamma=dynamic, **kw
  ).generate(rows, eos_id=NO_EOS)
  assert spec.new_tokens == plain.new_tokens
  assert spec.accepted.sum() > 0


def test_drafter_with_shorter_positions_drafts_within_them(target, prompts):
  """A drafter whose max_position_embeddings (32) is below the target's (512) caps drafting,
  not generation: rows past it continue with plain steps, and outputs stay plain decoding's."""
  drafter = noisy_copy(target, 0.01, 7)
  short = init_model(target.config.replace(max_position_embeddings=32), 7)
  nnx.update(short, nnx.state(drafter, nnx.Param))
  rows = [p for p in prompts if len(p) <= 20][:7] + [list(range(3, 43))]  # the last starts past 32
  for limit in (None, 64):
    kw = dict(max_new_tokens=30, batch_size=8, max_cache_len=limit)
    plain = Decoder(target, method="ar", **kw).generate(rows, eos_id=NO_EOS)
    spec = Decoder(target, short, method="sps", gamma=4, **kw).generate(rows, eos_id=NO_EOS)
    assert spec.new_tokens == plain.new_tokens
    assert len(spec.new_tokens[-1]) == (30 if limit is None else 64 - 40)
    assert spec.proposed[-1] == 0 and spec.steps[-1] == len(spec.new_tokens[-1])  # never drafted
    assert (spec.accepted[:-1] > 0).all()


def _prompt_lookup_rounds(prompt, output, gamma, ngram_max=3, ngram_min=1):
  """Replays prompt lookup over a known greedy output: (rounds, rounds that proposed a draft)."""
  tokens, rounds, drafted = list(prompt), 0, 0
  while len(tokens) < len(prompt) + len(output):
    L, drafts = len(tokens), []
    for n in range(ngram_max, ngram_min - 1, -1):
      starts = [j for j in range(L - n) if L >= n + 1 and tokens[j : j + n] == tokens[L - n :]]
      if starts:
        drafts = tokens[starts[-1] + n :][:gamma]
        break
    truth = output[L - len(prompt) :]
    accepted = 0
    while accepted < len(drafts) and accepted < len(truth) and drafts[accepted] == truth[accepted]:
      accepted += 1
    tokens += truth[: accepted + 1]
    rounds, drafted = rounds + 1, drafted + bool(drafts)
  return rounds, drafted


def test_prompt_lookup_tau_over_drafted_rounds(target, prompts, reference):
  """pld rounds with no n-gram match propose nothing: tau counts every round, tau_drafted only
  those that proposed a draft (vLLM's mean acceptance length)."""
  from specjax.decoding import metrics

  rows = [[7, 8, 9] + list(range(100, 110)), [200 + i for i in range(20)]] + prompts[:6]  # the second: no repeats
  plain = Decoder(target, method="ar", max_new_tokens=MAX_NEW, batch_size=8).generate(rows, eos_id=NO_EOS)
  result = Decoder(target, method="pld", gamma=4, max_new_tokens=MAX_NEW, batch_size=8).generate(rows, eos_id=NO_EOS)
  assert result.new_tokens == plain.new_tokens
  replay = [_prompt_lookup_rounds(p, out, 4) for p, out in zip(rows, plain.new_tokens)]
  assert result.steps.tolist() == [r for r, _ in replay]
  assert result.drafted_steps.tolist() == [d for _, d in replay]
  assert (result.drafted_steps < result.steps).any() and result.drafted_steps.sum() > 0
  m = metrics.compute(result)
  assert m["verification_steps"] == result.steps.sum() and m["drafted_steps"] == result.drafted_steps.sum()
  assert m["tau"] == pytest.approx(1 + result.accepted.sum() / result.steps.sum())
  assert m["tau_drafted"] == pytest.approx(1 + result.accepted.sum() / result.drafted_steps.sum())
  assert m["tau_drafted"] > m["tau"]
  assert metrics.compute(plain)["tau_drafted"] is None  # plain decoding drafts nothing


def test_decoding_settings_from_config_and_overrides(target):
  """One settings object: a config's (prefixed) fields over the defaults, keywords over both."""
  import ml_collections
  from specjax.decoding import DecodingSettings

  config = ml_collections.ConfigDict(
    {"acceptance_gamma": 3, "acceptance_batch_size": 2, "gamma": 9, "acceptance_max_cache_len": None}
  )
  settings = DecodingSettings.from_config(config, prefix="acceptance_", method="sps")
  assert (settings.gamma, settings.batch_size, settings.max_cache_len) == (3, 2, None)
  assert settings.max_new_tokens == DecodingSettings().max_new_tokens
  decoder = Decoder(target, target, settings, max_new_tokens=7)
  assert (decoder.gamma, decoder.batch_size, decoder.max_new_tokens) == (3, 2, 7)
  assert decoder.settings.gamma == 3 and Decoder(target, settings=settings, method="ar").gamma == 1
  with pytest.raises(SpecjaxError, match="batch_size=0"):
    DecodingSettings.from_config(config, prefix="acceptance_", batch_size=0)
  with pytest.raises(TypeError, match="gama"):
    Decoder(target, target, gama=3)


# --- a routed loop: several drafters, each row drafting with its own ------------------------


def test_routed_drafters_each_row_decodes_as_with_its_own_drafter(target, prompts, reference):
  """Rows of one batch draft with different drafters (drafter_index): greedy output equals plain
  decoding, and every row's tokens and counters, greedy and sampled, equal what its own drafter
  alone gives, so the routed loop inherits each drafter's exactness (tests above and
  test_speculative_sampling). Reduced vocabularies, each drafter over its own token subset
  (the full-vocabulary routed loop: the next test)."""
  from specjax.models.draft_vocab import set_draft_vocab

  drafters = [noisy_copy(target, scale, seed) for scale, seed in ((0.01, 7), (0.03, 8), (0.003, 9))]
  V = target.config.vocab_size
  rng = np.random.RandomState(1)
  for d in drafters:  # one size W, different tokens; the prompts' tokens (3..255) mostly inside
    set_draft_vocab(d, np.sort(rng.choice(V, size=V // 2, replace=False)))
  subset = prompts[:18]
  index = [i % 3 for i in range(len(subset))]
  settings = dict(method="sps", gamma=4, max_new_tokens=MAX_NEW, batch_size=6)
  routed = Decoder(target, drafters, **settings)
  greedy = routed.generate(subset, eos_id=NO_EOS, drafter_index=index)
  assert greedy.new_tokens == reference.new_tokens[: len(subset)]
  for temperature in (0.0, 1.0):
    got = greedy if temperature == 0 else routed.generate(subset, eos_id=NO_EOS, drafter_index=index, temperature=1.0)
    for k, drafter in enumerate(drafters):
      rows = [i for i in range(len(subset)) if index[i] == k]
      alone = Decoder(target, drafter, **settings).generate(
        [subset[i] for i in rows], eos_id=NO_EOS, row_ids=rows, temperature=temperature
      )
      assert [got.new_tokens[i] for i in rows] == alone.new_tokens, (k, temperature)
      assert [int(got.accepted[i]) for i in rows] == [int(a) for a in alone.accepted], (k, temperature)
      assert [int(got.steps[i]) for i in rows] == [int(s) for s in alone.steps], (k, temperature)
  taus = [int(greedy.accepted[i]) / int(greedy.steps[i]) for i in range(len(subset))]
  by_drafter = [np.mean([t for t, k in zip(taus, index) if k == j]) for j in range(3)]
  assert len({round(t, 6) for t in by_drafter}) == 3  # the drafters really differ row by row


def test_routed_full_vocabulary_drafters_and_their_checks(target, prompts, reference):
  """Full-vocabulary drafters in a routed loop: greedy output equals plain decoding's; drafters
  of different structure, and an index past the drafters, are one clear error each."""
  other = init_model(get_preset("tiny").replace(num_layers=1), 3)
  with pytest.raises(SpecjaxError, match="share one architecture"):
    Decoder(target, [noisy_copy(target, 0.01, 7), other], method="sps")
  drafters = [noisy_copy(target, 0.01, 7), noisy_copy(target, 0.03, 8)]
  decoder = Decoder(target, drafters, method="sps", gamma=3, max_new_tokens=8, batch_size=4)
  out = decoder.generate(prompts[:8], eos_id=NO_EOS, drafter_index=[0, 1] * 4)
  assert out.new_tokens == [t[:8] for t in reference.new_tokens[:8]]
  # Batches in which no row uses drafter 0 skip it; their rows decode as with drafter 1 alone.
  one = decoder.generate(prompts[:8], eos_id=NO_EOS, drafter_index=[1] * 8)
  alone = Decoder(target, drafters[1], method="sps", gamma=3, max_new_tokens=8, batch_size=4)
  expected = alone.generate(prompts[:8], eos_id=NO_EOS)
  assert one.new_tokens == expected.new_tokens and [int(a) for a in one.accepted] == [int(a) for a in expected.accepted]
  with pytest.raises(SpecjaxError, match="drafter_index"):
    decoder.generate([[5, 6]], drafter_index=[2])
