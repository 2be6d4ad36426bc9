"""Per-prompt drafter choice ("drafter=auto"), which the paper leaves as future work.

A specialized drafter only pays off on prompts in its own language, so a mixed workload needs a
router. The category of a multilingual Spec-Bench question names the language; for anything else
(or to show that the category is not needed) the language is detected from the text alone, by
script for ja/zh/ru and by characteristic letters and stopwords for de/fr against English.
"""

from __future__ import annotations

import re
from typing import Sequence

from specjax.data.parallel import LANGS
from specjax.errors import SpecjaxError

# The paper's instruction prefix. It is stripped but its language name is never read: routing
# has to work on raw text too.
_INSTRUCTION = re.compile(r"^\s*Translate\s+[A-Za-z]+\s+to\s+English\s*:\s*", re.IGNORECASE)

# Stopwords that are frequent in one language and rare or absent in the other two (so no "in",
# "die", "was", "a", "on", "son", ... which German or French share with English).
_STOPWORDS = {
  "de": set(
    "der das und ist nicht ein eine einen einem einer zu mit den dem sich auf für von im "
    "sie er es wir ich ihr hat haben sind wird werden wurde dass aber auch noch nur bei "
    "nach aus vor wie schon sein seine ihre mein meine kein keine sehr zum zur wenn oder "
    "bis ob heute jetzt immer dieser diese dieses diesem diesen mir mich dir dich hast "
    "kannst gibt bitte mal einmal unter warum wann wegen dein deine viele kleine um".split()
  ),
  "fr": set(
    "le la les et est une un des du pas pour dans que qui sur au aux avec ce cette ces il "
    "elle ils elles nous vous je tu se ne sont ont été par plus mais leur leurs mon ma mes "
    "sa ses notre nos très tout tous toute aussi depuis chez où quand sans entre déjà "
    "encore peu fait avait sera".split()
  ),
  "en": set(
    "the and is of to that it was are this with for from have has had been were will "
    "would they their there which what who you your we our he she his her not but can "
    "could should about into after before because when very my i every by be at do did "
    "if than then them these those some one out up how why its".split()
  ),
}
_LETTERS = {"de": set("äöüß"), "fr": set("éèêëàâçœùûîïôÿ")}
# l'essence, d'un, n'est, qu'il, c'est, j'ai, s'avère: elision is French and never English.
_FRENCH_ELISION = re.compile(r"(?<![^\W\d_])(?:l|d|n|qu|c|j|s|m|t)['’](?=[^\W\d_])", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+")


def language_of_category(category: str) -> str | None:
  """Maps "deen" -> "de" for the X->en categories of multilingual Spec-Bench; None for the rest."""
  is_x_to_en = isinstance(category, str) and len(category) == 4 and category.endswith("en")
  return category[:2] if is_x_to_en and category[:2] in LANGS else None


def _script_counts(text: str) -> dict[str, int]:
  """Letters per script; kana apart from Han because kana is what tells Japanese from Chinese."""
  counts = {"kana": 0, "han": 0, "cyrillic": 0, "latin": 0}
  for ch in text:
    code = ord(ch)
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9F:
      counts["kana"] += 1
    elif 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF:
      counts["han"] += 1
    elif 0x0400 <= code <= 0x052F:
      counts["cyrillic"] += 1
    elif ch.isalpha() and code < 0x0250:
      counts["latin"] += 1
  return counts


def _latin_language(text: str) -> str | None:
  """de or fr by stopwords, accented letters and French elision; None when English wins or tie."""
  words = _WORD.findall(text.lower())
  score = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
  for lang, letters in _LETTERS.items():  # a word with an umlaut/accent counts as much as two stopwords
    score[lang] += 2 * sum(any(ch in letters for ch in w) for w in words)
  score["fr"] += 2 * len(_FRENCH_ELISION.findall(text))
  top = max(score.values())
  leaders = [lang for lang, s in score.items() if s == top]
  if leaders == ["de", "fr"]:  # e.g. "des" vs "einen": German spells with k, w and sch, French rarely
    german_spelling = sum(("k" in w or "w" in w or "sch" in w) for w in words)
    leaders = ["de"] if german_spelling else leaders
  return leaders[0] if top > 0 and len(leaders) == 1 and leaders[0] != "en" else None


def detect_language(text: str) -> str | None:
  """The source language of a prompt (one of LANGS), or None for English or undecidable text."""
  if not isinstance(text, str):
    raise SpecjaxError(f"detect_language: expected a string, got {type(text).__name__}")
  text = _INSTRUCTION.sub("", text, count=1)
  counts = _script_counts(text)
  cjk = counts["kana"] + counts["han"]
  # One CJK character carries about a word; weigh it against a Latin word's ~3 letters.
  if cjk and 3 * cjk >= max(counts["cyrillic"], counts["latin"]):
    return "ja" if counts["kana"] else "zh"
  if counts["cyrillic"] and counts["cyrillic"] >= counts["latin"]:
    return "ru"
  return _latin_language(text)


def route(question: dict, available: Sequence[str], fallback: str = "general") -> str:
  """The drafter for one Spec-Bench question: its category's language, else the language detected
  from its first turn, when a drafter for it is available; else `fallback`."""
  turns = question.get("turns") if isinstance(question, dict) else None
  if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
    where = question.get("source", question.get("question_id", "?")) if isinstance(question, dict) else "?"
    raise SpecjaxError(f"route: question {where}: `turns` must be a non-empty list of strings")
  by_category = language_of_category(question.get("category"))
  if by_category in available:
    return by_category
  detected = detect_language(turns[0])
  return detected if detected in available else fallback


def routing_table(questions: Sequence[dict], available: Sequence[str]) -> dict[str, str]:
  """question_id (as a string) -> drafter name, for logging which drafter served which prompt."""
  return {str(q.get("question_id")): route(q, available) for q in questions}
