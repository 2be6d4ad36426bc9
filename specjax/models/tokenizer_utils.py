"""Small tokenizers and random-weight checkpoints built offline, for smoke runs and tests.

A real target brings its own tokenizer; these stand in where none can be downloaded. The
byte-level BPE covers every byte, so any text in any language encodes, and its special
tokens sit at Llama's ids (<unk>=0, <s>=1, </s>=2), so the presets' bos/eos/pad ids hold.
"""

from __future__ import annotations

import os
from typing import Iterable

from specjax.errors import SpecjaxError
from specjax.models.config import LlamaConfig, get_preset
from specjax.models.hf import save_hf_checkpoint
from specjax.models.llama import init_model

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama's tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | None = None):
  """Trains a byte-level BPE on `texts` and returns it as a transformers fast tokenizer.

  The tokenizer prepends <s> like Llama's. vocab_size is an upper bound: a small corpus may
  offer fewer merges. out_dir: where to save it (loadable by AutoTokenizer.from_pretrained).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  texts = list(texts)
  base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
  if vocab_size < base:
    raise SpecjaxError(
      f"tokenizer vocab_size={vocab_size}: a byte-level BPE needs at least {base} (256 bytes and 3 special tokens)"
    )
  if not texts:
    raise SpecjaxError("train_tokenizer: no texts to train on")
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  bpe.train_from_iterator(texts, trainer)
  bos = SPECIAL_TOKENS[1]
  bpe.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
  )
  tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=bpe, unk_token=SPECIAL_TOKENS[0], bos_token=bos, eos_token=SPECIAL_TOKENS[2]
  )
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
  return tokenizer


def make_random_checkpoint(
  out_dir: str,
  preset_or_config: str | LlamaConfig,
  texts: Iterable[str] | None = None,
  *,
  tokenizer=None,
  vocab_size: int = 512,
  seed: int = 0,
) -> LlamaConfig:
  """Writes a random-weight Hugging Face checkpoint with a tokenizer to `out_dir`.

  The model's vocabulary is resized to the tokenizer's, so every id it emits decodes.
  tokenizer: a transformers tokenizer to reuse (a drafter must share its target's);
  otherwise one is trained on `texts` with at most `vocab_size` tokens.
  Returns the written model's config.
  """

  if tokenizer is None:
    if texts is None:
      raise SpecjaxError("make_random_checkpoint: give texts to train a tokenizer on, or a tokenizer")
    tokenizer = train_tokenizer(texts, vocab_size)
  config = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
  config = config.replace(
    vocab_size=len(tokenizer),
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.unk_token_id,
  )
  save_hf_checkpoint(init_model(config, seed), config, out_dir, tokenizer=tokenizer)
  return config
