"""Reduced-vocabulary drafters: a drafter that predicts over a subset of the target's vocabulary.

A drafter's output layer over a 49k-token vocabulary costs more per draft step than its
layers do (SmolLM2's tied 49,152 x 576 matrix is 113 MB in float32, a fifth of the whole
135M target). Scoring only the W tokens that cover the target's own outputs in one language
(FR-Spec and VocabTrim do this for one general drafter) makes a draft step several times
cheaper. The draft distribution is zero outside the subset, so verification against the
target stays exact by construction: only acceptance can change.

The subset is a `DraftVocab` variable on the drafter (`model.draft_vocab`, int32 [W], sorted)
that is not a Param, so optimisers never touch it. It is stored beside the weights as
`draft_vocab.json` (token ids plus how they were chosen) and, for SGLang's
`--speculative-token-map`, as `token_map.pt` (a torch int64 tensor; written when torch is
installed). The exported weights stay a full-vocabulary model that transformers and vLLM load.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax import fileio
from specjax.errors import SpecjaxError

DRAFT_VOCAB_FILE = "draft_vocab.json"
TOKEN_MAP_FILE = "token_map.pt"


class DraftVocab(nnx.Variable):
  """Sorted int32 token ids [W] that a reduced-vocabulary drafter scores; not trained."""


def choose_token_ids(
  responses: Iterable[Sequence[int]],
  vocab_size: int,
  coverage: float = 0.99,
  always: Sequence[int] = (),
  multiple: int = 128,
  min_size: int = 0,
) -> np.ndarray:
  """The most frequent tokens of `responses` that together make up `coverage` of all their
  tokens, plus `always` (the EOS ids), padded with the next most frequent to a multiple of
  `multiple` (whole SIMD tiles for the output matmul) and to at least `min_size` (drafters of
  one size share one compiled decoding loop). Sorted int32."""
  if not 0 < coverage <= 1:
    raise SpecjaxError(f"draft vocabulary coverage={coverage}: must be in (0, 1]")
  counts_V = np.zeros(vocab_size, np.int64)
  for ids in responses:
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise SpecjaxError(f"draft vocabulary: token id {int(ids.max())} is outside the vocabulary [0, {vocab_size})")
    np.add.at(counts_V, ids, 1)
  total = counts_V.sum()
  if total == 0:
    raise SpecjaxError("draft vocabulary: the responses hold no tokens to choose a vocabulary from")
  order_V = np.argsort(-counts_V, kind="stable")  # most frequent first, ties by id
  covered = np.cumsum(counts_V[order_V]) / total
  k = int(np.searchsorted(covered, coverage - 1e-12) + 1)
  chosen = list(dict.fromkeys([int(t) for t in always] + order_V[:k].tolist()))
  size = min(vocab_size, -(-max(len(chosen), min_size) // multiple) * multiple)
  if len(chosen) < size:
    taken = set(chosen)
    chosen += [int(t) for t in order_V if int(t) not in taken][: size - len(chosen)]
  return np.array(sorted(chosen), np.int32)


def coverage_of(token_ids: np.ndarray, responses: Iterable[Sequence[int]]) -> float:
  """The fraction of the responses' tokens that lie in token_ids (how much a drafter can propose)."""
  inside = np.zeros(int(token_ids.max()) + 1, bool)
  inside[token_ids] = True
  hit = total = 0
  for ids in responses:
    ids = np.asarray(ids, np.int64)
    total += ids.size
    hit += int(np.sum(inside[ids[ids < inside.size]]))
  return hit / total if total else 0.0


def set_draft_vocab(model, token_ids) -> None:
  """Makes `model` a reduced-vocabulary drafter over token_ids (None: the full vocabulary)."""
  if token_ids is None:
    model.draft_vocab = None
    return
  ids = np.asarray(token_ids)
  vocab = model.config.vocab_size
  if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= vocab or np.any(np.diff(ids) <= 0):
    raise SpecjaxError(
      f"draft vocabulary: expected sorted distinct token ids in [0, {vocab}), got {ids.size} ids "
      f"in [{ids.min() if ids.size else '-'}, {ids.max() if ids.size else '-'}]"
    )
  model.draft_vocab = DraftVocab(jnp.asarray(ids, jnp.int32))


def draft_token_ids(model) -> np.ndarray | None:
  vocab = getattr(model, "draft_vocab", None)
  return None if vocab is None else np.asarray(vocab[...])


def save_draft_vocab(path: str, token_ids: np.ndarray, info: dict | None = None) -> None:
  """Writes draft_vocab.json (and token_map.pt when torch is installed) into directory `path`."""

  fileio.makedirs(path, exist_ok=True)
  record = {"token_ids": [int(t) for t in token_ids], "size": int(len(token_ids)), **(info or {})}
  with fileio.open(fileio.join(path, DRAFT_VOCAB_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f)
  try:
    import torch
  except ImportError:
    return
  if not fileio.is_remote(path):
    torch.save(torch.tensor(np.asarray(token_ids, np.int64)), os.path.join(path, TOKEN_MAP_FILE))


def load_draft_vocab(path: str) -> np.ndarray | None:
  """The token ids in directory `path`'s draft_vocab.json, None when it has none."""

  file = fileio.join(path, DRAFT_VOCAB_FILE)
  if not fileio.exists(file):
    return None
  try:
    with fileio.open(file, encoding="utf-8") as f:
      ids = json.load(f)["token_ids"]
    array = np.array(ids, np.int64)
  except (ValueError, KeyError, TypeError) as e:
    raise SpecjaxError(f"{file}: malformed draft vocabulary ({e}); it needs a 'token_ids' list of integers") from None
  if array.ndim != 1:
    raise SpecjaxError(f"{file}: 'token_ids' must be a flat list of integers")
  return array.astype(np.int32)
