"""seqio tasks and mixtures for drafter training, and the packed batch iterator the trainer reads.

Tasks need a vocabulary (the target's tokenizer) and data paths, so they are registered by
`register_tasks(...)` rather than at import time. Names:

- `pretrain_<lang>` (de, fr, ja, ru, zh, en): monolingual text, `targets` only, loss on every
  token. Local: one side of the shared data's train split; or C4 (en) / Wiki-40B (others)
  from TFDS with `pretrain_source="tfds"`.
- `translate_<src>_<tgt>` (X->en and en->X): `inputs` = the chat-templated prompt exactly as the
  decoding job renders it, `targets` = the reference translation + EOS. Local pairs, or TFDS WMT
  with `translate_source="tfds"` (de, fr, ru, zh; TFDS has no WMT set for ja, whose pairs stay local).
- `selfdistill_<src>_<tgt>`: the target's own generations (specjax.data.selfdistill records):
  `inputs` = chat_prompt, `targets` = the response's token ids + EOS, without the EOS when
  max_new_tokens cut the response off (the record's `truncated`).
- Mixtures: `pretrain_multilingual` (the six pretrain tasks), `finetune_<src>_<tgt>` (selfdistill
  when records exist for the pair, else translate), `finetune_multilingual` (finetune_<X>_en of
  the five languages). Mixtures use equal rates: each language gets the same share of steps
  however large its corpus, so a small corpus (fr) is not drowned by a large one (ja).

Splits are "train" and "eval" (specjax.data.parallel's); self-distillation data has only "train".
"""

from __future__ import annotations

import atexit
import functools
import gc
import glob
import json
import os
import re
import weakref
from typing import Mapping

import numpy as np
import seqio
import tensorflow as tf

from specjax.data.features import BATCH_FEATURES
from specjax.data.parallel import LANGS, SPLITS, load_pairs, translation_message
from specjax.data.selfdistill import read_records
from specjax.data.vocab import HFVocabulary, check_vocabulary_matches_target
from specjax.decoding.prompts import apply_template
from specjax.errors import SpecjaxError

PRETRAIN_LANGS = LANGS + ("en",)
PAIRS = tuple((x, "en") for x in LANGS) + tuple(("en", x) for x in LANGS)
SOURCES = ("local", "tfds")

# TFDS datasets named by the paper (WMT) and the usual general-text corpora.
TFDS_WMT = {
  "de": "wmt16_translate/de-en",
  "fr": "wmt14_translate/fr-en",
  "ru": "wmt16_translate/ru-en",
  "zh": "wmt19_translate/zh-en",
}
TFDS_PRETRAIN = {
  "en": "c4/en",
  "de": "wiki40b/de",
  "fr": "wiki40b/fr",
  "ja": "wiki40b/ja",
  "ru": "wiki40b/ru",
  "zh": "wiki40b/zh-cn",
}
_TFDS_SPLITS = {"train": "train", "eval": "validation"}
_MESSAGE_SLOT = "\x00MESSAGE\x00"

_STATE: dict = {"key": None, "names": [], "vocab": None, "selfdistill_dir": None, "selfdistill_pairs": ()}


def _check_lang(lang: str, valid=PRETRAIN_LANGS) -> None:
  if lang not in valid:
    raise SpecjaxError(f"language {lang!r}: expected one of {', '.join(valid)}")


def _check_pair(src: str, tgt: str) -> None:
  _check_lang(src)
  _check_lang(tgt)
  if (src, tgt) not in PAIRS:
    raise SpecjaxError(f"pair {src}->{tgt}: expected one of {', '.join(f'{a}_{b}' for a, b in PAIRS)}")


def pretrain_task(lang: str) -> str:
  _check_lang(lang)
  return f"pretrain_{lang}"


def translate_task(src: str, tgt: str) -> str:
  _check_pair(src, tgt)
  return f"translate_{src}_{tgt}"


def selfdistill_task(src: str, tgt: str) -> str:
  _check_pair(src, tgt)
  return f"selfdistill_{src}_{tgt}"


def finetune_mixture(src: str, tgt: str) -> str:
  _check_pair(src, tgt)
  return f"finetune_{src}_{tgt}"


def prompt_parts(template: str, src: str, tgt: str, tokenizer=None) -> tuple[str, str]:
  """(prefix, suffix) with apply_template(template, translation_message(src, tgt, text)) ==
  prefix + text + suffix, so TF can build prompts (TFDS sources) without Python per example.
  tokenizer: for the `hf` and `auto` templates (the tokenizer's own chat template)."""
  rendered = apply_template(template, translation_message(src, tgt, _MESSAGE_SLOT), tokenizer=tokenizer)
  parts = rendered.split(_MESSAGE_SLOT)
  if len(parts) != 2:
    raise SpecjaxError(
      f"template {template!r} does not render the user message verbatim once; "
      "translation prompts can not be built from it"
    )
  return parts[0], parts[1]


# --- sources --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _pairs(data_dir: str, lang: str, split: str, limit: int | None) -> tuple[tuple[str, str], ...]:
  return tuple(load_pairs(data_dir, lang, split, limit))


def _monolingual(data_dir: str, lang: str, split: str, limit: int | None) -> list[str]:
  """One side of the parallel files; English is the union of the five pairs' English sides."""
  if lang != "en":
    return [x for x, _ in _pairs(data_dir, lang, split, limit)]
  seen, out = set(), []
  for x in LANGS:
    for _, en in _pairs(data_dir, x, split, limit):
      if en not in seen:
        seen.add(en)
        out.append(en)
  return out


def _tfds_dir(tfds_data_dir: str | None) -> str:
  return tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _tfds_source(name: str, tfds_data_dir: str | None) -> seqio.TfdsDataSource:
  """A prepared TFDS dataset; refusing a missing one here beats TFDS trying to download it."""
  root = _tfds_dir(tfds_data_dir)
  versions = sorted(
    (
      d
      for d in (os.listdir(os.path.join(root, name)) if os.path.isdir(os.path.join(root, name)) else [])
      if re.fullmatch(r"\d+\.\d+\.\d+", d)
    ),
    key=lambda v: tuple(int(x) for x in v.split(".")),
  )
  if not versions:
    raise SpecjaxError(
      f"TFDS dataset {name!r} is not prepared in {root} (no version folder under "
      f"{os.path.join(root, name)}; set tfds_data_dir or TFDS_DATA_DIR, or use the local source)"
    )
  # seqio wants a pinned version; the newest prepared one is what tfds.load would pick.
  return seqio.TfdsDataSource(tfds_name=f"{name}:{versions[-1]}", tfds_data_dir=root, splits=_TFDS_SPLITS)


def _text_source(texts_fn, splits=SPLITS) -> seqio.FunctionDataSource:
  """In-memory texts as a seqio source; `texts_fn(split)` returns a dict of equal-length columns."""

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # the task shuffles examples with its own seed
    return tf.data.Dataset.from_tensor_slices(texts_fn(split))

  return seqio.FunctionDataSource(dataset_fn, splits=splits)


# --- preprocessors ---------------------------------------------------------------------------


def _wiki40b_text(ex):
  """Wiki-40B's structure markers (_START_ARTICLE_ etc.) become plain newlines."""
  text = tf.strings.regex_replace(ex["text"], r"_START_(ARTICLE|SECTION|PARAGRAPH)_\n", "")
  return {"targets": tf.strings.regex_replace(text, "_NEWLINE_", "\n")}


def _translation_example(src_key: str, tgt_key: str, prefix: str, suffix: str):
  def fn(ex):
    return {"inputs": tf.strings.join([prefix, ex[src_key], suffix]), "targets": ex[tgt_key]}

  return fn


def _map(fn):
  return lambda ds: ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _prompt_fits(ds, sequence_length):
  """Drops examples whose prompt exceeds the `inputs` length: a prompt cut short (losing
  "ASSISTANT:" and the source's end) would teach a context the decoding job never shows."""
  if not sequence_length or sequence_length.get("inputs") is None:
    return ds
  return ds.filter(lambda ex: tf.size(ex["inputs"]) <= sequence_length["inputs"])


def _nonempty_targets(ds):
  return ds.filter(lambda ex: tf.size(ex["targets"]) > 0)


def _append_eos_unless_truncated(ds, output_features, sequence_length=None):
  """seqio's append_eos_after_trim for responses that ended; one cut off by max_new_tokens
  (`truncated`) keeps its tokens without an EOS, which would teach the drafter to stop where
  the target did not (the pipeline's final trim still cuts it to length)."""

  def fn(ex):
    ex = dict(ex)
    truncated = ex.pop("truncated")
    with_eos = seqio.preprocessors.append_eos_after_trim_impl(dict(ex), output_features, sequence_length)  # in place
    return dict(with_eos, targets=tf.cond(truncated, lambda: ex["targets"], lambda: with_eos["targets"]))

  return _map(fn)(ds)


# --- registration ----------------------------------------------------------------------------


def _features(vocab: seqio.Vocabulary, with_inputs: bool) -> dict:
  targets = seqio.Feature(vocab, add_eos=True, dtype=tf.int32)
  if not with_inputs:
    return {"targets": targets}
  return {"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32), "targets": targets}


_TOKENIZE = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)


def _tokenize_inputs(vocab):
  """Tokenises `inputs` only (self-distillation targets are already the target's token ids)."""
  return lambda ex: dict(ex, inputs=vocab.encode_tf(ex["inputs"]))


def _selfdistill_files(selfdistill_dir: str) -> dict[tuple[str, str], list[str]]:
  """Shard files per (src, tgt), by specjax.data.selfdistill's file names, in a distill_data
  workdir, its data/ folder, or a folder of such workdirs (one per pair)."""
  if not os.path.isdir(selfdistill_dir):
    raise SpecjaxError(f"selfdistill_dir={selfdistill_dir!r}: not a directory")
  paths = sorted(
    set(
      glob.glob(os.path.join(selfdistill_dir, "selfdistill-*.jsonl"))
      + glob.glob(os.path.join(selfdistill_dir, "data", "selfdistill-*.jsonl"))
      + glob.glob(os.path.join(selfdistill_dir, "*", "data", "selfdistill-*.jsonl"))
    )
  )
  if not paths:
    raise SpecjaxError(
      f"selfdistill_dir={selfdistill_dir!r}: no selfdistill-*.jsonl shards (in it, its data/ folder, or */data/)"
    )
  files: dict[tuple[str, str], list[str]] = {}
  for path in paths:
    match = re.fullmatch(r"selfdistill-([a-z]{2})([a-z]{2})-\d+-of-\d+\.jsonl", os.path.basename(path))
    if not match or (match[1], match[2]) not in PAIRS:
      raise SpecjaxError(
        f"{path}: not a selfdistill shard name of a known pair (selfdistill-<src><tgt>-NNNNN-of-"
        f"NNNNN.jsonl with <src><tgt> one of {', '.join(a + b for a, b in PAIRS)})"
      )
    files.setdefault((match[1], match[2]), []).append(path)
  return files


def _check_generating_tokenizer(paths: list[str], vocab) -> None:
  """Refuses self-distillation data made by a target whose tokenizer is not `vocab`: its
  response ids would mean other tokens. The distill_data workdir's manifest.json names the
  target (and tokenizer) that generated the shards; data without a manifest is not checked."""

  for workdir in sorted({os.path.dirname(os.path.dirname(p)) for p in paths}):
    manifest = os.path.join(workdir, "manifest.json")
    if not os.path.exists(manifest):
      continue
    with open(manifest, encoding="utf-8") as f:
      generated_by = json.load(f).get("config", {})
    tokenizer_dir = generated_by.get("tokenizer") or generated_by.get("target")
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
      continue  # the generating checkpoint is not on this machine
    try:
      check_vocabulary_matches_target(vocab, tokenizer_dir)
    except SpecjaxError as e:
      raise SpecjaxError(
        f"{manifest}: this self-distillation data was generated with the tokenizer in "
        f"{tokenizer_dir}, which differs from the vocabulary given to register_tasks ({e})"
      ) from None


def _selfdistill_columns(paths: tuple[str, ...], src: str, tgt: str, eos_id: int | None) -> dict:
  """chat_prompt strings, the response's token ids with EOS stripped (the task appends it), and
  whether max_new_tokens cut the response off: the record's `truncated`, or for shards written
  before that field, whether the response does not end with EOS (those runs stopped only there).

  The target's own ids are used, not the response re-tokenised: the drafter must learn the
  exact ids the target emits (re-tokenising can merge differently at the prompt boundary).
  """

  prompts, ids, truncated = [], [], []
  for path in paths:
    for r in read_records(path):
      if (r["src_lang"], r["tgt_lang"]) != (src, tgt):
        raise SpecjaxError(
          f"{path}: record {r['record_id']} is {r['src_lang']}->{r['tgt_lang']}, but the file name says {src}->{tgt}"
        )
      t = list(r["response_token_ids"])
      prompts.append(r["chat_prompt"])
      ids.append(t[:-1] if t and t[-1] == eos_id else t)
      truncated.append(bool(r["truncated"]) if "truncated" in r else not (t and t[-1] == eos_id))
  return {
    "inputs": prompts,
    "targets": tf.ragged.constant(ids, dtype=tf.int32, ragged_rank=1, row_splits_dtype=tf.int64)
    if ids
    else tf.zeros([0, 0], tf.int32),
    "truncated": tf.constant(truncated, tf.bool),
  }


def register_tasks(
  data_dir: str,
  vocab_dir: str,
  template: str = "vicuna_v1.1",
  selfdistill_dir: str | None = None,
  *,
  limit: int | None = None,
  pretrain_source: str = "local",
  translate_source: str = "local",
  tfds_data_dir: str | None = None,
  shuffle_buffer_size: int = 10_000,
) -> list[str]:
  """Registers every task and mixture named in the module docstring; returns their names.

  vocab_dir: the target's tokenizer directory. limit: the first N pairs per language and split
  (tests, smoke runs). A second call with the same arguments is a no-op; with other arguments,
  the previous registrations are replaced.
  """
  for field, value in (("pretrain_source", pretrain_source), ("translate_source", translate_source)):
    if value not in SOURCES:
      raise SpecjaxError(f"{field}={value!r}: expected one of {', '.join(SOURCES)}")
  key = (
    data_dir,
    vocab_dir,
    template,
    selfdistill_dir,
    limit,
    pretrain_source,
    translate_source,
    tfds_data_dir,
    shuffle_buffer_size,
  )
  if key == _STATE["key"]:
    return list(_STATE["names"])
  for name in _STATE["names"]:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
  _STATE.update(key=None, names=[], vocab=None)
  if pretrain_source == "local" or translate_source == "local":
    if not os.path.isdir(data_dir):
      raise SpecjaxError(f"data_dir={data_dir!r}: not a directory (expected the shared data folder)")
  vocab = HFVocabulary(vocab_dir)
  vocab.tokenizer  # noqa: B018  (fail here, naming vocab_dir, not inside tf.data)
  names: list[str] = []

  # A registration that failed half-way (a bad selfdistill file, say) left its first tasks in
  # seqio's registry but not in _STATE: remove any provider of the same name before adding.
  def add_task(name, source, preprocessors, with_inputs):
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=preprocessors,
      output_features=_features(vocab, with_inputs),
      shuffle_buffer_size=shuffle_buffer_size,
    )
    names.append(name)

  for lang in PRETRAIN_LANGS:
    if pretrain_source == "tfds":
      source, pre = _tfds_source(TFDS_PRETRAIN[lang], tfds_data_dir), [_map(_wiki40b_text)]
    else:
      source = _text_source(lambda split, lang=lang: {"targets": _monolingual(data_dir, lang, split, limit)})
      pre = []
    add_task(
      pretrain_task(lang),
      source,
      pre + [_TOKENIZE, _nonempty_targets, seqio.preprocessors.append_eos_after_trim],
      False,
    )

  for src, tgt in PAIRS:
    x = src if tgt == "en" else tgt
    prefix, suffix = prompt_parts(template, src, tgt, vocab.tokenizer)
    if translate_source == "tfds" and x in TFDS_WMT:
      source, src_key, tgt_key = _tfds_source(TFDS_WMT[x], tfds_data_dir), src, tgt
    else:  # local files; with translate_source="tfds" also the pairs TFDS has no WMT set for (ja)

      def columns(split, x=x, to_en=tgt == "en"):
        pairs = _pairs(data_dir, x, split, limit)
        xs, ens = [p[0] for p in pairs], [p[1] for p in pairs]
        return {"source": xs, "target": ens} if to_en else {"source": ens, "target": xs}

      source, src_key, tgt_key = _text_source(columns), "source", "target"
    add_task(
      translate_task(src, tgt),
      source,
      [
        _map(_translation_example(src_key, tgt_key, prefix, suffix)),
        _TOKENIZE,
        _prompt_fits,
        seqio.preprocessors.append_eos_after_trim,
      ],
      True,
    )

  groups = _selfdistill_files(selfdistill_dir) if selfdistill_dir is not None else {}
  for paths in groups.values():
    _check_generating_tokenizer(paths, vocab)
  for (src, tgt), paths in sorted(groups.items()):
    columns = functools.lru_cache(maxsize=1)(
      functools.partial(_selfdistill_columns, tuple(paths), src, tgt, vocab.eos_id)
    )
    source = seqio.FunctionDataSource(
      lambda split, shuffle_files, seed=None, columns=columns: tf.data.Dataset.from_tensor_slices(columns()),
      splits=("train",),
    )
    add_task(
      selfdistill_task(src, tgt),
      source,
      [_map(_tokenize_inputs(vocab)), _prompt_fits, _nonempty_targets, _append_eos_unless_truncated],
      True,
    )

  def add_mixture(name, tasks):
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(t, 1.0) for t in tasks])
    names.append(name)

  add_mixture("pretrain_multilingual", [pretrain_task(lang) for lang in PRETRAIN_LANGS])
  for src, tgt in PAIRS:
    add_mixture(
      finetune_mixture(src, tgt), [selfdistill_task(src, tgt) if (src, tgt) in groups else translate_task(src, tgt)]
    )
  add_mixture(
    "finetune_multilingual",
    [selfdistill_task(x, "en") if (x, "en") in groups else translate_task(x, "en") for x in LANGS],
  )

  _STATE.update(key=key, names=names, vocab=vocab, selfdistill_dir=selfdistill_dir, selfdistill_pairs=tuple(groups))
  return list(names)


def check_selfdistill_for(mixture: str) -> None:
  """A `finetune_<src>_<tgt>` mixture given a selfdistill_dir must find that pair's shards in it:
  without them the mixture would quietly train on the reference translations instead."""
  selfdistill_dir = _STATE["selfdistill_dir"]
  pair = next(((a, b) for a, b in PAIRS if finetune_mixture(a, b) == mixture), None)
  if selfdistill_dir is None or pair is None or pair in _STATE["selfdistill_pairs"]:
    return
  held = ", ".join(f"{a}->{b}" for a, b in sorted(_STATE["selfdistill_pairs"]))
  raise SpecjaxError(
    f"selfdistill_dir={selfdistill_dir!r}: no {pair[0]}->{pair[1]} shards "
    f"(selfdistill-{pair[0]}{pair[1]}-*.jsonl) for mixture {mixture!r}; it holds {held}: run "
    f"distill_data with src={pair[0]},tgt={pair[1]} there, or point selfdistill_dir at its workdir"
  )


def registered_names() -> list[str]:
  return list(_STATE["names"])


def vocabulary() -> HFVocabulary:
  """The vocabulary of the current registration."""
  if _STATE["vocab"] is None:
    raise SpecjaxError("no data tasks registered: call specjax.data.register_tasks(data_dir, vocab_dir, ...) first")
  return _STATE["vocab"]


def _provider(name: str):
  if name not in _STATE["names"]:
    known = ", ".join(_STATE["names"]) or "none (call register_tasks first)"
    raise SpecjaxError(f"task or mixture {name!r} is not registered; registered: {known}")
  return seqio.get_mixture_or_task(name)


def task_feature_lengths(name: str, sequence_length: int | Mapping[str, int]) -> dict[str, int]:
  """A packed length L as seqio's per-feature lengths: `targets` L for text-only tasks; for
  prompt/response tasks `inputs` L//2 and `targets` L - L//2 (the packed row holds L tokens;
  longer prompts are dropped, longer responses cut, keeping their EOS; a budget no prompt fits
  leaves an endless training stream empty, so it never yields). A dict is passed through."""
  provider = _provider(name)
  if isinstance(sequence_length, Mapping):
    return dict(sequence_length)
  length = int(sequence_length)
  if length < 2:
    raise SpecjaxError(f"sequence_length={length}: must be at least 2")
  if "inputs" in provider.output_features:
    return {"inputs": length // 2, "targets": length - length // 2}
  return {"targets": length}


def get_tf_dataset(
  name: str,
  sequence_length: int | Mapping[str, int],
  split: str = "train",
  seed: int = 0,
  shard_info: seqio.ShardInfo | None = None,
  batch_size: int | None = 8,
  num_epochs: int | None = None,
  shuffle: bool = True,
) -> tf.data.Dataset:
  """Packed decoder-only batches of `name`: the five BATCH_FEATURES, [batch_size, L] int32.

  Order is a function of (seed, shard_info) alone. shard_info splits examples before packing,
  so hosts read disjoint examples. num_epochs None repeats forever (training). The first
  batch waits for every task's shuffle buffer (register_tasks' shuffle_buffer_size) to fill.
  """
  provider = _provider(name)
  if split not in SPLITS:
    raise SpecjaxError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
  if split not in provider.splits:
    raise SpecjaxError(f"{name} has no {split!r} split (it has {', '.join(provider.splits)})")
  bos = _STATE["vocab"].bos_id
  converter = seqio.DecoderFeatureConverter(pack=True, bos_id=0 if bos is None else bos)
  ds = seqio.get_dataset(
    provider,
    task_feature_lengths(name, sequence_length),
    converter,
    dataset_split=split,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_info=shard_info,
    seed=seed,
    batch_size=batch_size,
    verbose=False,
  )
  return ds.map(lambda ex: {k: ex[k] for k in BATCH_FEATURES})


class BatchIterator:
  """A numpy iterator over a tf.data pipeline that is closed at interpreter exit.

  A live TF iterator whose prefetch threads are inside `tf.numpy_function` (tokenisation)
  deadlocks Python's shutdown; closing every open one from an atexit hook avoids that.
  """

  _open: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()

  def __init__(self, ds: tf.data.Dataset):
    self._it = ds.as_numpy_iterator()
    BatchIterator._open.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise StopIteration
    return next(self._it)

  def close(self) -> None:
    self._it = None


@atexit.register
def _close_open_iterators() -> None:
  for it in list(BatchIterator._open):
    it.close()
  gc.collect()


def get_dataset(
  name: str,
  sequence_length: int | Mapping[str, int],
  split: str = "train",
  seed: int = 0,
  shard_info: seqio.ShardInfo | None = None,
  start_step: int = 0,
  batch_size: int = 8,
  num_epochs: int | None = None,
  shuffle: bool = True,
) -> BatchIterator:
  """A numpy iterator of packed batches (see get_tf_dataset) positioned at batch `start_step`.

  Resuming is deterministic order plus skipping: the first `start_step` batches are rebuilt
  (tokenised and packed) and dropped, so a resume costs about start_step/steps-per-second of
  the input pipeline's throughput, with no state to save beyond the step number.
  """
  if start_step < 0:
    raise SpecjaxError(f"start_step={start_step}: must be >= 0")
  ds = get_tf_dataset(name, sequence_length, split, seed, shard_info, batch_size, num_epochs, shuffle)
  return BatchIterator(ds.skip(start_step))
