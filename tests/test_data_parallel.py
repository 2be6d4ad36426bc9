"""specjax.data.parallel: the README's split table, overlap removal, and errors that name the file."""

import json
import os

import pytest

from specjax.data import parallel
from specjax.errors import SpecjaxError


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


@pytest.mark.parametrize("lang", parallel.LANGS)
def test_split_files_exist_and_are_disjoint(shared_data, lang):
  train = parallel.parallel_files(shared_data, lang, "train")
  evaluation = parallel.parallel_files(shared_data, lang, "eval")
  assert train and evaluation
  assert not {x for x, _ in train} & {x for x, _ in evaluation}
  for x, en in train + evaluation:
    assert os.path.isfile(x) and os.path.isfile(en)


def test_split_table_rows(shared_data):
  def names(lang, split):
    return [os.path.relpath(x, shared_data) for x, _ in parallel.parallel_files(shared_data, lang, split)]

  assert "wmt-newstest/de-en/newstest2016.de" in names("de", "eval")
  assert "wmt-newstest/de-en/newstest2016.de" not in names("de", "train")
  assert "wmt-newstest/zh-en/newstest2018.zh" in names("zh", "eval")
  assert "wmt-newstest/zh-en/newstest2018.zh" not in names("zh", "train")
  assert "wmt-newstest/fr-en/newstest2014.fr" in names("fr", "eval")
  assert "tatoeba-challenge-test/ja-en/tatoeba-test-v2021-08-07.ja" in names("ja", "train")
  assert "coursera-ja-en/test.ja.txt" in names("ja", "eval")
  general = dict(parallel.parallel_files(shared_data, "de", "eval"))
  src = os.path.join(shared_data, "wmt-general-2021-2023/de-en/generaltest2022.de-en.src.de")
  assert general[src].endswith("generaltest2022.de-en.ref.A.en")


@pytest.mark.parametrize("lang", parallel.LANGS)
def test_train_pairs_avoid_eval_sentences(shared_data, lang):
  train = parallel.load_pairs(shared_data, lang, "train")
  evaluation = parallel.load_pairs(shared_data, lang, "eval")
  assert len(train) > 1000 and len(evaluation) > 1000
  assert len(set(train)) == len(train)
  assert not {x for x, _ in train} & {x for x, _ in evaluation}
  assert not {en for _, en in train} & {en for _, en in evaluation}
  assert parallel.load_pairs(shared_data, lang, "train", limit=5) == train[:5]


def test_zh_tatoeba_challenge_keeps_only_mandarin(shared_data):
  d = os.path.join(shared_data, "tatoeba-challenge-test/zh-en")
  x, en = os.path.join(d, "tatoeba-test-v2021-08-07.zh"), os.path.join(d, "tatoeba-test-v2021-08-07.en")
  everything = parallel.read_parallel(x, en)
  mandarin = parallel.read_parallel(x, en, x + ".labels", "cmn")
  assert 8000 < len(mandarin) < len(everything)
  with open(x + ".labels", encoding="utf-8") as f:
    labels = f.read().split()
  assert len(mandarin) == sum(label.startswith("cmn") for label in labels)
  train = set(parallel.load_pairs(shared_data, "zh", "train"))
  cantonese = {p for p, label in zip(everything, labels) if label.startswith("yue")} - set(mandarin)
  assert cantonese and not train & cantonese


def test_message_matches_the_evaluation_prompts(shared_data):
  with open(os.path.join(shared_data, "multilingual-specbench/deen_question.jsonl"), encoding="utf-8") as f:
    first = json.loads(f.readline())
  sentence = parallel.load_pairs(shared_data, "de", "eval", limit=1)[0][0]
  assert first["turns"][0] == parallel.translation_message("de", "en", sentence)
  assert parallel.translation_message("en", "ja", "Hi.") == "Translate English to Japanese:Hi."


def test_read_parallel_strips_line_endings(tmp_path):
  x = _write(tmp_path / "a.de", "eins\r\nzwei\ndrei".encode())
  en = _write(tmp_path / "a.en", b"one\ntwo\nthree\n")
  assert parallel.read_parallel(x, en) == [("eins", "one"), ("zwei", "two"), ("drei", "three")]


def test_read_parallel_errors_name_the_file(tmp_path):
  x = _write(tmp_path / "a.de", b"eins\nzwei\n")
  en = _write(tmp_path / "a.en", b"one\n")
  with pytest.raises(SpecjaxError, match=r"a\.de has 2 lines but .*a\.en has 1"):
    parallel.read_parallel(x, en)
  with pytest.raises(SpecjaxError, match=r"missing\.en: no such file"):
    parallel.read_parallel(x, str(tmp_path / "missing.en"))
  bad = _write(tmp_path / "b.en", b"one\ntw\xff\n")
  with pytest.raises(SpecjaxError, match=r"b\.en:2: invalid UTF-8"):
    parallel.read_parallel(x, bad)
  labels = _write(tmp_path / "a.de.labels", b"deu\n")
  with pytest.raises(SpecjaxError, match=r"a\.de\.labels has 1 lines"):
    parallel.read_parallel(x, _write(tmp_path / "c.en", b"one\ntwo\n"), labels, "deu")


def test_unknown_language_split_and_missing_file(tmp_path):
  with pytest.raises(SpecjaxError, match="de, fr, ja, ru, zh"):
    parallel.parallel_files(str(tmp_path), "xx", "train")
  with pytest.raises(SpecjaxError, match="split 'test'"):
    parallel.parallel_files(str(tmp_path), "de", "test")
  with pytest.raises(SpecjaxError, match=r"de-en/train\.de: missing.*multi30k/train\.de"):
    parallel.load_pairs(str(tmp_path), "de", "train")
  with pytest.raises(SpecjaxError, match="source language 'xx'"):
    parallel.translation_message("xx", "en", "text")
