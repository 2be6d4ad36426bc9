"""Hugging Face checkpoint export/import: round trips, transformers compatibility, sharded
loading, and clear errors for bad checkpoint directories."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.errors import SpecjaxError
from specjax.models.config import PRESETS, RopeScaling
from specjax.models.hf import load_hf_checkpoint, load_model, save_hf_checkpoint
from specjax.sharding import make_mesh
from tests.helpers import flat_params, max_abs_diff, random_model, random_tokens, tiny_config, torch_logits

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def f32_model():
  return random_model(tiny_config(), seed=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, f32_model):
  """A float32 export of f32_model; tests that damage a checkpoint copy it first."""
  path = str(tmp_path_factory.mktemp("export") / "ckpt")
  save_hf_checkpoint(f32_model, f32_model.config, path)
  return path


def _copy_checkpoint(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _assert_identical(model_a, model_b):
  a, b = flat_params(model_a), flat_params(model_b)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), f"{name} differs after the round trip"


def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    hf = json.load(f)
  for key, value in changes.items():
    if value is None:
      hf.pop(key, None)
    else:
      hf[key] = value
  with open(file, "w") as f:
    json.dump(hf, f)
  return file


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_import_is_identical(tmp_path, dtype):
  config = tiny_config(
    dtype=dtype,
    param_dtype=dtype,
    rope_theta=20000.0,
    rms_norm_eps=1e-5,
    rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 64),
    bos_token_id=3,
    eos_token_id=4,
    pad_token_id=5,
  )
  model = random_model(config, seed=6)
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(model, config, path)
  assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
  loaded, loaded_config = load_hf_checkpoint(path, dtype=dtype)
  assert loaded_config == config
  _assert_identical(model, loaded)
  assert flat_params(loaded)["layers/0/self_attn/q_proj/kernel"].dtype == jnp.dtype(dtype)
  tokens = jnp.asarray(random_tokens((2, 12), config.vocab_size, 0))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(loaded(tokens)))


def test_export_import_tied(tmp_path):
  config = tiny_config(tie_word_embeddings=True)
  model = random_model(config, seed=7)
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(model, config, path)
  loaded, loaded_config = load_hf_checkpoint(path)
  assert loaded_config.tie_word_embeddings and loaded.lm_head is None
  _assert_identical(model, loaded)


@pytest.mark.parametrize("variant", ["gqa", "tied_llama3", "sharded"])
def test_export_loads_in_transformers(tmp_path, variant):
  import transformers

  overrides = {
    "gqa": {},
    "tied_llama3": dict(
      tie_word_embeddings=True, rope_theta=5000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    ),
    "sharded": {},
  }[variant]
  config = tiny_config(**overrides)
  model = random_model(config, seed=8)
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(model, config, path, max_shard_bytes=40_000 if variant == "sharded" else 4 << 30)
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == (variant == "sharded")
  torch_model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
  assert torch_model.config.num_key_value_heads == config.num_kv_heads
  assert torch_model.config.tie_word_embeddings == config.tie_word_embeddings
  if config.rope_scaling is not None:  # transformers really applies the exported scaling
    rope = getattr(torch_model.config, "rope_parameters", None) or torch_model.config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 16
  tokens = random_tokens((2, 24), config.vocab_size, 1)
  diff = max_abs_diff(torch_logits(torch_model, tokens), model(jnp.asarray(tokens)))
  print(f"\ntransformers[{variant}] max|diff|={diff:.3e}")
  assert diff <= PARITY_TOL, diff


def test_multi_shard_round_trip(tmp_path, f32_model):
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(f32_model, f32_model.config, path, max_shard_bytes=50_000)
  index_file = os.path.join(path, "model.safetensors.index.json")
  assert os.path.exists(index_file)
  assert not os.path.exists(os.path.join(path, "model.safetensors"))
  with open(index_file) as f:
    weight_map = json.load(f)["weight_map"]
  shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  assert len(shards) > 1 and set(weight_map.values()) == set(shards)
  assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
  assert "model.embed_tokens.weight" in weight_map and "lm_head.weight" in weight_map
  loaded, _ = load_hf_checkpoint(path)
  _assert_identical(f32_model, loaded)

  # Re-exporting unsharded into the same directory removes the stale shards and index.
  save_hf_checkpoint(f32_model, f32_model.config, path)
  assert sorted(f for f in os.listdir(path) if "safetensors" in f) == ["model.safetensors"]
  _assert_identical(f32_model, load_hf_checkpoint(path)[0])


def test_load_on_mesh(exported, f32_model):
  mesh = make_mesh((2, 2, 2))
  model, _ = load_hf_checkpoint(exported, mesh=mesh)
  kernel = model.layers[0].mlp.gate_proj.kernel[...]  # [embed, mlp] -> (fsdp, tensor)
  assert not kernel.sharding.is_fully_replicated
  assert kernel.sharding.mesh.shape == mesh.shape and len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.shape == (32, 64)
  embedding = model.embed_tokens.embedding[...]
  assert not embedding.sharding.is_fully_replicated
  _assert_identical(f32_model, model)  # same values, wherever they live
  tokens = jnp.asarray(random_tokens((4, 12), 256, 2))
  diff = max_abs_diff(model(tokens), f32_model(tokens))
  assert diff <= 1e-5, diff


# --- presets ----------------------------------------------------------------------------


def test_load_model_preset():
  model, config = load_model("preset:tiny")
  assert config == PRESETS["tiny"]
  logits = model(jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, config.vocab_size) and logits.dtype == jnp.float32
  _, config16 = load_model("preset:tiny-drafter", dtype="bfloat16")
  assert config16.param_dtype == "bfloat16"


def test_load_model_unknown_preset():
  with pytest.raises(SpecjaxError) as e:
    load_model("preset:nope")
  message = str(e.value)
  assert "'nope'" in message
  for name in ("tiny", "tiny-drafter", "vicuna-68m", "vicuna-7b"):
    assert repr(name) in message


def test_load_model_directory(exported, tmp_path):
  model, config = load_model(exported)
  assert config.hidden_size == 64
  with pytest.raises(SpecjaxError, match="no config.json"):
    load_model(str(tmp_path))
  with pytest.raises(SpecjaxError, match="no such directory"):
    load_model(str(tmp_path / "absent"))


# --- bad input --------------------------------------------------------------------------


def _load_error(path) -> str:
  with pytest.raises(SpecjaxError) as e:
    load_hf_checkpoint(str(path))
  return str(e.value)


def test_missing_directory(tmp_path):
  path = str(tmp_path / "no-such-checkpoint")
  message = _load_error(path)
  assert path in message and "not found" in message


def test_missing_config(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  os.remove(os.path.join(path, "config.json"))
  message = _load_error(path)
  assert os.path.join(path, "config.json") in message and "not found" in message


def test_malformed_config(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{\n  "hidden_size": 64,\n  "vocab_size": 256\n  "num_hidden_layers": 2\n}\n')
  message = _load_error(path)
  assert os.path.join(path, "config.json") in message
  assert "line 4" in message and "JSON" in message


def test_config_not_an_object(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("[1, 2]")
  message = _load_error(path)
  assert os.path.join(path, "config.json") in message and "JSON object" in message


@pytest.mark.parametrize(
  "field", ["hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
)
def test_missing_required_field(tmp_path, exported, field):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  config_file = _edit_config(path, **{field: None})
  message = _load_error(path)
  assert config_file in message and repr(field) in message and "missing" in message


def test_invalid_field_value(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  config_file = _edit_config(path, num_hidden_layers="two")
  message = _load_error(path)
  assert config_file in message and "'num_hidden_layers'" in message and "'two'" in message


def test_unsupported_architecture(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  config_file = _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  message = _load_error(path)
  assert config_file in message and "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message
  assert "not supported" in message


def test_unsupported_rope_type(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  config_file = _edit_config(path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
  message = _load_error(path)
  assert config_file in message and "'yarn'" in message and "llama3" in message


def test_missing_weight_file(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  os.remove(os.path.join(path, "model.safetensors"))
  message = _load_error(path)
  assert path in message and "model.safetensors" in message and "no weight file" in message


def test_index_names_missing_shard(tmp_path, f32_model):
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(f32_model, f32_model.config, path, max_shard_bytes=50_000)
  shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  os.remove(os.path.join(path, shards[1]))
  message = _load_error(path)
  assert os.path.join(path, "model.safetensors.index.json") in message
  assert shards[1] in message and "missing" in message


def test_missing_tensor(tmp_path, f32_model):
  """A tensor the config needs is absent from every file: the message names the tensor."""
  from specjax.models import safetensors_io

  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(f32_model, f32_model.config, path)
  file = os.path.join(path, "model.safetensors")
  tensors = {k: np.array(v) for k, v in safetensors_io.open_tensors(file).items()}
  del tensors["model.layers.1.self_attn.v_proj.weight"]
  safetensors_io.save_file(tensors, file)
  message = _load_error(path)
  assert path in message and "'model.layers.1.self_attn.v_proj.weight'" in message
  assert "model.safetensors" in message


def test_weight_shape_mismatch(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  _edit_config(path, intermediate_size=96)
  message = _load_error(path)
  assert os.path.join(path, "model.safetensors") in message
  assert re.search(r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'", message), message
  assert "intermediate_size=96" in message and "128" in message


def test_truncated_weight_file(tmp_path, exported):
  path = _copy_checkpoint(exported, tmp_path / "ckpt")
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(b"\x01\x02")
  message = _load_error(path)
  assert os.path.join(path, "model.safetensors") in message and "not a safetensors file" in message
