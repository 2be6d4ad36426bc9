"""GGUF import: tiny files written here from random specjax models in every supported storage type,
the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loader, clear errors for
bad files, and the convert CLI's round trip to a Hugging Face directory."""

import os
import time

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax.errors import SpecjaxError
from specjax.models import convert
from specjax.models.config import RopeScaling
from specjax.models.gguf import find_smollm2_gguf, load_gguf_checkpoint, read_gguf_config, resolve_model_spec
from specjax.models.hf import load_hf_checkpoint, load_model, load_tokenizer
from specjax.models.llama import abstract_model, rope_inv_freq
from specjax.sharding import make_mesh
from tests.helpers import flat_params, max_abs_diff, random_tokens, tiny_config

Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf dequantizes these but cannot quantize them
PARITY_TOL = 1e-4  # against the dequantized weights: float32 noise only
REAL_TOL = 1e-3  # against transformers' load of the real file

# specjax parameter path -> llama.cpp tensor name, written out here rather than taken from the loader.
_GLOBAL_NAMES = {
  "embed_tokens/embedding": "token_embd.weight",
  "norm/weight": "output_norm.weight",
  "lm_head/kernel": "output.weight",
}
_LAYER_NAMES = {
  "self_attn/q_proj/kernel": "attn_q",
  "self_attn/k_proj/kernel": "attn_k",
  "self_attn/v_proj/kernel": "attn_v",
  "self_attn/o_proj/kernel": "attn_output",
  "mlp/gate_proj/kernel": "ffn_gate",
  "mlp/up_proj/kernel": "ffn_up",
  "mlp/down_proj/kernel": "ffn_down",
  "input_layernorm/weight": "attn_norm",
  "post_attention_layernorm/weight": "ffn_norm",
}
# Exactly representable in float32, so the config read back from the file equals the original.
EPS = 2.0**-17


def _gguf_name(param: str) -> str:
  if param in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[param]
  _, layer, rest = param.split("/", 2)
  return f"blk.{layer}.{_LAYER_NAMES[rest]}.weight"


def _llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's q/k row order (LlamaModel.permute)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_bytes(rows, cols, qtype, seed):
  """Valid random K-quant blocks (gguf quantizes no K type): random bytes, with the fp16 block scales
  set to small finite values so the weights are of order 0.1."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  data = np.random.RandomState(seed).randint(0, 256, (rows, cols // block, size)).astype(np.uint8)
  scales = {
    Q.Q2_K: [(size - 4, 3e-3), (size - 2, 1e-3)],
    Q.Q3_K: [(size - 2, 5e-4)],
    Q.Q4_K: [(0, 4e-4), (2, 3e-3)],
    Q.Q5_K: [(0, 2e-4), (2, 3e-3)],
    Q.Q6_K: [(size - 2, 1e-4)],
  }[qtype]
  for offset, value in scales:
    data[:, :, offset : offset + 2] = np.full(data.shape[:2], value, np.float16)[..., None].view(np.uint8)
  return data.reshape(rows, -1)


def _metadata(config, arch="llama"):
  return {
    "general.architecture": arch,
    f"{arch}.block_count": config.num_layers,
    f"{arch}.context_length": config.max_position_embeddings,
    f"{arch}.embedding_length": config.hidden_size,
    f"{arch}.feed_forward_length": config.intermediate_size,
    f"{arch}.attention.head_count": config.num_heads,
    f"{arch}.attention.head_count_kv": config.num_kv_heads,
    f"{arch}.attention.key_length": config.head_dim,
    f"{arch}.rope.dimension_count": config.head_dim,
    f"{arch}.rope.freq_base": float(config.rope_theta),
    f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
    "tokenizer.ggml.bos_token_id": config.bos_token_id,
    "tokenizer.ggml.eos_token_id": config.eos_token_id,
    "tokenizer.ggml.padding_token_id": config.pad_token_id,
  }


CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tokenizer_metadata(vocab_size):
  """A byte-level BPE vocabulary (gpt2 style, as SmolLM2's) of vocab_size tokens, ids 0-2 special."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  chars = list(bytes_to_unicode().values())
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars[: vocab_size - 4] + ["Hi"]
  return {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": tokens,
    "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (vocab_size - 3),
    "tokenizer.ggml.merges": ["H i"],
    "tokenizer.chat_template": CHAT_TEMPLATE,
  }


def write_gguf(path, model, qtype=Q.F32, metadata=None, drop=(), raw=None, extra=None, tokenizer=False, seed=0):
  """Writes `model` as llama.cpp would (q/k rows permuted, 2-D tensors in `qtype`, norms in F32).

  metadata: fields to change (None removes one); drop: tensor names to leave out; raw: name ->
  (bytes, type) stored as given; extra: name -> float32 array, more tensors. Returns {tensor name:
  the dequantized weight, Hugging Face layout}.
  """
  config = model.config
  fields = _metadata(config, (metadata or {}).get("general.architecture", "llama"))
  fields.update(_tokenizer_metadata(config.vocab_size) if tokenizer else {})
  fields.update(metadata or {})
  writer = gguf.GGUFWriter(str(path), fields.pop("general.architecture"))
  for key, value in fields.items():
    if value is None:
      continue
    if isinstance(value, str):
      writer.add_string(key, value)
    elif isinstance(value, list):
      writer.add_array(key, value)
    elif isinstance(value, float):
      writer.add_float32(key, value)
    else:
      writer.add_uint32(key, value)
  dequantized = {}
  for i, (param, value) in enumerate(sorted(flat_params(model).items())):
    name = _gguf_name(param)
    if name in drop:
      continue
    hf = np.asarray(value, np.float32)
    hf = hf.T if param.endswith("kernel") else hf  # specjax kernels are [in, out]
    stored = hf
    if name.endswith("attn_q.weight"):
      stored = _llama_cpp_permute(hf, config.num_heads)
    elif name.endswith("attn_k.weight"):
      stored = _llama_cpp_permute(hf, config.num_kv_heads)
    if name in (raw or {}):
      data, kind = raw[name]
    elif hf.ndim == 1:
      data, kind = hf, Q.F32
    elif qtype in K_QUANTS:  # the random blocks are the weight, stored in llama.cpp's q/k row order
      data, kind = _k_quant_bytes(*hf.shape, qtype, seed + i), qtype
      hf = gguf.quants.dequantize(data, kind)
      if name.endswith(("attn_q.weight", "attn_k.weight")):
        stored_rows = _llama_cpp_permute(
          np.arange(hf.shape[0]), config.num_heads if "attn_q" in name else config.num_kv_heads
        )
        hf = hf[np.argsort(stored_rows)]
    else:
      data, kind = gguf.quants.quantize(stored, qtype), qtype
      # Quantisation works row by row, so dequantizing the unpermuted matrix gives the loader's result.
      hf = gguf.quants.dequantize(gguf.quants.quantize(hf, qtype), qtype)
    writer.add_tensor(name, data, raw_dtype=kind)
    dequantized[name] = np.asarray(hf, np.float32)
  for name, value in (extra or {}).items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dequantized


def model_from(config, weights):
  """A specjax model holding `weights` ({parameter path: array, our layout}), built on the abstract model:
  no random init, so no per-shape compilation (seconds each on a 2-core machine)."""
  graphdef, state = nnx.split(abstract_model(config))
  flat = [
    (path, variable.replace(jnp.asarray(weights["/".join(str(p) for p in path)], config.param_dtype)))
    for path, variable in nnx.to_flat_state(state)
  ]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def random_model(config, seed):
  """Matrices N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), as tests.helpers.random_model, drawn in numpy."""
  rng = np.random.RandomState(seed)
  _, state = nnx.split(abstract_model(config))
  weights = {}
  for path, variable in nnx.to_flat_state(state):
    param = "/".join(str(p) for p in path)
    draw = 0.1 * rng.standard_normal(variable.shape).astype(np.float32)
    weights[param] = draw + 1 if param.endswith("weight") else draw
  return model_from(config, weights)


def reference_model(config, dequantized):
  """A specjax model holding the dequantized weights: what a correct loader must produce."""
  _, state = nnx.split(abstract_model(config))
  weights = {}
  for path, _ in nnx.to_flat_state(state):
    param = "/".join(str(p) for p in path)
    hf = dequantized[_gguf_name(param)]
    weights[param] = hf.T if param.endswith("kernel") else hf
  return model_from(config, weights)


def _config(**overrides):
  base = dict(rms_norm_eps=EPS, rope_theta=20000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  base.update(overrides)
  return tiny_config(**base)


# --- every storage type -------------------------------------------------------------------

# K-quant rows are 256-wide blocks, so their model is 256 wide; two kv heads over four query heads throughout
# except one multi-head case, which permutes k by the query-head count.
K_WIDE = dict(
  vocab_size=256, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64
)
CASES = {
  "F32": (Q.F32, {}),
  "F16_tied": (Q.F16, dict(tie_word_embeddings=True)),
  "BF16": (Q.BF16, {}),
  "Q8_0_tied_mha": (Q.Q8_0, dict(tie_word_embeddings=True, num_kv_heads=4)),
  "Q4_0": (Q.Q4_0, {}),
  "Q4_1_tied": (Q.Q4_1, dict(tie_word_embeddings=True)),
  "Q5_0": (Q.Q5_0, {}),
  "Q5_1_tied": (Q.Q5_1, dict(tie_word_embeddings=True)),
  "Q2_K_tied": (Q.Q2_K, dict(K_WIDE, tie_word_embeddings=True)),
  "Q3_K": (Q.Q3_K, K_WIDE),
  "Q4_K": (Q.Q4_K, K_WIDE),
  "Q5_K_tied": (Q.Q5_K, dict(K_WIDE, tie_word_embeddings=True)),
  "Q6_K": (Q.Q6_K, K_WIDE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_storage_types(tmp_path, case):
  qtype, overrides = CASES[case]
  config = _config(**overrides)
  model = random_model(config, seed=3)
  path = str(tmp_path / f"{case}.gguf")
  dequantized = write_gguf(path, model, qtype)
  loaded, loaded_config = load_gguf_checkpoint(path)
  assert loaded_config == config
  assert (loaded.lm_head is None) == config.tie_word_embeddings
  tokens = jnp.asarray(random_tokens((2, 16), config.vocab_size, 0))
  logits = loaded(tokens)
  diff = max_abs_diff(logits, reference_model(config, dequantized)(tokens))
  print(f"\n{case}: max|diff| vs dequantized reference={diff:.2e}, |logits|<={float(jnp.abs(logits).max()):.1f}")
  assert diff <= PARITY_TOL, diff
  if qtype == Q.F32:  # lossless: the original model itself
    assert max_abs_diff(logits, model(tokens)) <= PARITY_TOL
    for name, value in flat_params(model).items():
      np.testing.assert_array_equal(flat_params(loaded)[name], value, err_msg=name)
  else:  # lossy, so the reference above was not just the original model
    assert max_abs_diff(logits, model(tokens)) > PARITY_TOL


def test_bfloat16_load_and_load_model(tmp_path):
  config = _config()
  model = random_model(config, seed=4)
  path = str(tmp_path / "m.gguf")
  write_gguf(path, model, Q.F32)
  loaded, loaded_config = load_model(path, dtype="bfloat16")  # a .gguf path wherever a checkpoint dir goes
  assert loaded_config.dtype == loaded_config.param_dtype == "bfloat16"
  for name, value in flat_params(model).items():
    assert flat_params(loaded)[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(flat_params(loaded)[name], value.astype(jnp.bfloat16), err_msg=name)


def test_load_on_mesh(tmp_path):
  config = _config()
  model = random_model(config, seed=5)
  path = str(tmp_path / "m.gguf")
  write_gguf(path, model, Q.Q4_1)
  plain, _ = load_gguf_checkpoint(path)
  sharded, _ = load_gguf_checkpoint(path, mesh=make_mesh((2, 2, 2)))
  kernel = sharded.layers[0].self_attn.q_proj.kernel[...]  # permuted rows, split over devices
  assert not kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
  for name, value in flat_params(plain).items():
    np.testing.assert_array_equal(flat_params(sharded)[name], value, err_msg=name)


def test_metadata(tmp_path):
  config = _config(rope_scaling=RopeScaling("linear", 4.0, original_max_position_embeddings=128), pad_token_id=7)
  model = random_model(config, seed=6)
  path = str(tmp_path / "m.gguf")
  write_gguf(
    path,
    model,
    metadata={
      "llama.rope.scaling.type": "linear",
      "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 128,
    },
  )
  assert read_gguf_config(path) == config
  # Without key_length (head_dim = hidden / heads), head_count_kv (= heads) and a padding id (0).
  mha = _config(num_kv_heads=4)
  path = str(tmp_path / "mha.gguf")
  write_gguf(
    path,
    random_model(mha, seed=6),
    metadata={
      "llama.attention.key_length": None,
      "llama.attention.head_count_kv": None,
      "tokenizer.ggml.padding_token_id": None,
    },
  )
  assert read_gguf_config(path) == mha


def test_llama3_rope_freqs(tmp_path):
  """Llama-3.x files carry their rope scaling as a `rope_freqs` tensor of divisors; the config that
  reproduces them is read back."""
  scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
  config = _config(head_dim=64, num_heads=2, num_kv_heads=1, rope_theta=500000.0, rope_scaling=scaling)
  divisors = (rope_inv_freq(config.replace(rope_scaling=None)) / rope_inv_freq(config)).astype(np.float32)
  assert ((divisors > 1.01) & (divisors < 7.99)).sum() >= 2  # the test needs blended frequencies
  path = str(tmp_path / "m.gguf")
  write_gguf(path, random_model(config, seed=7), extra={"rope_freqs.weight": divisors})
  read = read_gguf_config(path)
  assert read.rope_scaling.rope_type == "llama3" and read.rope_scaling.factor == pytest.approx(8.0)
  assert read.rope_scaling.original_max_position_embeddings == 256
  np.testing.assert_allclose(rope_inv_freq(read), rope_inv_freq(config), rtol=1e-5)
  load_gguf_checkpoint(path)  # rope_freqs is not taken for a stray tensor


# --- bad files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  config = _config()
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  write_gguf(path, random_model(config, seed=8), Q.Q8_0, tokenizer=True)
  return path


def test_truncated_file(tmp_path, tiny_file):
  data = open(tiny_file, "rb").read()
  for cut in (10, 200, len(data) // 2, len(data) - 4096):
    path = str(tmp_path / f"cut{cut}.gguf")
    with open(path, "wb") as f:
      f.write(data[:cut])
    with pytest.raises(SpecjaxError, match=r"cut\d+\.gguf: truncated"):
      load_gguf_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
  path = str(tmp_path / "model.gguf")
  with open(path, "w") as f:
    f.write('{"architectures": ["LlamaForCausalLM"]}')
  for load in (load_gguf_checkpoint, load_model, load_tokenizer):
    with pytest.raises(SpecjaxError, match=r"model\.gguf: not a GGUF file"):
      load(path)
  with pytest.raises(SpecjaxError, match=r"missing\.gguf: GGUF file not found"):
    load_model(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture(tmp_path):
  path = str(tmp_path / "qwen.gguf")
  write_gguf(path, random_model(_config(), seed=9), metadata={"general.architecture": "qwen2"})
  with pytest.raises(SpecjaxError, match=r"qwen\.gguf: general.architecture is 'qwen2'"):
    load_gguf_checkpoint(path)


def test_shape_mismatch(tmp_path):
  path = str(tmp_path / "m.gguf")
  write_gguf(path, random_model(_config(), seed=10), metadata={"llama.feed_forward_length": 96})
  with pytest.raises(
    SpecjaxError,
    match=r"m\.gguf: tensor 'blk\.0\.ffn_(down|gate|up)\.weight' has shape "
    r"\[\d+, \d+\].*implies.*llama.feed_forward_length=96",
  ):
    load_gguf_checkpoint(path)


def test_missing_tensor(tmp_path):
  path = str(tmp_path / "m.gguf")
  write_gguf(path, random_model(_config(), seed=11), drop=("blk.1.ffn_up.weight",))
  with pytest.raises(SpecjaxError, match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' is missing"):
    load_gguf_checkpoint(path)


def test_unsupported_quantisation(tmp_path):
  path = str(tmp_path / "m.gguf")
  block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
  raw = {"blk.0.attn_v.weight": (np.zeros((32, 64 // block * size), np.uint8), Q.IQ4_NL)}
  write_gguf(path, random_model(_config(), seed=12), raw=raw)
  with pytest.raises(SpecjaxError, match=r"m\.gguf: tensor 'blk\.0\.attn_v\.weight' is stored as IQ4_NL"):
    load_gguf_checkpoint(path)


def test_unknown_alias_spec():
  assert resolve_model_spec("preset:tiny") == "preset:tiny"
  assert resolve_model_spec("/x/y.gguf") == "/x/y.gguf"


# --- the convert CLI ----------------------------------------------------------------------


def test_convert_round_trip(tmp_path, tiny_file, capsys):
  dst = str(tmp_path / "hf")
  assert convert.main([tiny_file, dst]) == 0
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(dst))
  source, source_config = load_gguf_checkpoint(tiny_file)
  written, written_config = load_hf_checkpoint(dst)
  assert written_config == source_config
  tokens = jnp.asarray(random_tokens((2, 16), source_config.vocab_size, 2))
  np.testing.assert_array_equal(np.asarray(written(tokens)), np.asarray(source(tokens)))
  tokenizer, original = load_tokenizer(dst), load_tokenizer(tiny_file)
  assert tokenizer.chat_template == original.chat_template == CHAT_TEMPLATE
  assert tokenizer("Hi there")["input_ids"] == original("Hi there")["input_ids"]
  assert tokenizer.eos_token == "<|im_end|>"

  capsys.readouterr()
  assert convert.main([str(tmp_path / "hf" / "config.json"), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "config.json: not a GGUF file" in err and "Traceback" not in err
  assert convert.main([tiny_file]) == 2


# --- the real file ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
  try:
    return find_smollm2_gguf()
  except SpecjaxError as e:
    pytest.skip(f"needs the SmolLM2-135M-Instruct GGUF: {e}")


def test_smollm2_matches_transformers(smollm2):
  """specjax's load of SmolLM2-135M-Instruct Q4_1 against transformers' own GGUF load, one forward."""
  import torch
  from transformers import AutoModelForCausalLM

  tokenizer = load_tokenizer("smollm2")
  assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
  start = time.perf_counter()
  model, config = load_model("smollm2")
  load_s = time.perf_counter() - start
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
    30,
    576,
    9,
    3,
    64,
  )
  assert config.tie_word_embeddings and config.vocab_size == 49152 and config.rope_theta == 1e5
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id == 2
  prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
  )
  tokens = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
  ours = np.asarray(model(jnp.asarray(tokens)))
  directory, name = os.path.split(smollm2)
  theirs_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = theirs_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  diff = max_abs_diff(ours, theirs)
  print(
    f"\nSmolLM2 Q4_1: {tokens.shape[1]} tokens, specjax load {load_s:.1f}s, max|diff| vs transformers "
    f"{diff:.2e}, |logits|<={np.abs(theirs).max():.1f}, next token {tokenizer.decode(ours[0, -1].argmax())!r}"
  )
  assert diff <= REAL_TOL, diff
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
