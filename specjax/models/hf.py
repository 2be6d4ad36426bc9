"""Hugging Face checkpoints in and out: `config.json` + safetensors shards <-> a specjax Llama.

Loading maps each shard and lets every device pull only its slice of each weight
(`jax.make_array_from_callback`), so a 7B model loads straight into a mesh on a host with
less free memory than twice its size. Exported directories load in transformers'
`LlamaForCausalLM` (and so serve as `assistant_model` or as a vLLM draft model).

A checkpoint is checked by specjax before anything loads it (`check_checkpoint`; the jobs call it
before the tokenizer, which would otherwise read config.json through transformers first):
the directory exists, config.json is a JSON object whose fields have the right types, every
safetensors file is as long as its header says, and every weight the model needs is there, of a
float dtype and of the shape config.json implies. Each problem is one SpecjaxError naming the
file, and the field or tensor.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax import fileio
from specjax import sharding as shd
from specjax.errors import SpecjaxError
from specjax.models import safetensors_io
from specjax.models.config import LlamaConfig, get_preset, parse_eos_ids, read_json_object
from specjax.models.draft_vocab import draft_token_ids, load_draft_vocab, save_draft_vocab, set_draft_vocab
from specjax.models.llama import Llama, abstract_model, init_model

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "chat_template.jinja",
)


def hf_name(path: tuple) -> tuple[str, bool]:
  """Our parameter path -> (Hugging Face tensor name, whether the stored matrix is transposed)."""
  parts = [str(p) for p in path]
  transposed = parts[-1] == "kernel"
  parts[-1] = "weight"
  if parts[0] == "lm_head":
    return "lm_head.weight", transposed
  return "model." + ".".join(parts), transposed


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the shard index or the files themselves."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise SpecjaxError(f"{index}: malformed shard index ({e!r}); it needs a 'weight_map' object") from None
    for file in sorted(set(weight_map.values())):
      if not os.path.exists(os.path.join(path, file)):
        raise SpecjaxError(f"{index}: names weight file {file!r}, which is missing from {path}")
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    legacy = glob.glob(os.path.join(path, "pytorch_model*.bin"))
    hint = (
      " It has PyTorch .bin weights: convert them once with transformers "
      "(`LlamaForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)."
      if legacy
      else ""
    )
    raise SpecjaxError(
      f"{path}: no weight file (expected model.safetensors or sharded *.safetensors "
      f"with model.safetensors.index.json).{hint}"
    )
  out = {}
  for file in files:
    for name in safetensors_io.read_header(file)[0]:
      out[name] = file
  return out


def _check_weights(path: str, files: dict[str, str], weights: list[tuple[tuple, tuple]], config: LlamaConfig) -> None:
  """Every weight the model needs (parameter path, our shape), from the safetensors headers
  alone: present in the file the index names, a float dtype, the shape config.json implies."""
  headers: dict[str, dict] = {}
  for key, shape in weights:
    name, transposed = hf_name(key)
    if name not in files:
      raise SpecjaxError(
        f"{path}: weight {name!r} is missing from the checkpoint's files "
        f"({', '.join(sorted({os.path.basename(f) for f in files.values()}))})"
      )
    file = files[name]
    if file not in headers:
      headers[file] = safetensors_io.read_header(file)[0]
    if name not in headers[file]:
      raise SpecjaxError(f"{file}: the shard index places {name!r} here, but the file does not hold it")
    info = headers[file][name]
    if info["dtype"] not in safetensors_io.FLOAT_DTYPES:
      raise SpecjaxError(
        f"{file}: tensor {name!r} has dtype {info['dtype']}, but a model weight must be a float "
        f"type ({', '.join(safetensors_io.FLOAT_DTYPES)}); the file is damaged or not this model's"
      )
    expected = list(shape[::-1] if transposed else shape)
    if list(info["shape"]) != expected:
      raise SpecjaxError(
        f"{file}: weight {name!r} has shape {list(info['shape'])}, but config.json implies {expected} "
        f"(hidden_size={config.hidden_size}, intermediate_size={config.intermediate_size}, "
        f"num_attention_heads={config.num_heads}, num_key_value_heads={config.num_kv_heads}, "
        f"head_dim={config.head_dim}, vocab_size={config.vocab_size})"
      )


def check_checkpoint(spec: str | None, label: str | None = None) -> LlamaConfig | None:
  """A model spec load_model takes, checked without loading a weight: a Hugging Face directory's
  config.json (read and type-checked by specjax) and its safetensors files (sizes against their
  headers, dtypes, shapes). Returns its LlamaConfig (None for preset:NAME, a GGUF file or no
  spec). `label` says where the spec came from ("config field `target`"), for the message."""
  if not spec:
    return None
  from specjax.models import gguf  # here, not at the top: gguf.py imports this module

  if spec.startswith("preset:") or gguf.is_gguf_spec(spec) or fileio.is_remote(spec):
    return None
  where = f"{label}: " if label else ""
  if not os.path.exists(spec):
    raise SpecjaxError(
      f"{where}{spec}: no such directory; expected a Hugging Face checkpoint directory, a .gguf file, or preset:NAME"
    )
  if not os.path.isdir(spec):
    raise SpecjaxError(
      f"{where}{spec}: is a file, not a checkpoint directory (a Hugging Face checkpoint is a "
      "directory with config.json and *.safetensors)"
    )
  if not os.path.exists(os.path.join(spec, "config.json")):
    raise SpecjaxError(
      f"{where}{spec}: not a model directory (no config.json); expected a Hugging Face "
      "checkpoint directory or preset:NAME"
    )
  config = LlamaConfig.from_hf_json(os.path.join(spec, "config.json"))
  generation = os.path.join(spec, "generation_config.json")
  if os.path.exists(generation):
    parse_eos_ids(read_json_object(generation).get("eos_token_id"), generation)
  graphdef, abstract_state = nnx.split(abstract_model(config))
  _check_weights(spec, _weight_files(spec), [(k, v.shape) for k, v in nnx.to_flat_state(abstract_state)], config)
  return config


def load_hf_checkpoint(path: str, dtype: str = "float32", mesh=None) -> tuple[Llama, LlamaConfig]:
  """Reads a local Hugging Face Llama checkpoint directory into a specjax model.

  dtype: the weights' and activations' dtype ("float32", "bfloat16", "float16").
  mesh: a (data, fsdp, tensor) mesh to place weights on by the sharding rules; None = default device.
  """
  if not os.path.isdir(path):
    raise SpecjaxError(f"{path}: checkpoint directory not found")
  config = LlamaConfig.from_hf_json(os.path.join(path, "config.json"), dtype=dtype, param_dtype=dtype)
  generation = os.path.join(path, "generation_config.json")
  if os.path.exists(generation):  # its eos_token_id is what transformers' generate() stops at
    eos_ids = parse_eos_ids(read_json_object(generation).get("eos_token_id"), generation)
    if eos_ids:
      config = config.replace(eos_token_id=eos_ids[0], eos_token_ids=eos_ids if len(eos_ids) > 1 else ())
  files = _weight_files(path)
  graphdef, abstract_state = nnx.split(abstract_model(config))
  flat = nnx.to_flat_state(abstract_state)
  _check_weights(path, files, [(key, variable.shape) for key, variable in flat], config)
  mapped: dict[str, dict[str, np.ndarray]] = {}
  target_dtype = np.dtype(jnp.dtype(dtype))

  def load_one(path_key, abstract):
    name, transposed = hf_name(path_key)
    file = files[name]
    if file not in mapped:
      mapped[file] = safetensors_io.open_tensors(file)
    source = mapped[file][name]
    source = source.T if transposed else source
    if mesh is None:
      return jnp.asarray(np.asarray(source).astype(target_dtype))
    sharding = shd.logical_sharding(
      abstract.shape, shd.param_logical_axes(shd.path_str(path_key), len(abstract.shape)), mesh
    )
    return jax.make_array_from_callback(
      abstract.shape, sharding, lambda index: np.asarray(source[index]).astype(target_dtype)
    )

  loaded = [(key, variable.replace(load_one(key, variable))) for key, variable in flat]
  state = nnx.from_flat_state(loaded)
  model = nnx.merge(graphdef, state)
  set_draft_vocab(model, load_draft_vocab(path))  # a reduced-vocabulary drafter's subset, when it has one
  return model, config


def load_tokenizer(path: str):
  """The checkpoint directory's tokenizer (or a GGUF file's), through transformers, without network access."""
  from specjax.models import gguf  # here, not at the top: gguf.py imports this module

  if gguf.is_gguf_spec(path):
    return gguf.load_gguf_tokenizer(path)
  from transformers import AutoTokenizer

  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    read_json_object(os.path.join(path, "config.json"))  # transformers reads it first, and crashes on a bad one
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 (transformers and tokenizers raise many kinds for a bad directory)
    if not os.path.exists(path):  # not a directory, nor a repo id in the local Hugging Face cache
      raise SpecjaxError(
        f"{path}: no such directory (the tokenizer is read from a checkpoint directory, or config field `tokenizer`)"
      ) from None
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise SpecjaxError(f"{path}: no usable tokenizer ({reason})") from None


def target_tokenizer(tokenizer_dir: str | None, target: str):
  """The tokenizer in `tokenizer_dir`, by default the target checkpoint's own."""
  check_checkpoint(target, "config field `target`")  # its config.json read by specjax before transformers reads it
  path = tokenizer_dir or target
  if path.startswith("preset:"):
    raise SpecjaxError(
      f"target {path} has random weights and no tokenizer: set config field `tokenizer` to a directory that holds one"
    )
  return load_tokenizer(path)


def save_hf_checkpoint(
  model: Llama, config: LlamaConfig, path: str, tokenizer=None, max_shard_bytes: int = 4 << 30
) -> None:
  """Writes `config.json`, `generation_config.json` and safetensors shards (with an index when
  there are several) that transformers' LlamaForCausalLM loads with the same logits.

  tokenizer: a transformers tokenizer to save beside, or a directory to copy tokenizer files from.
  Every process must call this (weights are gathered); only process 0 writes.
  """
  state = nnx.state(model, nnx.Param)
  tensors: dict[str, np.ndarray] = {}
  for key, variable in nnx.to_flat_state(state):
    name, transposed = hf_name(key)
    value = variable[...]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      value = multihost_utils.process_allgather(value, tiled=True)
    array = np.asarray(jax.device_get(value))
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  if jax.process_index() != 0:
    return
  fileio.makedirs(path, exist_ok=True)
  with fileio.open(fileio.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_hf_dict(), f, indent=2)
  with fileio.open(fileio.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump(
      {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.to_hf_dict()["eos_token_id"],
        "pad_token_id": config.pad_token_id,
      },
      f,
      indent=2,
    )
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  for stale in fileio.glob(fileio.join(path, "*.safetensors")) + fileio.glob(fileio.join(path, "*.index.json")):
    fileio.remove(stale)
  if len(shards) == 1:
    _save_shard(shards[0], fileio.join(path, "model.safetensors"))
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _save_shard(shard, fileio.join(path, file))
      weight_map.update({name: file for name in shard})
    with fileio.open(fileio.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
      json.dump(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f, indent=2
      )
  if draft_token_ids(model) is not None:
    save_draft_vocab(path, draft_token_ids(model))
  if isinstance(tokenizer, str):
    for file in TOKENIZER_FILES:
      if fileio.exists(fileio.join(tokenizer, file)):
        fileio.copy(fileio.join(tokenizer, file), fileio.join(path, file))
  elif tokenizer is not None and not fileio.is_remote(path):
    tokenizer.save_pretrained(path)
  elif tokenizer is not None:  # transformers writes local files only: save here, then copy
    with tempfile.TemporaryDirectory() as local:
      tokenizer.save_pretrained(local)
      for file in sorted(os.listdir(local)):
        if os.path.isfile(os.path.join(local, file)):
          fileio.copy(os.path.join(local, file), fileio.join(path, file))


def _save_shard(tensors: dict[str, np.ndarray], path: str) -> None:
  """safetensors_io writes local files; a URL (gs://) gets a local temporary file copied there."""
  if not fileio.is_remote(path):
    safetensors_io.save_file(tensors, path)
    return
  with tempfile.TemporaryDirectory() as local:
    file = os.path.join(local, "shard.safetensors")
    safetensors_io.save_file(tensors, file)
    fileio.copy(file, path)


def load_model(spec: str, dtype: str = "float32", mesh=None, seed: int = 0) -> tuple[Llama, LlamaConfig]:
  """A model from a config string: a Hugging Face checkpoint directory, a GGUF file (`*.gguf`, or
  `smollm2` for the packaged SmolLM2-135M-Instruct), or `preset:NAME` (random weights, for tests and
  smoke runs)."""
  from specjax.models import gguf  # here, not at the top: gguf.py imports this module

  if gguf.is_gguf_spec(spec):
    return gguf.load_gguf_checkpoint(spec, dtype=dtype, mesh=mesh)
  if spec.startswith("preset:"):
    config = get_preset(spec[len("preset:") :]).replace(dtype=dtype, param_dtype=dtype)
    model = init_model(config, seed)
    if mesh is not None:
      shd.shard_model(model, mesh)
    return model, config
  if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "config.json")):
    return load_hf_checkpoint(spec, dtype=dtype, mesh=mesh)
  if os.path.isdir(spec):
    raise SpecjaxError(
      f"{spec}: not a model directory (no config.json); expected a Hugging Face checkpoint directory or preset:NAME"
    )
  raise SpecjaxError(
    f"model {spec!r}: no such directory; expected a Hugging Face checkpoint directory, a .gguf file, or preset:NAME"
  )
