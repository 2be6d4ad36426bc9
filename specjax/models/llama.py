"""The Llama architecture in Flax NNX, with an explicit KV cache.

Shape suffixes (NAMING.md has the package's one table): B batch, T new tokens, S cache slots,
D hidden, H query heads, C key/value heads, Q query heads per key/value head, M = Q*T, R = B*C,
E head_dim, Z any number of heads, V vocab, W a reduced draft vocabulary's tokens.
Parameter names follow Hugging Face's (`layers/3/self_attn/q_proj/kernel`), with kernels
stored [in, out], so import and export are a transpose.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax.models import cpu_kernels
from specjax.models.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
  """Keys [R, S, E] and values [R, E, S] of each layer, R = batch x kv_heads (row b*C + c),
  static shape, with each batch row's committed length.

  Row b's entries at positions >= lengths[b] are stale (rejected drafts, padding) and are
  never attended to: every forward writes its new keys before attending, and masks by position.
  Why this layout: one array per layer (not a stacked [L, B, S, C, E]); batch and heads merged
  so the attention dots need no reshape of the cache; the contracted dimension innermost (E
  for scores, S for outputs), as XLA's dot wants it; writes as one dynamic_update_slice per
  row. XLA then updates the cache in place and never slices, transposes or duplicates it per
  step. On CPU the copies the other layouts caused cost more than attention itself (a decode
  step over a 4096-position cache: 27 ms before, 6 ms after, 18M-parameter model).
  """

  k_RSE: tuple[jax.Array, ...]
  v_RES: tuple[jax.Array, ...]
  lengths_B: jax.Array  # int32

  @classmethod
  def zeros(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or jnp.dtype(config.dtype)
    rows, layers = batch * config.num_kv_heads, range(config.num_layers)
    return cls(
      tuple(jnp.zeros((rows, max_len, config.head_dim), dtype) for _ in layers),
      tuple(jnp.zeros((rows, config.head_dim, max_len), dtype) for _ in layers),
      jnp.zeros((batch,), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.k_RSE[0].shape[1]

  def keys(self, layer: int) -> jax.Array:
    """Layer's keys as [B, C, S, E] (for inspection and tests)."""
    rows, S, E = self.k_RSE[layer].shape
    return self.k_RSE[layer].reshape(self.lengths_B.shape[0], -1, S, E)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse rotary frequencies, computed as transformers does (float32), incl. Llama-3 scaling."""
  dim = config.head_dim
  inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # llama3: long wavelengths divided by factor, short ones kept, a smooth blend between.
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BT: jax.Array, config: LlamaConfig, dtype) -> tuple[jax.Array, jax.Array]:
  inv_freq = jnp.asarray(rope_inv_freq(config))
  freqs_BTe = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  angles_BTE = jnp.concatenate([freqs_BTe, freqs_BTe], axis=-1)
  return jnp.cos(angles_BTE).astype(dtype), jnp.sin(angles_BTE).astype(dtype)


def apply_rope(x_BTZE: jax.Array, cos_BTE: jax.Array, sin_BTE: jax.Array) -> jax.Array:
  """Hugging Face's `rotate_half` layout: the two halves of head_dim are the pair."""
  half = x_BTZE.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTZE[..., half:], x_BTZE[..., :half]], axis=-1)
  return x_BTZE * cos_BTE[:, :, None, :] + rotated * sin_BTE[:, :, None, :]


# Up to this many batch rows, cache writes are one dynamic_update_slice per row; above it, one scatter.
MAX_ROWS_FOR_SLICE_WRITES = 16


def write_rows(cache_R__: jax.Array, new_R__: jax.Array, start_B: jax.Array, axis: int) -> jax.Array:
  """Writes each batch row's block of cache rows at its own start along `axis` (positions).

  Small batches (decoding): one in-place dynamic_update_slice per batch row; a scatter would
  lower, on CPU, to a select over the whole buffer every step. A write that would run past the
  end is shifted back to fit; only finished rows ever ask for that. Large batches (sampling
  tests, data generation): one scatter (past-the-end writes dropped), whose full pass costs
  about what attention's read of the cache does, instead of thousands of unrolled updates.
  """
  new_R__ = new_R__.astype(cache_R__.dtype)
  batch = start_B.shape[0]
  rows_per = cache_R__.shape[0] // batch
  if batch <= MAX_ROWS_FOR_SLICE_WRITES:
    zero = jnp.zeros((), jnp.int32)
    for b in range(batch):
      index = [jnp.int32(b * rows_per), zero, zero]
      index[axis] = start_B[b].astype(jnp.int32)
      cache_R__ = jax.lax.dynamic_update_slice(cache_R__, new_R__[b * rows_per : (b + 1) * rows_per], index)
    return cache_R__
  T = new_R__.shape[axis]
  rows_RT = jnp.broadcast_to(jnp.arange(cache_R__.shape[0])[:, None], (cache_R__.shape[0], T))
  pos_RT = jnp.repeat(start_B, rows_per)[:, None] + jnp.arange(T)[None]
  if axis == 1:  # [R, S, E] <- [R, T, E]
    return cache_R__.at[rows_RT, pos_RT].set(new_R__, mode="drop")
  return cache_R__.at[rows_RT, :, pos_RT].set(new_R__.transpose(0, 2, 1), mode="drop")  # [R, E, S]


def _dense(rngs: nnx.Rngs, d_in: int, d_out: int, config: LlamaConfig) -> nnx.Linear:
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=False,
    dtype=jnp.dtype(config.dtype),
    param_dtype=jnp.dtype(config.param_dtype),
    kernel_init=nnx.initializers.normal(0.02),
    rngs=rngs,
  )


def _project(linear: nnx.Linear, x_ZI):
  """linear(x), through specjax's few-row CPU kernel while the decoding loop enables it."""
  w_IJ = linear.kernel[...]
  if cpu_kernels.applies(x_ZI, w_IJ):
    return cpu_kernels.dense(x_ZI, w_IJ)
  return linear(x_ZI)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, config: LlamaConfig):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(config.param_dtype)))
    self.eps = eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    # Hugging Face's order: normalise in float32, cast back, then scale.
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x_BTD.dtype) * x32.astype(x_BTD.dtype)


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    d, e = config.hidden_size, config.head_dim
    self.q_proj = _dense(rngs, d, config.num_heads * e, config)
    self.k_proj = _dense(rngs, d, config.num_kv_heads * e, config)
    self.v_proj = _dense(rngs, d, config.num_kv_heads * e, config)
    self.o_proj = _dense(rngs, config.num_heads * e, d, config)

  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, kv=None):
    """kv: None for a plain causal forward, else (k_RSE, v_RES, start_B): the new keys/values
    go to positions start_B[b] .. start_B[b]+T-1 of this layer's cache before attending.
    Returns (out_BTD, kv with the updated cache arrays). R = B*C (a row per batch row and key/value head), M = Q*T (that head's query rows)."""
    cfg = self.config
    B, T, _ = x_BTD.shape
    C, E = cfg.num_kv_heads, cfg.head_dim
    Q = cfg.num_heads // C
    q_BTCQE = apply_rope(_project(self.q_proj, x_BTD).reshape(B, T, C * Q, E), cos_BTE, sin_BTE).reshape(B, T, C, Q, E)
    k_BTCE = apply_rope(_project(self.k_proj, x_BTD).reshape(B, T, C, E), cos_BTE, sin_BTE)
    v_BTCE = _project(self.v_proj, x_BTD).reshape(B, T, C, E)
    new_k_RTE = k_BTCE.transpose(0, 2, 1, 3).reshape(B * C, T, E)
    new_v_RET = v_BTCE.transpose(0, 2, 3, 1).reshape(B * C, E, T)
    if kv is None:
      k_RSE, v_RES = new_k_RTE, new_v_RET
    else:
      k_RSE, v_RES, start_B = kv
      k_RSE = write_rows(k_RSE, new_k_RTE, start_B, axis=1)
      v_RES = write_rows(v_RES, new_v_RET, start_B, axis=2)
      kv = (k_RSE, v_RES, start_B)
    S = k_RSE.shape[1]
    q_RME = q_BTCQE.transpose(0, 2, 3, 1, 4).reshape(B * C, Q * T, E)
    if kv is not None and cpu_kernels.applies_to_attention(q_RME, k_RSE, v_RES):
      # A cached forward's mask is a prefix (slot s holds position s): pass its length.
      visible_BCQT = jnp.broadcast_to(jnp.sum(mask_BTS, axis=-1, dtype=jnp.int32)[:, None, None], (B, C, Q, T))
      out_RME = cpu_kernels.attend_cache(q_RME, k_RSE, v_RES, visible_BCQT.reshape(B * C, Q * T), math.sqrt(E))
      out_BTCQE = out_RME.reshape(B, C, Q, T, E).transpose(0, 3, 1, 2, 4)
      return _project(self.o_proj, out_BTCQE.reshape(B, T, C * Q * E)), kv
    scores_RMS = jnp.einsum(
      "rme,rse->rms", q_RME, k_RSE.astype(q_RME.dtype), preferred_element_type=jnp.float32
    ) / math.sqrt(E)
    mask_RMS = jnp.broadcast_to(mask_BTS[:, None, None], (B, C, Q, T, S)).reshape(B * C, Q * T, S)
    scores_RMS = jnp.where(mask_RMS, scores_RMS, jnp.finfo(jnp.float32).min)
    probs_RMS = jax.nn.softmax(scores_RMS, axis=-1).astype(x_BTD.dtype)
    out_RME = jnp.einsum("rms,res->rme", probs_RMS, v_RES.astype(x_BTD.dtype))
    out_BTCQE = out_RME.reshape(B, C, Q, T, E).transpose(0, 3, 1, 2, 4)
    return _project(self.o_proj, out_BTCQE.reshape(B, T, C * Q * E)), kv


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _dense(rngs, d, f, config)
    self.up_proj = _dense(rngs, d, f, config)
    self.down_proj = _dense(rngs, f, d, config)

  def __call__(self, x_BTD):
    return _project(self.down_proj, jax.nn.silu(_project(self.gate_proj, x_BTD)) * _project(self.up_proj, x_BTD))


class DecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.self_attn = Attention(config, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.mlp = MLP(config, rngs)

  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, kv=None):
    attn_BTD, new_kv = self.self_attn(self.input_layernorm(x_BTD), cos_BTE, sin_BTE, mask_BTS, kv)
    x_BTD = x_BTD + attn_BTD
    return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), new_kv


class Llama(nnx.Module):
  """Llama decoder. `model(tokens_BT)` is a plain causal forward returning float32 logits;
  `model(tokens_BT, cache)` writes at positions `cache.lengths_B + t` (or `positions_BT`,
  which must be consecutive in each row) and returns `(logits_BTV, cache)` with lengths
  advanced by T."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
      config.vocab_size,
      config.hidden_size,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      embedding_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.lm_head = None if config.tie_word_embeddings else _dense(rngs, config.hidden_size, config.vocab_size, config)

  def hidden_states(self, tokens_BT, cache: KVCache | None = None, positions_BT=None, segment_ids_BT=None):
    """Final-norm hidden states [B, T, D] and the updated cache (None without one).

    segment_ids_BT (no cache only): packed rows, as seqio packs them; a token attends only to
    earlier tokens of its own segment, and positions_BT restart at 0 with each segment."""
    B, T = tokens_BT.shape
    if positions_BT is None:
      start_B = cache.lengths_B if cache is not None else jnp.zeros((B,), jnp.int32)
      positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    x_BTD = self.embed_tokens(tokens_BT)
    cos_BTE, sin_BTE = rope_cos_sin(positions_BT, self.config, x_BTD.dtype)
    if cache is None:
      mask_BTS = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
      if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    elif segment_ids_BT is not None:
      raise ValueError("segment_ids_BT is for the cache-free (training) forward only")
    else:
      # Slot s holds position s: a query sees every slot up to its own position.
      mask_BTS = jnp.arange(cache.max_len)[None, None, :] <= positions_BT[:, :, None]
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k_RSE[i], cache.v_RES[i], positions_BT[:, 0])
      x_BTD, kv = layer(x_BTD, cos_BTE, sin_BTE, mask_BTS, kv)
      if cache is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    h_BTD = self.norm(x_BTD)
    if cache is None:
      return h_BTD, None
    return h_BTD, KVCache(tuple(new_k), tuple(new_v), cache.lengths_B + T)

  def head_DW(self, token_ids_W: jax.Array) -> jax.Array:
    """The output layer's columns for tokens token_ids_W, [D, W] ([in, out], as XLA's dot wants):
    a reduced-vocabulary drafter scores only these (see specjax.models.draft_vocab)."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...][token_ids_W].T
    return self.lm_head.kernel[...][:, token_ids_W]

  def logits(self, h_BTD) -> jax.Array:
    if self.lm_head is None:
      embedding_VD = self.embed_tokens.embedding[...]
      if cpu_kernels.applies(h_BTD, embedding_VD, cpu_kernels.MAX_ROWS_TIED):
        return cpu_kernels.attend(h_BTD, embedding_VD)
      return self.embed_tokens.attend(h_BTD).astype(jnp.float32)
    return _project(self.lm_head, h_BTD).astype(jnp.float32)

  def __call__(self, tokens_BT, cache: KVCache | None = None, positions_BT=None, segment_ids_BT=None):
    h_BTD, new_cache = self.hidden_states(tokens_BT, cache, positions_BT, segment_ids_BT)
    logits_BTV = self.logits(h_BTD)
    return logits_BTV if cache is None else (logits_BTV, new_cache)


def init_model(config: LlamaConfig, seed: int = 0) -> Llama:
  return Llama(config, nnx.Rngs(seed))


def abstract_model(config: LlamaConfig) -> Llama:
  """The model's structure with ShapeDtypeStructs for weights: no memory, for loading into."""
  return nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
