"""Offline stand-ins for `runlocal` configs: a few sentences in several languages, a Spec-Bench
question file made from them, and tiny random-weight checkpoints whose tokenizer is trained on
them. A runlocal run then needs no network, no downloaded model and no data folder.

Every function is a no-op when its output exists, so a second run reuses what the first built.
"""

from __future__ import annotations

import json
import os

import jax

from specjax.data.parallel import EMBEDDED_CORPUS, LANGS, load_pairs
from specjax.errors import SpecjaxError
from specjax.models.hf import load_tokenizer
from specjax.models.tokenizer_utils import make_random_checkpoint, train_tokenizer

# The presets of the checkpoints that runlocal configs build, per role.
LOCAL_PRESETS = {"target": "tiny", "drafter": "tiny-drafter"}

# Written for this file: everyday sentences, (language category, source language, text).
SENTENCES = (
  ("deen", "German", "Der Zug nach Hamburg fährt heute zehn Minuten später ab."),
  ("deen", "German", "Meine Großmutter backt jeden Sonntag einen Apfelkuchen für die ganze Familie."),
  ("fren", "French", "La bibliothèque du quartier ouvre ses portes à neuf heures le samedi."),
  ("fren", "French", "Nous avons planté des tomates et du basilic dans le petit jardin derrière la maison."),
  ("ruen", "Russian", "Вечером мы гуляли по набережной и смотрели на корабли."),
  ("ruen", "Russian", "Этот музей открыли в прошлом году в старом здании фабрики."),
  ("jaen", "Japanese", "駅の近くに新しいパン屋ができて、朝から人が並んでいます。"),
  ("jaen", "Japanese", "週末は雨が降るそうなので、傘を忘れないでください。"),
  ("zhen", "Chinese", "我们明天早上八点在学校门口集合，然后一起去爬山。"),
  ("zhen", "Chinese", "这家小饭馆的饺子特别好吃，价格也很便宜。"),
)

# Text the tokenizer should compress well: the chat templates' fixed parts.
TEMPLATE_TEXT = (
  "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
  "detailed, and polite answers to the user's questions. USER: ASSISTANT: [INST] <<SYS>> <</SYS>> [/INST] "
  "Translate German to English: Translate French to English: Translate Russian to English: "
  "Translate Japanese to English: Translate Chinese to English: Please say it more briefly."
)


def questions() -> list[dict]:
  """One translation question per sentence, then a two-turn question (turn 2 sees turn 1's answer)."""
  out = [
    {"question_id": f"local_{category}_{i}", "category": category, "turns": [f"Translate {language} to English:{text}"]}
    for i, (category, language, text) in enumerate(SENTENCES)
  ]
  out.append(
    {
      "question_id": "local_chat_0",
      "category": "chat",
      "turns": [f"Translate German to English:{SENTENCES[0][2]}", "Please say it more briefly."],
    }
  )
  return out


def _single_process() -> None:
  if jax.process_count() > 1:
    raise SpecjaxError("local assets (runlocal) are built by a single process; run runlocal on one host")


def ensure_question_file(path: str) -> str:
  """Writes `questions()` as a Spec-Bench question.jsonl at `path` unless it exists."""
  _single_process()
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      for q in questions():
        f.write(json.dumps(q, ensure_ascii=False) + "\n")
  return path


def ensure_checkpoints(paths_and_presets: list[tuple[str, str]], vocab_size: int = 512, seed: int = 0) -> None:
  """Random-weight checkpoints (directory, preset name) sharing one tokenizer trained on
  SENTENCES, so a target and its drafter agree on token ids. Existing directories are kept."""
  _single_process()
  exists = [os.path.exists(os.path.join(path, "config.json")) for path, _ in paths_and_presets]
  if all(exists):
    return
  if any(exists):  # a checkpoint built earlier fixes the token ids
    tokenizer = load_tokenizer(paths_and_presets[exists.index(True)][0])
  else:
    tokenizer = train_tokenizer([TEMPLATE_TEXT] + [text for _, _, text in SENTENCES], vocab_size)
  for i, ((path, preset), done) in enumerate(zip(paths_and_presets, exists)):
    if not done:
      make_random_checkpoint(path, preset, tokenizer=tokenizer, seed=seed + i)


def corpus_texts() -> list[str]:
  """Both sides of the embedded corpus's training split (specjax/assets/corpus), and the
  templates' fixed text: what a tokenizer for runlocal training and the demo is trained on."""

  texts = [TEMPLATE_TEXT]
  for lang in LANGS:
    for x, en in load_pairs(EMBEDDED_CORPUS, lang, "train"):
      texts += [x, en]
  return texts


def ensure_corpus_tokenizer(out_dir: str, vocab_size: int = 2048):
  """A byte-level BPE trained on the embedded corpus, saved at out_dir (kept when present)."""
  _single_process()

  if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
    return load_tokenizer(out_dir)
  return train_tokenizer(corpus_texts(), vocab_size, out_dir)


def ensure_corpus_checkpoints(target_dir: str, preset: str = "tiny", vocab_size: int = 2048, seed: int = 0) -> None:
  """A random-weight target (runlocal training's stand-in) whose tokenizer covers the corpus."""
  if os.path.exists(os.path.join(target_dir, "config.json")):
    return
  tokenizer = ensure_corpus_tokenizer(
    os.path.join(os.path.dirname(os.path.abspath(target_dir)), "tokenizer"), vocab_size
  )
  make_random_checkpoint(target_dir, preset, tokenizer=tokenizer, seed=seed)
