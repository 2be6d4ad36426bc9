"""`Decoder`: prompts in, tokens and acceptance statistics out, through the compiled loops of
`engine.py`. Pads prompts to length buckets and batches to a fixed size so a new prompt length
does not recompile, validates what the user gave, and fetches results in one transfer."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from specjax import sharding as shd
from specjax.decoding import engine
from specjax.decoding.sampling import SamplingMode
from specjax.errors import SpecjaxError
from specjax.models.llama import KVCache, Llama


# (target graph, drafter graph, LoopSpec, batch size, mesh) -> jitted decode loop; see Decoder._program.
_PROGRAMS: dict[tuple, object] = {}


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, multiple * math.ceil(n / multiple))


def stop_ids(config, tokenizer=None) -> tuple[int, ...]:
  """The ids generation stops at: the checkpoint's EOS list (config.json / generation_config.json)
  plus the tokenizer's EOS id, no repeats: a chat model may end a turn with either."""
  ids = tuple(config.stop_token_ids)
  eos = getattr(tokenizer, "eos_token_id", None)
  return tuple(dict.fromkeys(ids + (() if eos is None else (int(eos),))))


def _eos_array_X(eos_id) -> np.ndarray:
  """An int or a sequence of ints -> int32 [engine.MAX_EOS_IDS], padded with -1 (a negative id stops nothing)."""
  ids = [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
  if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
    raise SpecjaxError(f"eos_id={eos_id!r}: expected a token id or a sequence of token ids")
  ids = list(dict.fromkeys(int(i) for i in ids if i >= 0))
  if len(ids) > engine.MAX_EOS_IDS:
    raise SpecjaxError(f"eos_id={eos_id!r}: {len(ids)} stop ids, at most {engine.MAX_EOS_IDS} are supported")
  return np.array(ids + [-1] * (engine.MAX_EOS_IDS - len(ids)), np.int32)


@dataclasses.dataclass
class DecodeResult:
  """Per-row outputs of one call (numpy), in the order of the prompts given."""

  new_tokens: list[list[int]]
  stats: engine.RoundStats  # numpy, one row per prompt: rounds_B, accepted_B, accept_hist_BO, ...
  target_calls: int  # forwards of whole batches, summed over the call's batches
  drafter_calls: int
  wall_s: float

  @property
  def num_new(self) -> np.ndarray:
    return np.array([len(t) for t in self.new_tokens])

  @property
  def drafted_steps(self) -> np.ndarray:
    """Rounds per row that proposed at least one draft (`RoundStats.drafted_B`)."""
    return np.asarray(self.stats.drafted_B)

  # The names these arrays had before `stats` (README, jobs), read-only; new counters get none.
  steps = property(lambda self: self.stats.rounds_B, doc="verification rounds per row (= target forwards)")
  accepted = property(lambda self: self.stats.accepted_B)
  proposed = property(lambda self: self.stats.proposed_B)
  accept_hist = property(lambda self: self.stats.accept_hist_BO, doc="[rows, G+1]")
  pos_proposed = property(lambda self: self.stats.pos_proposed_BG, doc="[rows, G]")
  pos_accepted = property(lambda self: self.stats.pos_accepted_BG, doc="[rows, G]")
  pos_reached = property(
    lambda self: self.stats.pos_reached_BG, doc="[rows, G]: proposed with every earlier draft accepted"
  )


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
  """How a `Decoder` decodes: built once from a config (`from_config`), one default per setting.

  gamma: drafts per round; with dynamic_gamma it is the ceiling of transformers' schedule
  (start `gamma_start`, +2 after a fully accepted draft, -1 otherwise), with no recompiles.
  batch_size: the static batch; calls with fewer prompts are padded, more are split.
  max_cache_len: cache positions available (None: the target's max_position_embeddings). A
  drafter with fewer positions caps drafting, not generation: a row longer than the drafter's
  max_position_embeddings continues with plain steps (γ=0), so outputs stay the target's.
  prompt_bucket: prompts are padded to a multiple of it (one compile per bucket).
  ngram_max, ngram_min: the n-gram sizes prompt lookup matches, longest first.
  lookup_drafts ("sps"): a round's first drafts are prompt lookup's where an n-gram matches (as
  many as it has, up to γ), the drafter's after them; the drafter reads the chosen drafts, so
  a round costs what it costs without. Prompt lookup catches the copies a small drafter misses
  (names, quoted source text); verification stays exact (greedy and sampled).
  cpu_kernels: on XLA:CPU without a mesh, run float32 products over up to 48 rows (a plain
  step, a verification, a draft step; 8 for a tied output layer) and attention over the cache through
  specjax.models.cpu_kernels, which reads each weight once for all rows and each cache slot a
  query sees once; elsewhere, or False, XLA's ops.
  """

  method: str = "sps"  # "ar" plain, "sps" drafter model, "pld" prompt lookup
  gamma: int = 5
  dynamic_gamma: bool = False
  gamma_start: int = 5
  max_new_tokens: int = 128
  batch_size: int = 1
  max_cache_len: int | None = None
  prompt_bucket: int = 64
  ngram_max: int = 3
  ngram_min: int = 1
  cpu_kernels: bool = True
  lookup_drafts: bool = False

  @classmethod
  def from_config(cls, config, prefix: str = "", **overrides) -> "DecodingSettings":
    """The settings a config names (`prefix` + field, e.g. "acceptance_"), defaults for the rest."""
    fields = {}
    for f in dataclasses.fields(cls):
      key = prefix + f.name
      if key in config and config[key] is not None:
        fields[f.name] = config[key]
    return cls(**{**fields, **overrides}).checked()

  def replace(self, **fields) -> "DecodingSettings":
    return dataclasses.replace(self, **fields).checked()

  def checked(self) -> "DecodingSettings":
    """Self, or one SpecjaxError naming the setting at fault."""
    if self.method not in engine.METHODS:
      raise SpecjaxError(f"method={self.method!r}: expected one of {engine.METHODS}")
    if self.method != "ar" and (isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1):
      raise SpecjaxError(f"gamma={self.gamma!r}: the draft length must be an integer >= 1")
    if self.max_new_tokens < 1:
      raise SpecjaxError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
    if self.batch_size < 1:
      raise SpecjaxError(f"batch_size={self.batch_size}: must be >= 1")
    if not isinstance(self.lookup_drafts, bool):
      raise SpecjaxError(f"lookup_drafts={self.lookup_drafts!r}: must be True or False")
    if not 1 <= self.ngram_min <= self.ngram_max:
      raise SpecjaxError(f"prompt lookup n-gram sizes min={self.ngram_min}, max={self.ngram_max}: need 1 <= min <= max")
    return self


class Decoder:
  """Plain (`ar`), drafter-model speculative (`sps`) or prompt-lookup (`pld`) decoding of a
  target (and drafter) by `DecodingSettings`.

  `Decoder(target, drafter, settings, mesh=mesh)`; keyword fields override the settings'
  (`Decoder(target, method="ar", max_new_tokens=16)`). `abstract_inputs` and `lower` give the
  exact program a call runs, for ahead-of-time compilation (specjax.aot). A list of drafters
  of one structure makes a routed loop: `generate(drafter_index=)` picks each prompt's.
  """

  def __init__(
    self,
    target: Llama,
    drafter: Llama | Sequence[Llama] | None = None,
    settings: DecodingSettings | None = None,
    *,
    mesh=None,
    **fields,
  ):
    unknown = set(fields) - {f.name for f in dataclasses.fields(DecodingSettings)}
    if unknown:
      raise TypeError(f"Decoder: unknown settings {sorted(unknown)}")
    settings = (settings or DecodingSettings()).replace(**fields)
    # Several drafters: a routed loop, each row drafting with the one `generate(drafter_index=)` names.
    drafters = (drafter,) if drafter is None or isinstance(drafter, Llama) else tuple(drafter)
    if settings.method == "sps" and (drafter is None or not drafters):
      raise SpecjaxError("method='sps' needs a drafter model (config field `drafter`)")
    for d in drafters if settings.method == "sps" else ():
      if d.config.vocab_size != target.config.vocab_size:
        raise SpecjaxError(
          f"the drafter's vocabulary ({d.config.vocab_size} tokens) differs from the "
          f"target's ({target.config.vocab_size}); a drafter must share the target's tokenizer"
        )
    if settings.method == "ar":
      settings = dataclasses.replace(settings, gamma=1, dynamic_gamma=False)
    elif settings.method != "sps":
      settings = dataclasses.replace(settings, dynamic_gamma=False)
    self.settings = settings
    self.mesh = mesh
    self.max_cache_len = settings.max_cache_len or target.config.max_position_embeddings
    self.target_graph, self.target_state = nnx.split(target)
    self.target_config = target.config
    self.drafter_config = drafters[0].config if settings.method == "sps" else None
    self.drafter_graph, self.drafter_state = None, None
    self.num_drafters = len(drafters) if settings.method == "sps" else 0
    if settings.method == "sps":
      graphs, states = zip(*(nnx.split(d) for d in drafters))
      shapes = [jax.tree.map(np.shape, state) for state in states]
      if any(g != graphs[0] or shape != shapes[0] for g, shape in zip(graphs[1:], shapes[1:])):
        raise SpecjaxError(
          "drafters of one routed loop must share one architecture and one draft-vocabulary size "
          f"(got {len(drafters)} drafters of different structure); decode the others with their own Decoder"
        )
      self.drafter_graph = graphs[0]
      self.drafter_state = states[0] if len(states) == 1 else tuple(states)
    self.program_keys: set[tuple] = set()  # the _PROGRAMS entries this decoder has used

  # Read-only views of the settings under the names callers have used.
  method = property(lambda self: self.settings.method)
  gamma = property(lambda self: self.settings.gamma)
  max_new_tokens = property(lambda self: self.settings.max_new_tokens)
  batch_size = property(lambda self: self.settings.batch_size)
  prompt_bucket = property(lambda self: self.settings.prompt_bucket)

  # --- compile cache --------------------------------------------------------------------

  def _program(self, spec: engine.LoopSpec):
    """The jitted loop, shared by every Decoder of the same model structures: an evaluation that
    swaps six same-shaped drafters compiles each program once, not six times."""
    key = (self.target_graph, self.drafter_graph, spec, self.batch_size, self.mesh)
    self.program_keys.add(key)
    if key not in _PROGRAMS:
      cache_sharding = self.cache_shardings(spec)
      target_graph, drafter_graph = self.target_graph, self.drafter_graph
      _PROGRAMS[key] = jax.jit(
        lambda ts, ds, x: engine.decode_loop(target_graph, ts, drafter_graph, ds, x, spec, cache_sharding)
      )
    return _PROGRAMS[key]

  def cache_shardings(self, spec: engine.LoopSpec) -> tuple | None:
    """(target, drafter) KV-cache shardings on the mesh (None without a mesh or drafter)."""
    if self.mesh is None:
      return None

    def sharding_of(config):
      abstract = jax.eval_shape(lambda: KVCache.zeros(config, self.batch_size, spec.buffer_len))
      return shd.cache_sharding(abstract, self.mesh)

    drafter = sharding_of(self.drafter_config) if self.drafter_config else None
    if self.num_drafters > 1:
      drafter = (drafter,) * self.num_drafters
    return (sharding_of(self.target_config), drafter)

  def loop_spec(self, prompt_len: int, mode: SamplingMode) -> engine.LoopSpec:
    """The static program a batch whose longest prompt has `prompt_len` tokens runs."""
    return self._spec(_round_up(prompt_len, self.prompt_bucket), mode)

  def _spec(self, prompt_len: int, mode: SamplingMode) -> engine.LoopSpec:
    need = prompt_len + self.max_new_tokens + self.gamma + 2
    buffer_len = min(_round_up(need, 64), self.max_cache_len)
    draft_positions = self.drafter_config.max_position_embeddings if self.drafter_config else buffer_len
    st = self.settings
    return engine.LoopSpec(
      method=st.method,
      mode=mode,
      buffer_len=buffer_len,
      gamma=st.gamma,
      dynamic_gamma=st.dynamic_gamma,
      gamma_start=st.gamma_start,
      ngram_max=st.ngram_max,
      ngram_min=st.ngram_min,
      draft_positions=draft_positions if draft_positions < buffer_len else 0,
      cpu_kernels=st.cpu_kernels and self.mesh is None and jax.default_backend() == "cpu",
      lookup_drafts=st.lookup_drafts and st.method == "sps",
    )

  def _bucket(self, prompt_len: int, spec: engine.LoopSpec) -> int:
    """The padded prompt length P of a batch: its bucket, or what the buffer leaves for it."""
    return min(_round_up(prompt_len, self.prompt_bucket), spec.buffer_len - self.gamma - 2)

  def _place(self, x: engine.Inputs, put) -> engine.Inputs:
    """Per-row arrays split by batch over the mesh, the seed and the stop ids replicated;
    put(array, sharding) places one leaf (device_put, or a ShapeDtypeStruct for lowering)."""
    if self.mesh is None:
      return jax.tree.map(lambda a: put(a, None), x)
    replicated = shd.logical_sharding((), (), self.mesh)
    return jax.tree.map(
      lambda a: put(a, shd.batch_sharding(np.shape(a), self.mesh) if np.ndim(a) else replicated),
      x.replace(eos_ids_X=None),
    ).replace(eos_ids_X=put(x.eos_ids_X, replicated))

  def abstract_inputs(self, prompt_len: int, mode: SamplingMode) -> engine.Inputs:
    """The loop's inputs for a batch whose longest prompt has `prompt_len` tokens, as
    ShapeDtypeStructs with the shardings a call places them with."""
    spec = self.loop_spec(prompt_len, mode)
    B, P = self.batch_size, self._bucket(prompt_len, spec)
    x = self._inputs(
      np.zeros((B, P), np.int32),
      np.ones((B,), np.int32),
      np.zeros((B,), np.int32),
      np.ones((B,), bool),
      np.ones((B,), np.int32),
      1.0,
      0,
      1.0,
      0,
      _eos_array_X(-1),
    )
    return self._place(x, lambda a, sharding: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sharding))

  def lower(self, prompt_len: int, mode: SamplingMode):
    """The jitted loop a call with this longest prompt runs, lowered over this decoder's model
    states (concrete, or abstract with shardings for ahead-of-time compilation)."""
    spec = self.loop_spec(prompt_len, mode)
    return self._program(spec).lower(self.target_state, self.drafter_state, self.abstract_inputs(prompt_len, mode))

  @staticmethod
  def _inputs(
    prompt_BP, lens_B, row_ids_B, active_B, max_new_B, temperature, top_k, top_p, seed, eos_X, drafter_B=None
  ):
    B = prompt_BP.shape[0]
    return engine.Inputs(
      drafter_B=np.zeros((B,), np.int32) if drafter_B is None else drafter_B,
      prompt_BP=prompt_BP,
      prompt_lens_B=lens_B,
      row_ids_B=row_ids_B,
      active_B=active_B,
      max_new_B=max_new_B,
      temperature_B=np.full((B,), max(temperature, 1e-6), np.float32),
      top_k_B=np.full((B,), top_k, np.int32),
      top_p_B=np.full((B,), top_p, np.float32),
      seed=np.int32(seed),
      eos_ids_X=eos_X,
    )

  def programs(self) -> list:
    """The jitted loops this decoder has run (for compile-count checks)."""
    return [_PROGRAMS[key] for key in self.program_keys]

  # --- calls ----------------------------------------------------------------------------

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
    eos_id: int | Sequence[int] | None = None,
    max_new_tokens: int | Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    drafter_index: Sequence[int] | None = None,
  ) -> DecodeResult:
    """Decodes every prompt (token id lists); batches of `batch_size`, one transfer per batch.

    row_ids: each prompt's stable id (default: its index); sampled outputs depend on (seed,
    row id, position) only. names: labels for error messages (e.g. question ids).
    eos_id: a stop id or several (default: the target config's stop_token_ids); negative ids stop nothing.
    drafter_index: with several drafters, which one drafts for each prompt (default: the first).
    """
    if len(prompts) == 0:
      raise SpecjaxError("no prompts to decode")
    drafter_index = [0] * len(prompts) if drafter_index is None else [int(k) for k in drafter_index]
    if len(drafter_index) != len(prompts) or any(not 0 <= k < max(self.num_drafters, 1) for k in drafter_index):
      raise SpecjaxError(
        f"drafter_index: expected one index in [0, {max(self.num_drafters, 1)}) per prompt "
        f"({len(prompts)} prompts), got {drafter_index}"
      )
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise SpecjaxError(
        f"sampling values temperature={temperature}, top_k={top_k}, top_p={top_p}: need "
        "temperature >= 0, top_k >= 0 (0 = off), 0 < top_p <= 1"
      )
    names = list(names) if names is not None else [f"prompt {i}" for i in range(len(prompts))]
    row_ids = list(row_ids) if row_ids is not None else list(range(len(prompts)))
    budgets = (
      [max_new_tokens] * len(prompts)
      if isinstance(max_new_tokens, int) or max_new_tokens is None
      else list(max_new_tokens)
    )
    budgets = [self.max_new_tokens if b is None else min(int(b), self.max_new_tokens) for b in budgets]
    vocab = self.target_config.vocab_size
    for name, p in zip(names, prompts):
      if len(p) == 0:
        raise SpecjaxError(f"{name}: empty prompt")
      if len(p) + self.gamma + 2 > self.max_cache_len:
        raise SpecjaxError(
          f"{name}: the prompt has {len(p)} tokens, longer than the cache allows "
          f"({self.max_cache_len} positions, {self.gamma + 2} kept for drafting); "
          "shorten it or raise max_cache_len"
        )
      if min(p) < 0 or max(p) >= vocab:
        raise SpecjaxError(
          f"{name}: token id {max(p) if max(p) >= vocab else min(p)} is outside the vocabulary [0, {vocab})"
        )
    mode = SamplingMode.from_values(temperature, top_k, top_p)
    eos = _eos_array_X(self.target_config.stop_token_ids if eos_id is None else eos_id)
    outputs = []
    start = time.perf_counter()
    for lo in range(0, len(prompts), self.batch_size):
      outputs.append(
        self._generate_batch(
          prompts[lo : lo + self.batch_size],
          row_ids[lo : lo + self.batch_size],
          budgets[lo : lo + self.batch_size],
          temperature,
          top_k,
          top_p,
          seed,
          eos,
          mode,
          drafter_index[lo : lo + self.batch_size],
        )
      )
    wall = time.perf_counter() - start
    return DecodeResult(
      new_tokens=[t for o in outputs for t in o["new_tokens"]],
      stats=jax.tree.map(lambda *rows: np.concatenate(rows), *[o["stats"] for o in outputs]),
      target_calls=int(sum(o["target_calls"] for o in outputs)),
      drafter_calls=int(sum(o["drafter_calls"] for o in outputs)),
      wall_s=wall,
    )

  def _generate_batch(self, prompts, row_ids, budgets, temperature, top_k, top_p, seed, eos, mode, drafter_index):
    n, B = len(prompts), self.batch_size
    longest = max(len(p) for p in prompts)
    spec = self.loop_spec(longest, mode)
    P = self._bucket(longest, spec)
    prompt_BP = np.zeros((B, P), np.int32)
    lens_B = np.ones((B,), np.int32)
    for i, p in enumerate(prompts):
      prompt_BP[i, : len(p)] = p
      lens_B[i] = len(p)
    pad = B - n
    x = self._inputs(
      prompt_BP,
      lens_B,
      np.array(list(row_ids) + [0] * pad, np.int32),
      np.arange(B) < n,
      np.array(list(budgets) + [0] * pad, np.int32),
      temperature,
      top_k,
      top_p,
      seed,
      eos,
      np.array(list(drafter_index) + [0] * pad, np.int32),
    )
    if self.mesh is not None:
      x = self._place(x, jax.device_put)
    s = self._program(spec)(self.target_state, self.drafter_state, x)
    fetch = jax.device_get
    if jax.process_count() > 1:  # rows live on every host's devices: gather them to each process
      from jax.experimental import multihost_utils

      fetch = lambda tree: jax.device_get(multihost_utils.process_allgather(tree, tiled=True))
    out = fetch(
      {  # the one device-to-host transfer of the call
        "tokens": s.tokens_BN,
        "lengths": s.lengths_B,
        "stats": s.stats,
        "target_calls": s.target_calls,
        "drafter_calls": s.drafter_calls,
      }
    )
    out["new_tokens"] = [out["tokens"][i, lens_B[i] : out["lengths"][i]].tolist() for i in range(n)]
    out["stats"] = jax.tree.map(lambda a: a[:n], out["stats"])  # the prompts' rows, not the padding
    return out
