"""Llama-family model configuration: a frozen dataclass, named presets, and the
translation to and from Hugging Face's `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from specjax.errors import SpecjaxError

DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequency scaling: `linear` (positions divided by factor) or Llama-3's
  wavelength-dependent scaling."""

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder. Hashable, so it can be a static jit argument."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int = 1
  eos_token_id: int = 2
  eos_token_ids: tuple[int, ...] = ()  # every EOS id the checkpoint lists (Llama-3: 3); () = eos_token_id only
  pad_token_id: int = 0
  dtype: str = "float32"  # activations and matmuls
  param_dtype: str = "float32"  # stored weights

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise SpecjaxError(f"LlamaConfig.{name}={getattr(self, name)!r}: expected one of {DTYPES}")
    if self.num_heads % self.num_kv_heads:
      raise SpecjaxError(
        f"LlamaConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.rope_scaling is not None and self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
      raise SpecjaxError(
        f"LlamaConfig.rope_scaling.rope_type={self.rope_scaling.rope_type!r}: supported are {SUPPORTED_ROPE_TYPES}"
      )

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @property
  def stop_token_ids(self) -> tuple[int, ...]:
    """The ids that end generation: eos_token_id first, then the other listed ones, no repeats."""
    return tuple(dict.fromkeys((self.eos_token_id,) + tuple(self.eos_token_ids)))

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else v * d
    return v * d + self.num_layers * per_layer + d + head

  # --- Hugging Face config.json -------------------------------------------------------

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` that transformers' LlamaForCausalLM (v4 and v5) and vLLM read."""
    torch_dtype = self.param_dtype
    out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": self.max_position_embeddings,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None,
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": self.eos_token_id if len(self.stop_token_ids) == 1 else list(self.stop_token_ids),
      "pad_token_id": self.pad_token_id,
      "torch_dtype": torch_dtype,
      "dtype": torch_dtype,
      "use_cache": True,
    }
    return out

  @classmethod
  def from_hf_dict(
    cls, hf: dict[str, Any], source: str = "config.json", dtype: str | None = None, param_dtype: str | None = None
  ) -> "LlamaConfig":
    """Reads a Hugging Face Llama config; every problem names `source` and the field."""
    _check_types(hf, source)
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    model_type = hf.get("model_type", "llama")
    if model_type != "llama" or not set(archs) & set(SUPPORTED_ARCHITECTURES):
      raise SpecjaxError(
        f"{source}: architecture {archs} (model_type={model_type!r}) is not supported; "
        f"specjax supports {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama': Llama 1/2/3, "
        "Vicuna, TinyLlama and other Llama-architecture checkpoints)"
      )

    def field(name, kind=int, default=dataclasses.MISSING):
      if name not in hf or hf[name] is None:
        if default is dataclasses.MISSING:
          raise SpecjaxError(f"{source}: required field {name!r} is missing")
        return default
      value = hf[name]
      if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise SpecjaxError(
          f"{source}: field {name!r} must be a positive integer, got {value!r}"
          + (" (a string: write it without quotes)" if isinstance(value, str) else "")
        )
      if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise SpecjaxError(f"{source}: field {name!r} must be a positive number, got {value!r}")
      return kind(value)

    if hf.get("hidden_act", "silu") != "silu":
      raise SpecjaxError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (Llama uses 'silu')")
    for bias in ("attention_bias", "mlp_bias"):
      if hf.get(bias):
        raise SpecjaxError(f"{source}: {bias}=true is not supported (Llama has no biases)")
    hidden = field("hidden_size")
    heads = field("num_attention_heads")
    kv_heads = field("num_key_value_heads", default=heads)
    head_dim = field("head_dim", default=None)
    if head_dim is None:
      if hidden % heads:
        raise SpecjaxError(
          f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} and no head_dim is given"
        )
      head_dim = hidden // heads
    # transformers 5 keeps rope_theta and scaling in `rope_parameters`; v4 at the top level.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    theta = 10000.0 if theta is None else theta
    if not _number(theta) or theta <= 0:
      raise SpecjaxError(f"{source}: field 'rope_parameters.rope_theta' must be a positive number, got {theta!r}")
    rope_scaling = None
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise SpecjaxError(
        f"{source}: rope_scaling type {rope_type!r} is not supported; supported are {SUPPORTED_ROPE_TYPES}"
      )
    if rope_type != "default":
      try:
        rope_scaling = RopeScaling(
          rope_type=rope_type,
          factor=float(scaling["factor"]),
          low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
          high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
      except KeyError as e:
        raise SpecjaxError(f"{source}: rope_scaling is missing {e}") from None
      except (TypeError, ValueError):
        raise SpecjaxError(
          f"{source}: field 'rope_scaling' must hold numbers (factor, low_freq_factor, "
          f"high_freq_factor, original_max_position_embeddings), got {scaling!r}"
        ) from None
    eos_ids = parse_eos_ids(hf.get("eos_token_id"), source)
    stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    stored = stored if stored in DTYPES else "float32"
    return cls(
      vocab_size=field("vocab_size"),
      hidden_size=hidden,
      intermediate_size=field("intermediate_size"),
      num_layers=field("num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      rms_norm_eps=field("rms_norm_eps", float, 1e-6),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=field("max_position_embeddings", int, 2048),
      bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1),
      eos_token_id=eos_ids[0] if eos_ids else 2,
      eos_token_ids=eos_ids if len(eos_ids) > 1 else (),
      pad_token_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0),
      dtype=dtype or stored,
      param_dtype=param_dtype or dtype or stored,
    )

  @classmethod
  def from_hf_json(cls, path: str, **kwargs) -> "LlamaConfig":
    if not os.path.exists(path):
      raise SpecjaxError(f"{path}: file not found (a Hugging Face checkpoint directory needs config.json)")
    return cls.from_hf_dict(read_json_object(path), source=path, **kwargs)


# config.json fields besides the sizes (which from_hf_dict checks as positive integers): what
# each must be when present and not null. transformers would otherwise fail deep inside itself.
_FIELD_TYPES = {
  "architectures": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
  "model_type": ("a string", lambda v: isinstance(v, str)),
  "hidden_act": ("a string", lambda v: isinstance(v, str)),
  "rope_theta": ("a positive number", lambda v: _number(v) and v > 0),
  "rope_scaling": ("an object (or null)", lambda v: isinstance(v, dict)),
  "rope_parameters": ("an object (or null)", lambda v: isinstance(v, dict)),
  "tie_word_embeddings": ("true or false", lambda v: isinstance(v, bool)),
  "attention_bias": ("true or false", lambda v: isinstance(v, bool)),
  "mlp_bias": ("true or false", lambda v: isinstance(v, bool)),
  "bos_token_id": ("a token id (an integer >= 0)", lambda v: _integer(v) and v >= 0),
  "pad_token_id": ("a token id (an integer >= 0)", lambda v: _integer(v) and v >= 0),
  "torch_dtype": ("a string", lambda v: isinstance(v, str)),
  "dtype": ("a string", lambda v: isinstance(v, str)),
}


def _integer(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(hf: dict, source: str) -> None:
  for name, (want, ok) in _FIELD_TYPES.items():
    if hf.get(name) is not None and not ok(hf[name]):
      raise SpecjaxError(f"{source}: field {name!r} must be {want}, got {hf[name]!r}")


def read_json_object(path: str) -> dict:
  """A JSON file that must hold one object; a mistake names the file, line and column."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise SpecjaxError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise SpecjaxError(f"{path}: not UTF-8 text (byte {e.start}); a JSON file was expected") from None
  except IsADirectoryError:
    raise SpecjaxError(f"{path}: is a directory, not a JSON file") from None
  if not isinstance(value, dict):
    raise SpecjaxError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def parse_eos_ids(value, source: str = "config.json") -> tuple[int, ...]:
  """`eos_token_id` as Hugging Face writes it (an int, a list of ints, or null) -> a tuple, no repeats."""
  if value is None:
    return ()
  values = value if isinstance(value, list) else [value]
  if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
    raise SpecjaxError(f"{source}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
  return tuple(dict.fromkeys(values))


_LLAMA_7B = dict(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_layers=32,
  num_heads=32,
  num_kv_heads=32,
  head_dim=128,
)

PRESETS: dict[str, LlamaConfig] = {
  # The paper's target (Vicuna 7B v1.3) and its Llama-2 ablation.
  "vicuna-7b": LlamaConfig(**_LLAMA_7B, rms_norm_eps=1e-6, max_position_embeddings=2048),
  "llama-2-7b": LlamaConfig(**_LLAMA_7B, rms_norm_eps=1e-5, max_position_embeddings=4096),
  "llama-3-8b": LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    bos_token_id=128000,
    eos_token_id=128009,
  ),
  # The paper's drafter (double7/vicuna-68m's shape).
  "vicuna-68m": LlamaConfig(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_layers=2,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
  ),
  # Drafter-size ablation around it (same vocabulary and depth style): 41M and 133M parameters.
  "drafter-small": LlamaConfig(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=2048,
    num_layers=2,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
  ),
  "drafter-large": LlamaConfig(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=4,
    num_heads=16,
    num_kv_heads=16,
    head_dim=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
  ),
  # Test sizes: seconds to build and compile on a CPU.
  "tiny": LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
  ),
  "tiny-drafter": LlamaConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    max_position_embeddings=512,
  ),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise SpecjaxError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
