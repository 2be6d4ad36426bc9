"""seqio tasks for drafter training: token ids, chat template, packing, mixture rates, sharding, resume."""

import json
import math

import numpy as np
import pytest

from specjax.data.parallel import LANGS, load_pairs, translation_message
from specjax.decoding.prompts import apply_template, encode_prompt
from specjax.errors import SpecjaxError
from specjax.jobs.local_assets import TEMPLATE_TEXT
from specjax.models.tokenizer_utils import train_tokenizer
from tests.test_imports import _modules_after_import

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")
from specjax.data import tasks  # noqa: E402
from specjax.data.vocab import HFVocabulary, check_vocabulary_matches_target, vocabulary_matches_target  # noqa: E402

LIMIT = 40  # pairs per language and split: every test reads a small slice
LENGTHS = {"inputs": 256, "targets": 128}
TEMPLATE = "vicuna_v1.1"


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
  """A byte-level BPE trained on a few hundred shared-data lines, tasks registered on the first
  LIMIT pairs, and self-distillation records (de->en, zh->en) in distill_data's JSONL format."""
  root = tmp_path_factory.mktemp("data_tasks")
  texts = [TEMPLATE_TEXT]
  for lang in LANGS:
    texts += [t for pair in load_pairs(shared_data, lang, "train", limit=60) for t in pair]
  tok = train_tokenizer(texts, 800, str(root / "tok"))
  workdir = root / "distill" / "data"
  workdir.mkdir(parents=True)
  records = {}
  for src in ("de", "zh"):
    rows = []
    for i, (x, en) in enumerate(load_pairs(shared_data, src, "train", limit=LIMIT)):
      prompt = translation_message(src, "en", x)
      ids = tok(en, add_special_tokens=False)["input_ids"]
      cut = i % 4 == 3  # cut off by max_new_tokens: no EOS
      other_stop = (src, i) == ("zh", 5)  # ended at another stop id (not the vocabulary's EOS)
      rows.append(
        {
          "record_id": i,
          "source_id": i,
          "source": x,
          "prompt": prompt,
          "chat_prompt": apply_template(TEMPLATE, prompt),
          "response": en,
          "response_token_ids": ids if cut or other_stop else ids + [tok.eos_token_id],
          "temperature": 0.0,
          "src_lang": src,
          "tgt_lang": "en",
        }
      )
      if src == "zh" and i % 2:  # distill_data's marker on some; others (and all of de) in the older format
        rows[-1]["truncated"] = cut
    (workdir / f"selfdistill-{src}en-00000-of-00001.jsonl").write_text(
      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    records[src] = rows
  args = dict(
    data_dir=shared_data,
    vocab_dir=str(root / "tok"),
    template=TEMPLATE,
    selfdistill_dir=str(root / "distill"),
    limit=LIMIT,
    shuffle_buffer_size=64,
  )
  tasks.register_tasks(**args)
  cut_off = {tuple(r["response_token_ids"]) for rows in records.values() for r in rows if r["record_id"] % 4 == 3}
  return {
    "tok": tok,
    "vocab": tasks.vocabulary(),
    "records": records,
    "args": args,
    "root": root,
    "data": shared_data,
    "cut_off": cut_off,
  }


def _examples(name, n, **kw):
  ds = seqio.get_mixture_or_task(name).get_dataset(
    kw.pop("lengths", LENGTHS), split=kw.pop("split", "train"), shuffle=kw.pop("shuffle", False), **kw
  )
  return list(ds.take(n).as_numpy_iterator())


# --- vocabulary ------------------------------------------------------------------------------


def test_vocabulary_wraps_the_tokenizer(setup):
  tok, vocab = setup["tok"], setup["vocab"]
  assert (vocab.vocab_size, vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (len(tok), 1, 2, 0, 0)
  text = "Der Zug fährt um 9:30 ab. 駅の近くに新しいパン屋。"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert vocab.encode(text) == ids
  assert list(vocab.encode_tf(tf.constant(text)).numpy()) == ids
  assert vocab.decode(ids) == text
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
  assert [s.decode() for s in vocab.decode_tf(tf.constant([ids, ids])).numpy()] == [text, text]
  # The decoding job's prompt ids are BOS + encode(prompt): the feature converter supplies the BOS.
  prompt = apply_template(TEMPLATE, translation_message("de", "en", text))
  assert encode_prompt(tok, prompt) == [vocab.bos_id] + vocab.encode(prompt)


def test_vocabulary_check_against_the_target(setup, tmp_path):
  vocab = setup["vocab"]
  check_vocabulary_matches_target(vocab, setup["args"]["vocab_dir"])
  train_tokenizer([TEMPLATE_TEXT, "ein ganz anderer Text"], 300, str(tmp_path / "other"))
  assert not vocabulary_matches_target(vocab, str(tmp_path / "other"))
  with pytest.raises(SpecjaxError, match="tokens but the target's tokenizer"):
    check_vocabulary_matches_target(vocab, str(tmp_path / "other"))
  assert vocab == HFVocabulary(setup["args"]["vocab_dir"])


# --- task contents ---------------------------------------------------------------------------


@pytest.mark.parametrize("src,tgt", [("ja", "en"), ("en", "fr")])
def test_translate_task_ids_and_template(setup, src, tgt):
  vocab, tok = setup["vocab"], setup["tok"]
  x = src if tgt == "en" else tgt
  pairs = load_pairs(setup["data"], x, "train", limit=3)
  for ex, (xs, en) in zip(_examples(f"translate_{src}_{tgt}", 3), pairs):
    source, reference = (xs, en) if tgt == "en" else (en, xs)
    prompt = apply_template(TEMPLATE, translation_message(src, tgt, source))
    assert vocab.decode(ex["inputs"]) == prompt
    assert [vocab.bos_id] + list(ex["inputs"]) == encode_prompt(tok, prompt)  # what the decoding job feeds
    assert ex["targets"][-1] == vocab.eos_id and vocab.eos_id not in ex["inputs"]
    assert list(ex["targets"][:-1]) == vocab.encode(reference)


def test_pretrain_task_is_text_plus_eos(setup):
  vocab = setup["vocab"]
  texts = [x for x, _ in load_pairs(setup["data"], "ru", "train", limit=3)]
  exs = _examples("pretrain_ru", 3, lengths={"targets": 512})
  assert all(set(ex) == {"targets"} for ex in exs)
  assert [vocab.decode(ex["targets"]) for ex in exs] == texts
  assert all(ex["targets"][-1] == vocab.eos_id for ex in exs)
  en = _examples("pretrain_en", 2, lengths={"targets": 512})
  assert [vocab.decode(ex["targets"]) for ex in en] == [e for _, e in load_pairs(setup["data"], "de", "train", limit=2)]


def test_selfdistill_task_uses_the_targets_token_ids(setup):
  vocab = setup["vocab"]
  for ex, record in zip(_examples("selfdistill_zh_en", 5), setup["records"]["zh"]):
    assert vocab.decode(ex["inputs"]) == record["chat_prompt"]
    assert list(ex["targets"][: len(record["response_token_ids"])]) == record["response_token_ids"]
  mixtures = {
    name: [t.name for t in seqio.get_mixture_or_task(name).tasks]
    for name in ("finetune_de_en", "finetune_fr_en", "finetune_multilingual")
  }
  assert mixtures["finetune_de_en"] == ["selfdistill_de_en"]
  assert mixtures["finetune_fr_en"] == ["translate_fr_en"]  # no self-distillation records for fr
  assert sorted(mixtures["finetune_multilingual"]) == sorted(
    ["selfdistill_de_en", "translate_fr_en", "translate_ja_en", "translate_ru_en", "selfdistill_zh_en"]
  )


def test_selfdistill_responses_cut_off_get_no_eos(setup):
  """A response that max_new_tokens cut off ends without EOS in its target: an EOS there would teach
  the drafter to stop where the target did not. The record's `truncated` field decides; records
  without it (older shards) count as cut off when their last token is not the EOS."""
  vocab = setup["vocab"]
  for src in ("de", "zh"):
    records = setup["records"][src]
    exs = _examples(f"selfdistill_{src}_en", len(records), lengths={"inputs": 2048, "targets": 512})
    assert [vocab.decode(ex["inputs"]) for ex in exs] == [r["chat_prompt"] for r in records]
    for ex, r in zip(exs, records):
      ids, cut = r["response_token_ids"], r["record_id"] % 4 == 3
      complete = ids if ids[-1] == vocab.eos_id else ids + [vocab.eos_id]
      assert list(ex["targets"]) == (ids if cut else complete), (src, r["record_id"])
  assert setup["records"]["zh"][5]["truncated"] is False  # no EOS, yet complete: the field wins


def test_prompts_longer_than_their_budget_are_dropped_not_cut(setup):
  full = _examples("translate_de_en", 100)
  budget = int(np.median([len(ex["inputs"]) for ex in full]))
  short = _examples("translate_de_en", 100, lengths={"inputs": budget, "targets": 128})
  assert 0 < len(short) < len(full)
  assert [ex["inputs"].tolist() for ex in short] == [
    ex["inputs"].tolist() for ex in full if len(ex["inputs"]) <= budget
  ]
  assert all(setup["vocab"].decode(ex["inputs"]).endswith("ASSISTANT:") for ex in short)


# --- packed batches --------------------------------------------------------------------------


def _segments(row):
  seg = row["decoder_segment_ids"]
  for s in sorted(set(seg.tolist()) - {0}):
    idx = np.flatnonzero(seg == s)
    yield idx


def test_packing_keeps_examples_apart(setup):
  vocab = setup["vocab"]
  it = tasks.get_dataset("finetune_multilingual", 512, seed=3, batch_size=4)
  batches = [next(it) for _ in range(3)]
  assert set(batches[0]) == set(tasks.BATCH_FEATURES)
  assert all(v.shape == (4, 512) for v in batches[0].values())
  packed = 0
  for batch in batches:
    for r in range(4):
      row = {k: v[r] for k, v in batch.items()}
      pad = row["decoder_segment_ids"] == 0
      assert not row["decoder_loss_weights"][pad].any() and not row["decoder_target_tokens"][pad].any()
      segments = list(_segments(row))
      packed += len(segments) > 1
      for idx in segments:
        assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
        assert np.array_equal(row["decoder_positions"][idx], np.arange(len(idx)))  # positions reset
        targets, inputs = row["decoder_target_tokens"][idx], row["decoder_input_tokens"][idx]
        assert inputs[0] == vocab.bos_id and np.array_equal(inputs[1:], targets[:-1])  # no token crosses
        w = row["decoder_loss_weights"][idx]
        n_prompt = int(np.argmax(w))
        assert n_prompt > 0 and w[n_prompt:].all() and not w[:n_prompt].any()  # prompt, then response
        # the segment's weights end at its own EOS, but for responses cut off by max_new_tokens
        assert targets[-1] == vocab.eos_id or tuple(targets[n_prompt:]) in setup["cut_off"]
        prompt = vocab.decode(targets[:n_prompt])
        assert prompt.startswith(apply_template(TEMPLATE, "")[:60]) and prompt.endswith("ASSISTANT:")
  assert packed > 0  # some rows do hold several examples


def test_pretrain_packing_weights_every_token(setup):
  batch = next(tasks.get_dataset("pretrain_multilingual", 128, seed=0, batch_size=2))
  seg = batch["decoder_segment_ids"]
  assert np.array_equal(batch["decoder_loss_weights"] > 0, seg > 0)
  starts = (batch["decoder_positions"] == 0) & (seg > 0)
  assert (batch["decoder_input_tokens"][starts] == setup["vocab"].bos_id).all()


def test_mixture_rates_are_equal(setup):
  """5 tasks at equal rates: each count ~ Binomial(n, 1/5), sd = sqrt(n p (1-p)) = 21.9 for n = 3000;
  a 4.5 sd bound fails by chance with probability < 1e-4 over all five counts, for any seed."""
  n = 3000
  names = {
    f"Translate {name} to English:": lang
    for lang, name in zip(LANGS, ("German", "French", "Japanese", "Russian", "Chinese"))
  }
  vocab = setup["vocab"]
  exs = _examples("finetune_multilingual", n, shuffle=True, seed=7, num_epochs=None)
  counts = dict.fromkeys(LANGS, 0)
  for ex in exs:
    text = vocab.decode(ex["inputs"])
    counts[next(lang for key, lang in names.items() if key in text)] += 1
  sd = math.sqrt(n * 0.2 * 0.8)
  assert all(abs(c - n / 5) <= 4.5 * sd for c in counts.values()), counts


# --- sharding, determinism and resume ---------------------------------------------------------


def test_host_shards_are_disjoint_and_cover_the_task(setup):
  def keys(shard_info=None):
    return [
      (tuple(ex["inputs"]), tuple(ex["targets"]))
      for ex in _examples("translate_ru_en", 10_000, shard_info=shard_info, lengths={"inputs": 4096, "targets": 4096})
    ]

  full = keys()
  shards = [keys(seqio.ShardInfo(index=i, num_shards=3)) for i in range(3)]
  assert len(full) == LIMIT and all(shards)
  assert sorted(k for s in shards for k in s) == sorted(full)  # disjoint (no repeats) and covering
  batch = [
    next(
      tasks.get_dataset("finetune_ru_en", 512, seed=0, batch_size=2, shard_info=seqio.ShardInfo(index=i, num_shards=2))
    )
    for i in range(2)
  ]
  assert not np.array_equal(batch[0]["decoder_target_tokens"], batch[1]["decoder_target_tokens"])


def test_resume_yields_the_same_batches(setup):
  def run(start_step, n, seed=5):
    it = tasks.get_dataset("finetune_multilingual", 512, seed=seed, batch_size=2, start_step=start_step)
    return [next(it) for _ in range(n)]

  full, resumed = run(0, 6), run(4, 2)
  for a, b in zip(full[4:], resumed):
    assert all(np.array_equal(a[k], b[k]) for k in tasks.BATCH_FEATURES)
  other = run(0, 1, seed=6)[0]
  assert not np.array_equal(other["decoder_target_tokens"], full[0]["decoder_target_tokens"])


# --- names and registration ------------------------------------------------------------------


def test_unknown_names_list_the_valid_ones(setup):
  with pytest.raises(SpecjaxError, match="translate_de_en"):
    tasks.get_dataset("translate_xx_en", 128)
  with pytest.raises(SpecjaxError, match="de, fr, ja, ru, zh, en"):
    tasks.translate_task("xx", "en")
  with pytest.raises(SpecjaxError, match="de_en"):
    tasks.finetune_mixture("de", "fr")
  with pytest.raises(SpecjaxError, match="train, eval"):
    tasks.get_dataset("translate_de_en", 128, split="validation")
  with pytest.raises(SpecjaxError, match="no 'eval' split"):
    tasks.get_dataset("finetune_de_en", 128, split="eval")


def test_register_twice_is_a_noop_and_new_args_reregister(setup):
  args = setup["args"]
  vocab = tasks.vocabulary()
  assert tasks.register_tasks(**args) == tasks.registered_names()
  assert tasks.vocabulary() is vocab
  try:
    names = tasks.register_tasks(**dict(args, template="plain", selfdistill_dir=None))
    assert "selfdistill_de_en" not in names
    ex = _examples("translate_de_en", 1)[0]
    x = load_pairs(args["data_dir"], "de", "train", limit=1)[0][0]
    assert vocab.decode(ex["inputs"]) == apply_template("plain", translation_message("de", "en", x))
  finally:
    tasks.register_tasks(**args)
  assert "selfdistill_de_en" in tasks.registered_names()


def test_data_package_loads_tensorflow_only_for_seqio_parts():
  loaded = _modules_after_import(["specjax.data", "specjax.data.parallel"])
  assert "specjax.data.parallel" in loaded and "tensorflow" not in loaded
  assert "specjax.data.tasks" not in loaded


def test_tfds_source_pins_the_newest_prepared_version(tmp_path):
  """seqio refuses an unversioned TFDS name; the newest prepared version is what tfds.load picks."""
  from specjax.data import tasks

  for version in ("1.0.0", "1.10.0", "1.2.0"):
    (tmp_path / "wmt16_translate" / "de-en" / version).mkdir(parents=True)
  (tmp_path / "wmt16_translate" / "de-en" / "downloads").mkdir()
  source = tasks._tfds_source("wmt16_translate/de-en", str(tmp_path))
  assert source.tfds_dataset.name == "wmt16_translate/de-en:1.10.0"
  with pytest.raises(SpecjaxError, match=r"'wmt14_translate/fr-en' is not prepared"):
    tasks._tfds_source("wmt14_translate/fr-en", str(tmp_path))
