"""The Llama architecture in Flax NNX, with an explicit KV cache.

Shape suffixes: B batch, T new tokens, S cache length, D hidden, H query heads,
K key/value heads, G query heads per key/value head, E head_dim, F MLP width, V vocab.
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

from specjax.models.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, static shape, with the committed length of each row.

  Row b's entries at positions >= lengths[b] are stale (rejected drafts, padding) and are
  never attended to: every forward writes its new keys before attending, and masks by position.
  """
  k_LBSKE: jax.Array
  v_LBSKE: jax.Array
  lengths_B: jax.Array  # int32

  @classmethod
  def zeros(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or jnp.dtype(config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k_LBSKE.shape[2]


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


def apply_rope(x_BTNE: jax.Array, cos_BTE: jax.Array, sin_BTE: jax.Array) -> jax.Array:
  """Hugging Face's `rotate_half` layout: the two halves of head_dim are the pair."""
  half = x_BTNE.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNE[..., half:], x_BTNE[..., :half]], axis=-1)
  return x_BTNE * cos_BTE[:, :, None, :] + rotated * sin_BTE[:, :, None, :]


def _dense(rngs: nnx.Rngs, d_in: int, d_out: int, config: LlamaConfig) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=jnp.dtype(config.dtype),
                    param_dtype=jnp.dtype(config.param_dtype),
                    kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


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
    """kv: None for a plain causal forward, else (k_LBSKE, v_LBSKE, layer, write_positions_BT): the
    new keys/values are scattered into the stacked cache in place before attending.
    Returns (out_BTD, kv with the updated cache arrays)."""
    cfg = self.config
    B, T, _ = x_BTD.shape
    K, E = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // K
    q_BTKGE = apply_rope(self.q_proj(x_BTD).reshape(B, T, K * G, E), cos_BTE, sin_BTE).reshape(B, T, K, G, E)
    k_BTKE = apply_rope(self.k_proj(x_BTD).reshape(B, T, K, E), cos_BTE, sin_BTE)
    v_BTKE = self.v_proj(x_BTD).reshape(B, T, K, E)
    if kv is None:
      k_BSKE, v_BSKE = k_BTKE, v_BTKE
    else:
      k_LBSKE, v_LBSKE, layer, write_BT = kv
      rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
      # mode="drop": writes past the buffer (finished rows, padding) are discarded.
      k_LBSKE = k_LBSKE.at[layer, rows_BT, write_BT].set(k_BTKE.astype(k_LBSKE.dtype), mode="drop")
      v_LBSKE = v_LBSKE.at[layer, rows_BT, write_BT].set(v_BTKE.astype(v_LBSKE.dtype), mode="drop")
      k_BSKE, v_BSKE = k_LBSKE[layer], v_LBSKE[layer]
      kv = (k_LBSKE, v_LBSKE, layer, write_BT)
    scores_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE.astype(q_BTKGE.dtype),
                              preferred_element_type=jnp.float32) / math.sqrt(E)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(x_BTD.dtype)
    out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE.astype(x_BTD.dtype))
    return self.o_proj(out_BTKGE.reshape(B, T, K * G * E)), kv


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _dense(rngs, d, f, config)
    self.up_proj = _dense(rngs, d, f, config)
    self.down_proj = _dense(rngs, f, d, config)

  def __call__(self, x_BTD):
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


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
  `model(tokens_BT, cache)` writes at positions `cache.lengths_B + t` (or `positions_BT`)
  and returns `(logits_BTV, cache)` with lengths advanced by T."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
                                  param_dtype=jnp.dtype(config.param_dtype),
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
    self.lm_head = None if config.tie_word_embeddings else _dense(rngs, config.hidden_size, config.vocab_size,
                                                                   config)

  def hidden_states(self, tokens_BT, cache: KVCache | None = None, positions_BT=None):
    """Final-norm hidden states [B, T, D] and the updated cache (None without one)."""
    B, T = tokens_BT.shape
    if positions_BT is None:
      start_B = cache.lengths_B if cache is not None else jnp.zeros((B,), jnp.int32)
      positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    x_BTD = self.embed_tokens(tokens_BT)
    cos_BTE, sin_BTE = rope_cos_sin(positions_BT, self.config, x_BTD.dtype)
    if cache is None:
      mask_BTS = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    else:
      # Slot s holds position s: a query sees every slot up to its own position.
      mask_BTS = jnp.arange(cache.max_len)[None, None, :] <= positions_BT[:, :, None]
    k_LBSKE, v_LBSKE = (None, None) if cache is None else (cache.k_LBSKE, cache.v_LBSKE)
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (k_LBSKE, v_LBSKE, i, positions_BT)
      x_BTD, kv = layer(x_BTD, cos_BTE, sin_BTE, mask_BTS, kv)
      if cache is not None:
        k_LBSKE, v_LBSKE = kv[0], kv[1]
    h_BTD = self.norm(x_BTD)
    if cache is None:
      return h_BTD, None
    return h_BTD, KVCache(k_LBSKE, v_LBSKE, cache.lengths_B + T)

  def logits(self, h_BTD) -> jax.Array:
    if self.lm_head is None:
      return self.embed_tokens.attend(h_BTD).astype(jnp.float32)
    return self.lm_head(h_BTD).astype(jnp.float32)

  def __call__(self, tokens_BT, cache: KVCache | None = None, positions_BT=None):
    h_BTD, new_cache = self.hidden_states(tokens_BT, cache, positions_BT)
    logits_BTV = self.logits(h_BTD)
    return logits_BTV if cache is None else (logits_BTV, new_cache)


def init_model(config: LlamaConfig, seed: int = 0) -> Llama:
  return Llama(config, nnx.Rngs(seed))


def abstract_model(config: LlamaConfig) -> Llama:
  """The model's structure with ShapeDtypeStructs for weights: no memory, for loading into."""
  return nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
