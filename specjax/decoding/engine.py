"""Plain and speculative decoding, each one jitted `lax.while_loop` over static-shape buffers.

Invariants per row b (DESIGN.md): committed tokens are `tokens_BN[b, :lengths_B[b]]` (prompt and
output). The target cache holds keys/values of every committed token but the last; the drafter's
too, but for at most one token that the next round's two-token chunk rewrites. A round drafts
d1..dg from the last committed token, verifies [last, d1..dG] in one target forward at positions
L-1..L+G-1, accepts n drafts, emits one more token (residual or bonus) and commits n+1 tokens.
Near the end of the buffer a round drafts only what still fits (γ <= N-1-L) and the verified
window moves back to end at the buffer's last position, so a row fills the buffer exactly as
plain decoding does; it is done when the buffer is full.
Rejected entries stay in the caches beyond the new length; the position mask hides them and the
next round overwrites them. Rows keep their own lengths, γ and counters; a finished row commits
nothing more. Prompt length, sampling values, budgets and seeds are arrays (no recompiles);
the batch bucket, buffer length, maximum γ and greedy/sampling are static.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from specjax.decoding import sampling as smp
from specjax.models import cpu_kernels
from specjax.models.llama import KVCache

METHODS = ("ar", "sps", "pld")
MAX_EOS_IDS = 8  # X: stop ids per call, padded with -1 (Llama-3 lists 3)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Everything static about one compiled decoding program (built by `Decoder` from its
  `DecodingSettings`, which hold the defaults)."""

  method: str  # "ar" plain, "sps" drafter model, "pld" prompt lookup
  mode: smp.SamplingMode
  buffer_len: int  # N: prompt bucket + max_new + γ + 2, or the cache limit
  gamma: int  # G: drafts verified per round (maximum under the dynamic schedule); 1 for "ar"
  dynamic_gamma: bool
  gamma_start: int
  ngram_max: int
  ngram_min: int
  draft_positions: int = 0  # the drafter's max_position_embeddings when below buffer_len, else 0 (no cap)
  cpu_kernels: bool = False  # few-row products through specjax.models.cpu_kernels (XLA:CPU, one device)
  lookup_drafts: bool = False  # "sps": prompt lookup's drafts where an n-gram matches, the drafter's after


@flax.struct.dataclass
class Inputs:
  prompt_BP: jax.Array  # int32, right-padded
  prompt_lens_B: jax.Array
  row_ids_B: jax.Array  # the prompt's id: keys derive from it, not from the batch slot
  active_B: jax.Array  # bool: False for rows that only fill the batch bucket
  max_new_B: jax.Array
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  seed: jax.Array  # int32 scalar
  eos_ids_X: jax.Array  # int32 [X]: generation stops after any of them; -1 pads
  drafter_B: jax.Array  # int32: which of a routed loop's K drafters drafts for the row (0 with one drafter)


@flax.struct.dataclass
class RoundStats:
  """Per-row statistics of the verification rounds: the one place a decoding counter is defined.

  The loop carries it in `State`, `Decoder` returns it (numpy) as `DecodeResult.stats`, and
  `metrics` sums it; every step after `add_round` maps over the fields with `jax.tree.map`
  (slice rows, concatenate batches, sum rows, pad to a longer γ), and `zeros` reads each shape
  from the name's suffix (B rows, G draft positions, O = G + 1 outcomes, 0..G drafts accepted). A new
  counter is a field and its update in `add_round` (plus a key in `metrics.summarize` to report
  it). Only rounds in which the row is still active count.
  """

  rounds_B: jax.Array  # verification rounds (target forwards)
  accepted_B: jax.Array  # drafts accepted by verification
  proposed_B: jax.Array  # drafts proposed
  accept_hist_BO: jax.Array  # rounds by number of accepted drafts, 0..G
  pos_proposed_BG: jax.Array  # rounds in which draft position i was proposed
  pos_accepted_BG: jax.Array  # rounds whose first i+1 drafts were all accepted
  pos_reached_BG: jax.Array  # rounds that proposed draft i after accepting drafts 0..i-1

  @classmethod
  def zeros(cls, B: int, G: int) -> "RoundStats":
    size = {"B": B, "G": G, "O": G + 1}
    return cls(
      **{f.name: jnp.zeros([size[c] for c in f.name.rsplit("_", 1)[1]], jnp.int32) for f in dataclasses.fields(cls)}
    )

  def add_round(self, active_B, gamma_B, n_B) -> "RoundStats":
    """Counts one round: per row, gamma_B drafts proposed and n_B accepted (rows not active_B unchanged)."""
    G = self.pos_proposed_BG.shape[1]
    i_G = jnp.arange(G)
    act_B = active_B.astype(jnp.int32)
    proposed_BG = i_G[None] < gamma_B[:, None]
    accepted_BG = i_G[None] < n_B[:, None]
    reached_BG = proposed_BG & (i_G[None] <= n_B[:, None])
    return RoundStats(
      rounds_B=self.rounds_B + act_B,
      accepted_B=self.accepted_B + act_B * n_B,
      proposed_B=self.proposed_B + act_B * gamma_B,
      accept_hist_BO=self.accept_hist_BO + act_B[:, None] * jax.nn.one_hot(n_B, G + 1, dtype=jnp.int32),
      pos_proposed_BG=self.pos_proposed_BG + act_B[:, None] * proposed_BG,
      pos_accepted_BG=self.pos_accepted_BG + act_B[:, None] * accepted_BG,
      pos_reached_BG=self.pos_reached_BG + act_B[:, None] * reached_BG,
    )

  @property
  def drafted_B(self):
    """Rounds that proposed at least one draft: those that proposed draft position 1 (prompt
    lookup proposes nothing when no n-gram matches; γ=0 rounds near a length limit)."""
    return self.pos_proposed_BG[:, 0]


@flax.struct.dataclass
class State:
  tokens_BN: jax.Array
  lengths_B: jax.Array
  num_new_B: jax.Array
  done_B: jax.Array
  target_cache: KVCache
  drafter_cache: KVCache | tuple[KVCache, ...] | None  # a tuple: one cache per drafter of a routed loop
  gamma_B: jax.Array
  stats: RoundStats
  target_calls: jax.Array  # forwards of the whole batch
  drafter_calls: jax.Array


def _gather_B(tokens_BN, index_B):
  return jnp.take_along_axis(tokens_BN, index_B[:, None], axis=1)[:, 0]


def prefill(model, prompt_BP, prompt_lens_B, buffer_len: int) -> KVCache:
  """Keys/values of the prompt (padding too, masked later); length = prompt length - 1."""
  B, P = prompt_BP.shape
  cache = KVCache.zeros(model.config, B, buffer_len)
  positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  _, cache = model.hidden_states(prompt_BP, cache, positions_BP)
  return cache.replace(lengths_B=prompt_lens_B - 1)


def _commit(s: State, x: Inputs, candidates_BT, available_B, spec: LoopSpec):
  """Appends up to available_B of candidates_BT per row, stopping after any EOS id or at the budget."""
  T = candidates_BT.shape[1]
  t_T = jnp.arange(T)
  eos_BT = jnp.any((candidates_BT[..., None] == x.eos_ids_X) & (x.eos_ids_X >= 0), axis=-1)
  is_eos_BT = eos_BT & (t_T[None] < available_B[:, None])
  has_eos_B = jnp.any(is_eos_BT, axis=1)
  upto_eos_B = jnp.where(has_eos_B, jnp.argmax(is_eos_BT, axis=1) + 1, available_B)
  count_B = jnp.minimum(upto_eos_B, x.max_new_B - s.num_new_B)
  count_B = jnp.where(s.done_B, 0, jnp.maximum(count_B, 0))
  write_BT = s.lengths_B[:, None] + t_T[None]
  write_BT = jnp.where(t_T[None] < count_B[:, None], write_BT, spec.buffer_len)  # out of range: dropped
  rows_BT = jnp.broadcast_to(jnp.arange(candidates_BT.shape[0])[:, None], write_BT.shape)
  tokens_BN = s.tokens_BN.at[rows_BT, write_BT].set(candidates_BT, mode="drop")
  lengths_B = s.lengths_B + count_B
  num_new_B = s.num_new_B + count_B
  full_B = lengths_B >= spec.buffer_len  # no room for even one more token (rounds near the end draft fewer)
  done_B = s.done_B | (has_eos_B & (upto_eos_B <= count_B)) | (num_new_B >= x.max_new_B) | full_B
  return s.replace(tokens_BN=tokens_BN, lengths_B=lengths_B, num_new_B=num_new_B, done_B=done_B)


def _init_state(x: Inputs, spec: LoopSpec, target, drafter) -> State:
  B, P = x.prompt_BP.shape
  N, G = spec.buffer_len, spec.gamma
  tokens_BN = jnp.zeros((B, N), jnp.int32).at[:, :P].set(x.prompt_BP)
  zeros_B = jnp.zeros((B,), jnp.int32)
  return State(
    tokens_BN=tokens_BN,
    lengths_B=x.prompt_lens_B,
    num_new_B=zeros_B,
    done_B=~x.active_B | (x.max_new_B <= 0),
    target_cache=prefill(target, x.prompt_BP, x.prompt_lens_B, N),
    drafter_cache=jax.tree.map(
      lambda d: prefill(d, x.prompt_BP, x.prompt_lens_B, N), drafter, is_leaf=lambda d: isinstance(d, nnx.Module)
    ),
    gamma_B=jnp.full((B,), min(spec.gamma_start, G) if spec.dynamic_gamma else G, jnp.int32),
    stats=RoundStats.zeros(B, G),
    target_calls=jnp.zeros((), jnp.int32),
    drafter_calls=jnp.zeros((), jnp.int32),
  )


# --- plain decoding ------------------------------------------------------------------------


def _ar_round(s: State, x: Inputs, spec: LoopSpec, target) -> State:
  last_B = _gather_B(s.tokens_BN, s.lengths_B - 1)
  logits_B1V, cache = target(last_B[:, None], s.target_cache, (s.lengths_B - 1)[:, None])
  keys_B = smp.row_keys(x.seed, x.row_ids_B, s.lengths_B, smp.TAG_SAMPLE)
  next_B, _ = smp.choose_tokens(logits_B1V[:, 0], keys_B, x.temperature_B, x.top_k_B, x.top_p_B, spec.mode)
  active_B = ~s.done_B
  zeros_B = jnp.zeros_like(s.lengths_B)  # a plain step: a round that proposes and accepts nothing
  s = s.replace(
    target_cache=cache.replace(lengths_B=s.lengths_B),
    target_calls=s.target_calls + 1,
    stats=s.stats.add_round(active_B, zeros_B, zeros_B),
  )
  return _commit(s, x, next_B[:, None], jnp.ones_like(s.lengths_B), spec)


# --- drafting ------------------------------------------------------------------------------


def scoring_forward(model, ids_W=None):
  """model's cached forward, (tokens_BT, cache, positions_BT) -> (float32 scores_BTW, cache), over
  tokens ids_W (None: the whole vocabulary, the model as it is), with those output columns
  gathered [D, W] once, before the loop. (A [D, V] copy of a tied [V, D] output layer was
  measured too, for the target: on these shared 2 cores it was neither faster nor slower
  consistently across 1, 5 and 16 rows, so the target keeps its own layout.)"""
  if ids_W is None:
    return model
  head_DW = model.head_DW(ids_W)

  def forward(tokens_BT, cache, positions_BT):
    h_BTD, cache = model.hidden_states(tokens_BT, cache, positions_BT)
    if cpu_kernels.applies(h_BTD, head_DW):
      return cpu_kernels.dense(h_BTD, head_DW), cache
    return jnp.dot(h_BTD, head_DW.astype(h_BTD.dtype)).astype(jnp.float32), cache

  return forward


@dataclasses.dataclass(frozen=True)
class DraftModel:
  """The drafter as the loop calls it: forward(tokens_BT, cache, positions_BT) -> (scores_BTW,
  cache) over its W draft tokens, and ids_W mapping score index -> token id (None: W = V, the
  identity). A reduced-vocabulary drafter (specjax.models.draft_vocab) scores only its subset
  with the output columns gathered once per call, so each draft step reads [D, W], not [D, V]."""

  forward: object
  ids_W: jax.Array | None
  vocab_size: int

  @classmethod
  def of(cls, drafter) -> "DraftModel":
    vocab = getattr(drafter, "draft_vocab", None)
    ids_W = None if vocab is None else vocab[...]
    return cls(scoring_forward(drafter, ids_W), ids_W, drafter.config.vocab_size)

  def tokens(self, index_B):
    return index_B if self.ids_W is None else self.ids_W[index_B]

  def full_probs(self, q_BW):
    """q over the whole vocabulary (zero outside the subset), as verification reads it."""
    if q_BW is None or self.ids_W is None:
      return q_BW
    return jnp.zeros(q_BW.shape[:-1] + (self.vocab_size,), q_BW.dtype).at[..., self.ids_W].set(q_BW)


@dataclasses.dataclass(frozen=True)
class RoutedDraftModel:
  """K drafters of one architecture and draft-vocabulary size in one loop: row b drafts with
  drafter drafter_B[b] (each language's prompts with their own drafter, in one batch).

  Every drafter some row uses runs on every row (a drafter no row uses is skipped, `lax.cond`)
  and each row keeps its own drafter's scores: up to K drafter forwards per draft step, each over
  the whole batch. On a memory-bound device one forward over B rows costs about what one over a
  single row costs, so this is K draft steps, not K x B; the alternative, gathering each row's
  weights, would read B drafters' weights per step. Caches: a tuple, one per drafter, each
  holding every row's keys/values (a skipped drafter's are not read)."""

  models: tuple[DraftModel, ...]
  drafter_B: jax.Array
  ids_BW: jax.Array | None  # each row's drafter's score index -> token id (None: W = V)

  @classmethod
  def of(cls, drafters, drafter_B) -> "RoutedDraftModel":
    models = tuple(DraftModel.of(d) for d in drafters)
    ids_BW = None if models[0].ids_W is None else jnp.stack([m.ids_W for m in models])[drafter_B]
    return cls(models, drafter_B, ids_BW)

  @property
  def vocab_size(self) -> int:
    return self.models[0].vocab_size

  def forward(self, tokens_BT, caches, positions_BT):
    def run(k, model, cache):  # skipped (zeros, cache unchanged) when no row drafts with drafter k
      call = lambda c: model.forward(tokens_BT, c, positions_BT)
      scores = jax.eval_shape(call, cache)[0]
      skip = lambda c: (jnp.zeros(scores.shape, scores.dtype), c)
      return jax.lax.cond(jnp.any(self.drafter_B == k), call, skip, cache)

    outputs = [run(k, m, cache) for k, (m, cache) in enumerate(zip(self.models, caches))]
    scores_KBTW = jnp.stack([scores for scores, _ in outputs])
    scores_BTW = jnp.take_along_axis(scores_KBTW, self.drafter_B[None, :, None, None], axis=0)[0]
    return scores_BTW, tuple(cache for _, cache in outputs)

  def tokens(self, index_B):
    return index_B if self.ids_BW is None else jnp.take_along_axis(self.ids_BW, index_B[:, None], axis=1)[:, 0]

  def full_probs(self, q_BW):
    if q_BW is None or self.ids_BW is None:
      return q_BW
    rows_B1 = jnp.arange(q_BW.shape[0])[:, None]
    return jnp.zeros((q_BW.shape[0], self.vocab_size), q_BW.dtype).at[rows_B1, self.ids_BW].set(q_BW)


def _draft_with_model(s: State, x: Inputs, spec: LoopSpec, drafter: DraftModel, gamma_B, lookup=None):
  """Drafts up to max(gamma_B) tokens with the drafter; returns (drafts_BG, q_BGV or None, cache, steps).

  lookup: (drafts_BG, available_B) of prompt lookup, or None. Draft i < available_B is lookup's
  (q one-hot: a deterministic proposal), the rest the drafter's; the drafter reads whichever
  was chosen, so its cache holds the drafts verification sees. Which proposal is used depends
  only on committed tokens, so verification stays exact (greedy and sampled)."""
  B, G, L_B = s.lengths_B.shape[0], spec.gamma, s.lengths_B
  # Catch-up and first draft in one two-token chunk at positions L-2, L-1: after a fully
  # accepted round the drafter has not seen the last draft; otherwise the first token rewrites
  # identical keys/values. A one-token prompt (L=1) starts at 0; its second slot is overwritten
  # by the next draft step before anything reads it.
  start_B = jnp.maximum(L_B - 2, 0)
  pos_B2 = start_B[:, None] + jnp.arange(2)[None]
  chunk_B2 = jnp.take_along_axis(s.tokens_BN, pos_B2, axis=1)
  logits_B2W, cache = drafter.forward(chunk_B2, s.drafter_cache, pos_B2)
  logits_BW = jnp.take_along_axis(logits_B2W, (L_B - 1 - start_B)[:, None, None], axis=1)[:, 0]

  def choose(logits_BW, i):
    keys_B = smp.row_keys(x.seed, x.row_ids_B, L_B + i, smp.TAG_DRAFT)
    index_B, q_BW = smp.choose_tokens(logits_BW, keys_B, x.temperature_B, x.top_k_B, x.top_p_B, spec.mode)
    d_B, q_BV = drafter.tokens(index_B), drafter.full_probs(q_BW)
    if lookup is None:
      return d_B, q_BV
    looked_B = jax.lax.dynamic_index_in_dim(lookup[0], i, axis=1, keepdims=False)
    use_B = i < lookup[1]
    d_B = jnp.where(use_B, looked_B, d_B)
    if q_BV is not None:
      q_BV = jnp.where(use_B[:, None], jax.nn.one_hot(d_B, q_BV.shape[-1], dtype=q_BV.dtype), q_BV)
    return d_B, q_BV

  d_B, q_BV = choose(logits_BW, 0)
  drafts_BG = jnp.zeros((B, G), jnp.int32).at[:, 0].set(d_B)
  q_BGV = None if q_BV is None else jnp.zeros((B, G, q_BV.shape[-1]), jnp.float32).at[:, 0].set(q_BV)
  steps = jnp.maximum(jnp.max(gamma_B), 1)

  def body(carry):
    i, drafts_BG, q_BGV, cache = carry
    prev_B = jax.lax.dynamic_index_in_dim(drafts_BG, i - 1, axis=1, keepdims=False)
    logits_B1W, cache = drafter.forward(prev_B[:, None], cache, (L_B - 1 + i)[:, None])
    d_B, q_BV = choose(logits_B1W[:, 0], i)
    drafts_BG = jax.lax.dynamic_update_index_in_dim(drafts_BG, d_B, i, axis=1)
    if q_BGV is not None:
      q_BGV = jax.lax.dynamic_update_index_in_dim(q_BGV, q_BV, i, axis=1)
    return i + 1, drafts_BG, q_BGV, cache

  _, drafts_BG, q_BGV, cache = jax.lax.while_loop(lambda c: c[0] < steps, body, (1, drafts_BG, q_BGV, cache))
  return drafts_BG, q_BGV, cache, steps


def _draft_prompt_lookup(s: State, spec: LoopSpec, gamma_B):
  """Prompt lookup: the continuation of the latest earlier occurrence of the last n-gram
  (longest n first) in the row's committed tokens. Returns (drafts_BG, available_B)."""
  B, N = s.tokens_BN.shape
  G, L_B = spec.gamma, s.lengths_B
  j_N = jnp.arange(N)
  found_B = jnp.zeros((B,), bool)
  start_B = jnp.zeros((B,), jnp.int32)
  for n in range(spec.ngram_max, spec.ngram_min - 1, -1):
    match_BN = jnp.ones((B, N), bool)
    for k in range(n):
      suffix_B = _gather_B(s.tokens_BN, jnp.maximum(L_B - n + k, 0))
      shifted_BN = jnp.roll(s.tokens_BN, -k, axis=1)  # shifted[j] = tokens[j + k]
      match_BN &= shifted_BN == suffix_B[:, None]
    # A match must end before the suffix itself starts, and the suffix must exist.
    match_BN &= (j_N[None] + n <= L_B[:, None] - 1) & (L_B[:, None] >= n + 1)
    latest_B = jnp.max(jnp.where(match_BN, j_N[None], -1), axis=1)
    use_B = ~found_B & (latest_B >= 0)
    start_B = jnp.where(use_B, latest_B + n, start_B)
    found_B |= use_B
  index_BG = jnp.minimum(start_B[:, None] + jnp.arange(G)[None], N - 1)
  drafts_BG = jnp.take_along_axis(s.tokens_BN, index_BG, axis=1)
  available_B = jnp.where(found_B, jnp.clip(L_B - start_B, 0, G), 0)
  return drafts_BG, jnp.minimum(available_B, gamma_B)


# --- verification --------------------------------------------------------------------------


def _accept(s: State, x: Inputs, spec: LoopSpec, logits_BTV, drafts_BG, q_BGV, gamma_B):
  """(n_B accepted drafts, next_B token): prefix matching for greedy, rejection sampling else.

  q_BGV None with sampling means a deterministic drafter (prompt lookup): q is one-hot.
  """
  G = spec.gamma
  i_G = jnp.arange(G)
  proposed_BG = i_G[None] < gamma_B[:, None]
  if spec.mode.greedy:
    target_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    ok_BG = (drafts_BG == target_BT[:, :G]) & proposed_BG
    n_B = jnp.sum(jnp.cumprod(ok_BG.astype(jnp.int32), axis=1), axis=1)
    return n_B, _gather_B(target_BT, n_B)
  p_BTV = smp.processed_probs(logits_BTV, x.temperature_B[:, None], x.top_k_B[:, None], x.top_p_B[:, None], spec.mode)
  p_draft_BG = jnp.take_along_axis(p_BTV[:, :G], drafts_BG[..., None], axis=-1)[..., 0]
  q_draft_BG = (
    jnp.ones_like(p_draft_BG) if q_BGV is None else jnp.take_along_axis(q_BGV, drafts_BG[..., None], axis=-1)[..., 0]
  )
  draft_pos_BG = s.lengths_B[:, None] + i_G[None]
  u_BG = jax.vmap(
    lambda pos_B: jax.vmap(jax.random.uniform)(smp.row_keys(x.seed, x.row_ids_B, pos_B, smp.TAG_ACCEPT)),
    in_axes=1,
    out_axes=1,
  )(draft_pos_BG)
  ok_BG = (u_BG * q_draft_BG < p_draft_BG) & proposed_BG  # u < min(1, p/q)
  n_B = jnp.sum(jnp.cumprod(ok_BG.astype(jnp.int32), axis=1), axis=1)
  p_next_BV = jnp.take_along_axis(p_BTV, n_B[:, None, None], axis=1)[:, 0]
  rejected_B = n_B < gamma_B
  n_clip_B = jnp.minimum(n_B, G - 1)
  if q_BGV is None:
    d_next_B = _gather_B(drafts_BG, n_clip_B)
    q_next_BV = jax.nn.one_hot(d_next_B, p_next_BV.shape[-1], dtype=jnp.float32)
  else:
    q_next_BV = jnp.take_along_axis(q_BGV, n_clip_B[:, None, None], axis=1)[:, 0]
  residual_BV = jnp.where(rejected_B[:, None], jnp.maximum(p_next_BV - q_next_BV, 0.0), p_next_BV)
  residual_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_next_BV)
  keys_B = smp.row_keys(x.seed, x.row_ids_B, s.lengths_B + n_B, smp.TAG_RESIDUAL)
  return n_B, smp.sample_from_probs(keys_B, residual_BV)


def _verify_window(s: State, spec: LoopSpec, drafts_BG):
  """The G+1 tokens the target verifies and their positions: [last, d1..dG] at L-1..L+G-1, or,
  when that would run past the buffer, a window ending at its last position that starts with
  committed tokens (their keys/values are rewritten unchanged). Returns (tokens_BT, positions_BT,
  offset_B): the logits for position L-1+t are at index offset_B + t."""
  G, N, L_B = spec.gamma, spec.buffer_len, s.lengths_B
  start_B = jnp.minimum(L_B - 1, N - G - 1)
  positions_BT = start_B[:, None] + jnp.arange(G + 1)[None]
  committed_BT = jnp.take_along_axis(s.tokens_BN, positions_BT, axis=1)
  drafted_BT = jnp.take_along_axis(drafts_BG, jnp.clip(positions_BT - L_B[:, None], 0, G - 1), axis=1)
  return jnp.where(positions_BT < L_B[:, None], committed_BT, drafted_BT), positions_BT, L_B - 1 - start_B


def _spec_round(s: State, x: Inputs, spec: LoopSpec, target, drafter) -> State:
  G, L_B = spec.gamma, s.lengths_B
  active_B = ~s.done_B
  schedule_B = jnp.where(active_B, s.gamma_B, 0)
  # A round commits up to γ+1 tokens: near the buffer's end it drafts only what still fits.
  room_B = spec.buffer_len - 1 - L_B
  if spec.draft_positions:  # draft i comes from the drafter's position L+i-2: keep it inside the drafter's range
    room_B = jnp.minimum(room_B, spec.draft_positions + 1 - L_B)
  gamma_B = jnp.clip(schedule_B, 0, jnp.maximum(room_B, 0))
  if spec.method == "sps":
    lookup = _draft_prompt_lookup(s, spec, gamma_B) if spec.lookup_drafts else None
    drafts_BG, q_BGV, dcache, steps = _draft_with_model(s, x, spec, drafter, gamma_B, lookup)
    s = s.replace(drafter_cache=dcache, drafter_calls=s.drafter_calls + steps)
  else:
    drafts_BG, gamma_B = _draft_prompt_lookup(s, spec, gamma_B)
    q_BGV = None
  verify_BT, positions_BT, offset_B = _verify_window(s, spec, drafts_BG)
  logits_BTV, tcache = target(verify_BT, s.target_cache, positions_BT)
  t_T = jnp.arange(G + 1)
  # Only index >= offset + n, n <= γ <= G - offset, is read; the clipped rest is never used.
  logits_BTV = jnp.take_along_axis(logits_BTV, jnp.minimum(offset_B[:, None] + t_T[None], G)[..., None], axis=1)
  n_B, next_B = _accept(s, x, spec, logits_BTV, drafts_BG, q_BGV, gamma_B)

  candidates_BT = jnp.where(t_T[None] < n_B[:, None], jnp.pad(drafts_BG, ((0, 0), (0, 1))), next_B[:, None])
  s = s.replace(target_calls=s.target_calls + 1, stats=s.stats.add_round(active_B, gamma_B, n_B))
  if spec.dynamic_gamma:  # transformers' schedule: +2 after a fully accepted draft, -1 otherwise
    grown_B = jnp.where(n_B >= gamma_B, jnp.minimum(schedule_B + 2, G), jnp.maximum(schedule_B - 1, 1))
    s = s.replace(gamma_B=jnp.where(active_B & (gamma_B > 0), grown_B, s.gamma_B))
  s = _commit(s, x, candidates_BT, n_B + 1, spec)
  # Roll back by moving lengths: both caches hold every committed token but the last.
  s = s.replace(target_cache=tcache.replace(lengths_B=s.lengths_B - 1))
  if s.drafter_cache is not None:
    s = s.replace(drafter_cache=_with_lengths(s.drafter_cache, s.lengths_B - 1))
  return s


def _with_lengths(cache, lengths_B):
  """A KV cache (or a routed loop's tuple of them) with every row's length set to lengths_B."""
  return jax.tree.map(lambda c: c.replace(lengths_B=lengths_B), cache, is_leaf=lambda c: isinstance(c, KVCache))


def decode_loop(
  target_graph, target_state, drafter_graph, drafter_state, x: Inputs, spec: LoopSpec, cache_sharding=None
) -> State:
  """The whole generation: prefill, then one `lax.while_loop` until every row is done."""
  with cpu_kernels.enabled(spec.cpu_kernels):
    return _decode_loop(target_graph, target_state, drafter_graph, drafter_state, x, spec, cache_sharding)


def _decode_loop(target_graph, target_state, drafter_graph, drafter_state, x, spec, cache_sharding):
  target = nnx.merge(target_graph, target_state)
  # One drafter, or a routed loop's tuple of them (one graph: the drafters share an architecture).
  drafter = (
    None
    if drafter_graph is None
    else jax.tree.map(
      lambda state: nnx.merge(drafter_graph, state), drafter_state, is_leaf=lambda a: isinstance(a, nnx.State)
    )
  )
  s = _init_state(x, spec, target, drafter)
  if cache_sharding is not None:
    s = s.replace(target_cache=jax.lax.with_sharding_constraint(s.target_cache, cache_sharding[0]))
    if drafter is not None and cache_sharding[1] is not None:
      s = s.replace(drafter_cache=jax.lax.with_sharding_constraint(s.drafter_cache, cache_sharding[1]))
  if spec.method == "ar":
    body = functools.partial(_ar_round, x=x, spec=spec, target=target)
  else:
    if drafter is None:
      draft_model = None
    elif isinstance(drafter, tuple):
      draft_model = RoutedDraftModel.of(drafter, x.drafter_B)
    else:
      draft_model = DraftModel.of(drafter)
    body = functools.partial(_spec_round, x=x, spec=spec, target=target, drafter=draft_model)
  return jax.lax.while_loop(lambda s: jnp.any(~s.done_B), body, s)
