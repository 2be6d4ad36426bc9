"""Llama-family models in Flax NNX, Hugging Face import/export, presets."""

from specjax.models.config import PRESETS, LlamaConfig, RopeScaling, get_preset
from specjax.models.llama import KVCache, Llama, abstract_model, init_model
from specjax.models.hf import load_hf_checkpoint, save_hf_checkpoint, load_model
from specjax.models.gguf import load_gguf_checkpoint

__all__ = [
  "PRESETS",
  "LlamaConfig",
  "RopeScaling",
  "get_preset",
  "KVCache",
  "Llama",
  "abstract_model",
  "init_model",
  "load_hf_checkpoint",
  "save_hf_checkpoint",
  "load_model",
  "load_gguf_checkpoint",
]
