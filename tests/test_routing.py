"""Drafter routing: by category, from the text alone (all 400 multilingual Spec-Bench prompts and
the embedded corpus), fallback when a language has no drafter, English left unrouted."""

import os

import pytest

from specjax.decoding.prompts import read_questions
from specjax.errors import SpecjaxError
from specjax.eval.routing import LANGS, detect_language, language_of_category, route, routing_table

CORPUS = os.path.join(os.path.dirname(__file__), "..", "specjax", "assets", "corpus")


@pytest.fixture(scope="module")
def questions(shared_data):
  """lang -> that language's X->en Spec-Bench questions."""
  folder = os.path.join(shared_data, "multilingual-specbench")
  return {lang: read_questions(os.path.join(folder, f"{lang}en_question.jsonl")) for lang in LANGS}


def _corpus_lines(pair: str, name: str) -> list[str]:
  with open(os.path.join(CORPUS, pair, name), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def test_language_of_category():
  assert [language_of_category(c) for c in ("deen", "fren", "jaen", "ruen", "zhen")] == list(LANGS)
  assert [language_of_category(c) for c in ("writing", "ende", "esen", "", None)] == [None] * 5


def test_routes_every_prompt_by_category(questions):
  for lang, qs in questions.items():
    assert routing_table(qs, LANGS) == {str(q["question_id"]): lang for q in qs}


def test_routes_every_prompt_from_text_alone(questions):
  for lang, qs in questions.items():
    misrouted = [q["turns"][0] for q in qs if route({k: v for k, v in q.items() if k != "category"}, LANGS) != lang]
    assert not misrouted, f"{lang}: {misrouted}"


def test_detection_ignores_the_instructions_language_name():
  assert detect_language("Translate German to English:Die Krise ist vorüber.") == "de"
  assert detect_language("Translate German to English: The crisis is over.") is None
  assert detect_language("Translate Russian to English:Le Tea Party est atterré.") == "fr"


def test_fallback_when_the_languages_drafter_is_missing(questions):
  for lang, qs in questions.items():
    others = [other for other in LANGS if other != lang]
    q = qs[0]
    assert route(q, others) == "general"
    assert route({"question_id": 1, "turns": q["turns"]}, others) == "general"
    assert route(q, others, fallback="base") == "base"
    assert route(q, [lang]) == lang


def test_english_is_not_routed():
  sentences = [
    "The weather is nice today.",
    "She has been working on this project for years.",
    "What time does the train leave?",
    "My father makes crêpes every Sunday morning.",
    "Obama and Netanyahu met at the White House.",
  ]
  assert [detect_language(s) for s in sentences] == [None] * len(sentences)
  assert route({"question_id": "en1", "category": "writing", "turns": sentences[:1]}, LANGS) == "general"
  for lang in LANGS:  # the English side of every embedded pair
    assert [s for s in _corpus_lines(f"{lang}-en", "eval.en") if detect_language(s) is not None] == []


def test_embedded_corpus_sentences_are_detected():
  for lang in LANGS:
    lines = _corpus_lines(f"{lang}-en", f"eval.{lang}")
    assert len(lines) >= 40
    assert [s for s in lines if detect_language(s) != lang] == [], lang


def test_bad_question_names_it():
  with pytest.raises(SpecjaxError, match="q7"):
    route({"question_id": "q7", "category": "deen", "turns": []}, LANGS)
