"""Parallel text (X <-> English) from the shared data folder, split as its README's table says.

Two layouts are read: the shared data folder's (its README's table of corpora, below), and a
plain one, `{lang}-en/train.{lang}` + `train.en` and `{lang}-en/eval.{lang}` + `eval.en`, which
the embedded corpus (`EMBEDDED_CORPUS`, written for this project) and users' own corpora use.

The split is the contract that keeps training data away from evaluation data: `parallel_files`
writes the README's TRAIN/EVAL table down as file pairs, and `load_pairs` also drops training
pairs whose either side occurs in the evaluation split (the README's overlap cautions: shared
newstest English halves, tatoeba-challenge vs tatoeba-laser, newstest2017/2018 zh).
"""

from __future__ import annotations

import os

from specjax.errors import SpecjaxError

LANGS = ("de", "fr", "ja", "ru", "zh")
# Original sentence pairs written for specjax (300 train + 40 held out per language), in the plain layout.
EMBEDDED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "corpus")
LANGUAGE_NAMES = {"de": "German", "fr": "French", "ja": "Japanese", "ru": "Russian", "zh": "Chinese", "en": "English"}
SPLITS = ("train", "eval")

# Tatoeba-LASER's ISO 639-3 file names.
_LASER = {"de": "deu", "fr": "fra", "ja": "jpn", "ru": "rus", "zh": "cmn"}
# tatoeba-challenge languages whose labels file must filter lines: zh holds cmn, yue, wuu, ...
_KEEP_LABEL = {"zh": "cmn"}
_MULTI30K_TESTS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")


def _newstest(lang: str, years) -> list[tuple[str, str]]:
  return [(f"wmt-newstest/{lang}-en/newstest{y}.{lang}", f"wmt-newstest/{lang}-en/newstest{y}.en") for y in years]


def _wmt_general(lang: str) -> list[tuple[str, str]]:
  d = f"wmt-general-2021-2023/{lang}-en"
  return [
    (f"{d}/newstest2021.{lang}-en.src.{lang}", f"{d}/newstest2021.{lang}-en.ref.A.en"),
    (f"{d}/generaltest2022.{lang}-en.src.{lang}", f"{d}/generaltest2022.{lang}-en.ref.A.en"),
    (f"{d}/generaltest2023.{lang}-en.src.{lang}", f"{d}/generaltest2023.{lang}-en.ref.refA.en"),
  ]


def _tatoeba_challenge(lang: str) -> list[tuple[str, str]]:
  d = f"tatoeba-challenge-test/{lang}-en"
  return [(f"{d}/tatoeba-test-v2021-08-07.{lang}", f"{d}/tatoeba-test-v2021-08-07.en")]


def _tatoeba_laser(lang: str) -> list[tuple[str, str]]:
  code = _LASER[lang]
  return [(f"tatoeba-laser-v1/tatoeba.{code}-eng.{code}", f"tatoeba-laser-v1/tatoeba.{code}-eng.eng")]


def _multi30k(lang: str, names) -> list[tuple[str, str]]:
  return [(f"multi30k/{name}.{lang}", f"multi30k/{name}.en") for name in names]


# The README's split table, row by row, in the order the files are read.
_SPLIT_TABLE = {
  "de": {
    "train": lambda: _multi30k("de", ["train"]) + _newstest("de", range(2017, 2021)),
    "eval": lambda: (
      _newstest("de", [2016]) + _wmt_general("de") + _tatoeba_laser("de") + _multi30k("de", _MULTI30K_TESTS)
    ),
  },
  "fr": {
    "train": lambda: _multi30k("fr", ["train"]) + _newstest("fr", [2012, 2013]),
    "eval": lambda: (
      _newstest("fr", [2014])
      + [("wmt-newstest/fr-en/newsdiscusstest2015.fr", "wmt-newstest/fr-en/newsdiscusstest2015.en")]
      + _tatoeba_laser("fr")
      + _multi30k("fr", _MULTI30K_TESTS)
    ),
  },
  "ru": {
    "train": lambda: _newstest("ru", range(2017, 2021)) + _tatoeba_challenge("ru"),
    "eval": lambda: _newstest("ru", [2016]) + _wmt_general("ru") + _tatoeba_laser("ru"),
  },
  "zh": {
    "train": lambda: _newstest("zh", [2017, 2019, 2020]) + _tatoeba_challenge("zh"),
    "eval": lambda: _newstest("zh", [2018]) + _wmt_general("zh") + _tatoeba_laser("zh"),
  },
  "ja": {
    "train": lambda: (
      [("coursera-ja-en/train.ja.txt", "coursera-ja-en/train.en.txt")]
      + _newstest("ja", [2020])
      + _tatoeba_challenge("ja")
    ),
    "eval": lambda: (
      _wmt_general("ja") + _tatoeba_laser("ja") + [("coursera-ja-en/test.ja.txt", "coursera-ja-en/test.en.txt")]
    ),
  },
}


def _check_lang_split(lang: str, split: str) -> None:
  if lang not in LANGS:
    raise SpecjaxError(f"language {lang!r}: expected one of {', '.join(LANGS)} (X of the X<->en pairs)")
  if split not in SPLITS:
    raise SpecjaxError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def parallel_files(data_dir: str, lang: str, split: str) -> list[tuple[str, str]]:
  """(X-side file, English file) paths of `split` for `lang`, per the README's split table.

  Every listed file must exist: a data_dir that lacks one is an incomplete copy, and silently
  training on less (or evaluating on less) would go unnoticed.
  """
  _check_lang_split(lang, split)
  plain = (os.path.join(data_dir, f"{lang}-en", f"{split}.{lang}"), os.path.join(data_dir, f"{lang}-en", f"{split}.en"))
  if os.path.isdir(os.path.join(data_dir, f"{lang}-en")) and os.path.isfile(plain[0]):
    if not os.path.isfile(plain[1]):
      raise SpecjaxError(f"{plain[1]}: missing; {plain[0]} needs its line-aligned English side")
    return [plain]
  pairs = [(os.path.join(data_dir, x), os.path.join(data_dir, en)) for x, en in _SPLIT_TABLE[lang][split]()]
  if not any(os.path.exists(p) for pair in pairs for p in pair):  # neither layout: name the plain one
    raise SpecjaxError(
      f"{plain[0]}: missing; data_dir={data_dir!r} holds neither {lang}-en/{split}.{lang} + "
      f"{split}.en nor the shared data folder's {lang}-en files (e.g. {pairs[0][0]}): add the "
      f"{lang}-en folder or point data_dir at a folder that has it"
    )
  for path in (p for pair in pairs for p in pair):
    if not os.path.isfile(path):
      raise SpecjaxError(
        f"{path}: missing; the {split} split of {lang}-en needs it (is data_dir={data_dir!r} "
        "a complete copy of the shared data folder?)"
      )
  return pairs


def _read_lines(path: str) -> list[str]:
  """Lines without their endings; invalid UTF-8 is reported with its 1-based line number."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise SpecjaxError(f"{path}: no such file") from None
  except OSError as e:
    raise SpecjaxError(f"{path}: cannot read ({e.strerror})") from None
  raw = data.split(b"\n")
  if raw and raw[-1] == b"":
    raw.pop()
  lines = []
  for i, line in enumerate(raw, 1):
    try:
      lines.append(line.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as e:
      raise SpecjaxError(
        f"{path}:{i}: invalid UTF-8 ({e.reason} at byte {e.start}); corpus files must be "
        "UTF-8 text: convert it (e.g. iconv -t UTF-8)"
      ) from None
  return lines


def read_parallel(
  x_path: str, en_path: str, labels_path: str | None = None, keep_label: str | None = None
) -> list[tuple[str, str]]:
  """Line-aligned (X, English) pairs of two files.

  labels_path/keep_label: a tatoeba-challenge labels file (one label per line, e.g. cmn_Hans)
  and the language to keep; a line is kept when its label is keep_label or keep_label_SCRIPT.
  """
  xs, ens = _read_lines(x_path), _read_lines(en_path)
  for path, lines, other in ((x_path, xs, en_path), (en_path, ens, x_path)):
    if not lines:
      raise SpecjaxError(f"{path}: empty; it must hold one sentence per line, aligned with {other}")
  if len(xs) != len(ens):
    longer = x_path if len(xs) > len(ens) else en_path
    raise SpecjaxError(
      f"{x_path} has {len(xs)} lines but {en_path} has {len(ens)}: the files are not "
      f"line-aligned ({longer}:{min(len(xs), len(ens)) + 1} has no counterpart); make line N of "
      "each the translation of the other's line N"
    )
  pairs = list(zip(xs, ens))
  if labels_path is None:
    return pairs
  if keep_label is None:
    raise SpecjaxError(f"{labels_path}: a labels file needs keep_label (the language to keep)")
  labels = _read_lines(labels_path)
  if len(labels) != len(xs):
    raise SpecjaxError(
      f"{labels_path} has {len(labels)} lines but {x_path} has {len(xs)}: the labels are not line-aligned"
    )
  return [pair for pair, label in zip(pairs, labels) if label.strip().split("_")[0] == keep_label]


def _read_pair_files(lang: str, x_path: str, en_path: str) -> list[tuple[str, str]]:
  labels = x_path + ".labels"
  if lang in _KEEP_LABEL and os.path.exists(labels):
    return read_parallel(x_path, en_path, labels, _KEEP_LABEL[lang])
  return read_parallel(x_path, en_path)


def _unique(pairs_lists) -> list[tuple[str, str]]:
  """Pairs in order, exact duplicates and pairs with an empty side dropped."""
  seen, out = set(), []
  for pairs in pairs_lists:
    for x, en in pairs:
      if x.strip() and en.strip() and (x, en) not in seen:
        seen.add((x, en))
        out.append((x, en))
  return out


def load_pairs(data_dir: str, lang: str, split: str, limit: int | None = None) -> list[tuple[str, str]]:
  """All (X, English) pairs of `split` for `lang`, in file-table then line order, deduplicated.

  For split "train", a pair is dropped when its X side or its English side occurs in the eval
  split, so neither an X->en nor an en->X model sees an evaluation sentence. limit: the first N.
  """
  _check_lang_split(lang, split)
  if limit is not None and limit < 0:
    raise SpecjaxError(f"limit={limit}: must be >= 0 (None = all)")
  pairs = _unique(_read_pair_files(lang, x, en) for x, en in parallel_files(data_dir, lang, split))
  if split == "train":
    held_out = _unique(_read_pair_files(lang, x, en) for x, en in parallel_files(data_dir, lang, "eval"))
    xs, ens = {x for x, _ in held_out}, {en for _, en in held_out}
    pairs = [(x, en) for x, en in pairs if x not in xs and en not in ens]
  return pairs if limit is None else pairs[:limit]


def translation_message(src: str, tgt: str, text: str) -> str:
  """The user message of the evaluation prompts (multilingual-specbench): no space after the colon."""
  for field, code in (("source", src), ("target", tgt)):
    if code not in LANGUAGE_NAMES:
      raise SpecjaxError(f"{field} language {code!r}: expected one of {', '.join(LANGUAGE_NAMES)}")
  return f"Translate {LANGUAGE_NAMES[src]} to {LANGUAGE_NAMES[tgt]}:{text}"
