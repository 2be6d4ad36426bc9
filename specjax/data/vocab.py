"""seqio vocabularies: a Hugging Face tokenizer wrapped for seqio, and a SentencePiece one.

A drafter must produce the target's token ids, so its training data is tokenised with the
target's own tokenizer (`HFVocabulary` on the target's checkpoint directory), and
`check_vocabulary_matches_target` refuses a tokenizer that would give different ids.

BOS: `encode` adds no special tokens (seqio's contract). The decoding job feeds the target
`encode_prompt(prompt)` = [BOS] + ids(prompt); the tasks reproduce it by giving
`seqio.DecoderFeatureConverter` `bos_id=vocab.bos_id`, so every packed segment's decoder input
starts with BOS followed by ids(prompt), as at decoding time.

PAD: seqio pads with 0 unconditionally (Llama's <unk>); padded positions carry segment id 0 and
loss weight 0, so the id itself never reaches the loss.
"""

from __future__ import annotations

import threading

import numpy as np
import seqio
import tensorflow as tf

from specjax import console
from specjax.errors import SpecjaxError
from specjax.models.hf import load_tokenizer

console.hide_gpus_from_tensorflow(tf)  # every seqio part of specjax.data imports this module first

# Scripts of every language the drafters cover, so a mismatch anywhere in the vocabulary shows.
PROBE_TEXT = (
  "USER: Translate German to English: Der Zug fährt um 9:30 ab. ASSISTANT: The train leaves "
  "at 9:30. Bonjour à tous ! Привет, мир. 駅の近くに新しいパン屋。我们明天见。</s>"
)


def _text(b) -> str:
  """A numpy_function string argument: bytes in tf.data graphs, a 0-d object array eagerly."""
  return (b.item() if isinstance(b, np.ndarray) else b).decode("utf-8")


class HFVocabulary(seqio.Vocabulary):
  """A transformers tokenizer directory (local files only) as a seqio vocabulary.

  TF encode/decode call the fast tokenizer through `tf.numpy_function`, serialised by a lock
  (tf.data runs maps on several threads; transformers sets the Rust tokenizer's truncation
  and padding state on every call, which is not safe to do from two threads at once). One thread
  of tokenisation is ample for a 68M-parameter drafter's training rate.
  """

  def __init__(self, path: str):
    self._path = path
    self._tokenizer = None
    self._lock = threading.Lock()
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self._path

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = load_tokenizer(self._path)
    return self._tokenizer

  def __getstate__(self):
    return {"_path": self._path, "_extra_ids": self._extra_ids}

  def __setstate__(self, state):
    self.__dict__.update(state, _tokenizer=None, _lock=threading.Lock())

  @property
  def bos_id(self) -> int | None:
    return self.tokenizer.bos_token_id

  @property
  def eos_id(self) -> int | None:
    return self.tokenizer.eos_token_id

  @property
  def unk_id(self) -> int | None:
    return self.tokenizer.unk_token_id

  @property
  def _base_vocab_size(self) -> int:
    return len(self.tokenizer)

  def _encode(self, s: str) -> list[int]:
    with self._lock:
      return list(self.tokenizer(s, add_special_tokens=False)["input_ids"])

  def _decode(self, ids) -> str:
    with self._lock:
      return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> int32 [length]; a rank-1 string vector -> a RaggedTensor of ids."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      ids = tf.numpy_function(lambda b: np.asarray(self._encode(_text(b)), np.int32), [s], tf.int32, stateful=False)
      ids.set_shape([None])
      return ids
    if s.shape.rank == 1:
      return tf.map_fn(self._encode_tf, s, fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
    raise SpecjaxError(
      f"HFVocabulary({self._path}).encode_tf: expected a scalar or a vector of strings, got shape {s.shape}"
    )

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [length] -> scalar string; int [batch, length] -> string [batch]."""
    ids = tf.convert_to_tensor(ids)
    rank = ids.shape.rank
    if rank not in (1, 2):
      raise SpecjaxError(f"HFVocabulary({self._path}).decode_tf: expected ids of rank 1 or 2, got shape {ids.shape}")

    def decode(a):
      if a.ndim == 1:
        return np.asarray(self._decode(a).encode("utf-8"), dtype=object)
      return np.asarray([self._decode(row).encode("utf-8") for row in a], dtype=object)

    out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    out.set_shape([] if rank == 1 else ids.shape[:1])
    return out

  def __eq__(self, other) -> bool:
    if not isinstance(other, HFVocabulary):
      return False
    return self._path == other._path or (
      self.tokenizer.get_vocab() == other.tokenizer.get_vocab()
      and (self.bos_id, self.eos_id, self.unk_id) == (other.bos_id, other.eos_id, other.unk_id)
    )

  def __hash__(self) -> int:
    return hash(("HFVocabulary", self._path))

  def __str__(self) -> str:
    return f"HFVocabulary(path={self._path!r}, vocab_size={self.vocab_size})"


def sentencepiece_vocabulary(path: str) -> seqio.SentencePieceVocabulary:
  """seqio's own SentencePiece vocabulary (e.g. Llama's tokenizer.model), for targets that ship one."""
  if not tf.io.gfile.exists(path):
    raise SpecjaxError(f"{path}: SentencePiece model not found")
  return seqio.SentencePieceVocabulary(path)


def check_vocabulary_matches_target(vocab: seqio.Vocabulary, target_dir: str, probe: str = PROBE_TEXT) -> None:
  """Raises SpecjaxError unless `vocab` has the vocabulary size, EOS id and token ids of `probe`
  of the tokenizer in `target_dir`: a drafter trained on other ids would propose tokens the
  target never agrees with."""
  target = HFVocabulary(target_dir)
  if vocab.vocab_size != target.vocab_size:
    raise SpecjaxError(
      f"vocabulary {vocab} has {vocab.vocab_size} tokens but the target's tokenizer in "
      f"{target_dir} has {target.vocab_size}"
    )
  if vocab.eos_id != target.eos_id:
    raise SpecjaxError(f"vocabulary {vocab}: EOS id {vocab.eos_id}, the target's ({target_dir}) is {target.eos_id}")
  ours, theirs = list(vocab.encode(probe)), list(target.encode(probe))
  if ours != theirs:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise SpecjaxError(
      f"vocabulary {vocab} tokenises the probe text differently from the target's tokenizer in "
      f"{target_dir}: first difference at token {at} ({ours[at : at + 5]} vs {theirs[at : at + 5]})"
    )


def vocabulary_matches_target(vocab: seqio.Vocabulary, target_dir: str) -> bool:
  """True when `check_vocabulary_matches_target` passes."""
  try:
    check_vocabulary_matches_target(vocab, target_dir)
  except SpecjaxError:
    return False
  return True
