"""Spec-Bench's multi-turn protocol, written once for every job that decodes question files (the
generate job and the evaluation harness, specjax.eval.specbench).

Each question's turns are rendered with the chat template, turn t+1's prompt holding turns 1..t
and the model's answers to them; a batch's rows are seeded by `row_id = question index + turn x
questions`, so a question's answer does not depend on which batch it was decoded in, and a
resumed run's answers equal an uninterrupted one's. `Conversations` keeps the history; the
callers decide only how the questions are batched and what is written where.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from specjax.decoding import metrics
from specjax.decoding.decoder import Decoder
from specjax.decoding.prompts import apply_template, encode_prompt


@dataclasses.dataclass(frozen=True)
class TurnAnswer:
  """One question's answer to one turn."""

  text: str  # decoded without special tokens, stripped
  token_ids: list[int]
  steps: int  # decoding rounds (target forwards after the prefill)
  accepted: int  # drafted tokens the target accepted
  tau: float  # 1 + accepted / steps
  accept_lengths: list[int]  # tokens each round added, as Spec-Bench's accept_lengths


class Conversations:
  """The questions' dialogue so far: renders each turn's prompts and records each turn's answers."""

  def __init__(self, questions: Sequence[dict], tokenizer, template: str, system_prompt: str | None = None):
    self.questions, self.tokenizer = questions, tokenizer
    self.template, self.system_prompt = template, system_prompt
    self.history: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(questions))}

  def rows_with_turn(self, rows: Sequence[int], turn: int) -> list[int]:
    """The questions among `rows` that have turn `turn` (0-based)."""
    return [i for i in rows if len(self.questions[i]["turns"]) > turn]

  def name(self, i: int, turn: int) -> str:
    """How messages name question i's turn: its file and line, its id, the turn."""
    q = self.questions[i]
    return f"{q.get('source', '?')} (question {q['question_id']!r}, turn {turn + 1})"

  def prompts(self, rows: Sequence[int], turn: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of turn `turn`'s prompt for each question in `rows` (after its recorded turns), and their names."""
    ids = [
      encode_prompt(
        self.tokenizer,
        apply_template(
          self.template, self.questions[i]["turns"][turn], self.history[i], self.system_prompt, self.tokenizer
        ),
      )
      for i in rows
    ]
    return ids, [self.name(i, turn) for i in rows]

  def record(self, rows: Sequence[int], turn: int, texts: Sequence[str]) -> None:
    """Answers to turn `turn` (decoded here, or read back from a journal): the next turn's prompts hold them."""
    for i, text in zip(rows, texts):
      assert len(self.history[i]) == turn, (i, turn, len(self.history[i]))
      self.history[i].append((self.questions[i]["turns"][turn], text))

  def decode(
    self, decoder: Decoder, rows: Sequence[int], turn: int, prompts: list[list[int]], names: list[str], **sampling
  ) -> tuple[metrics.DecodeResult, list[TurnAnswer], float]:
    """One batch: decodes `prompts` (this turn's, of `rows`) and records the answers.

    sampling: generate's temperature=, top_k=, top_p=, seed=, eos_id= (the row ids are set here).
    Returns (the DecodeResult, one TurnAnswer per row, seconds in the generate call)."""
    start = time.perf_counter()
    result = decoder.generate(prompts, names=names, row_ids=[i + turn * len(self.questions) for i in rows], **sampling)
    elapsed = time.perf_counter() - start
    answers = []
    for k, tau in enumerate(metrics.row_tau(result)):
      tokens = [int(t) for t in result.new_tokens[k]]
      answers.append(
        TurnAnswer(
          text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
          token_ids=tokens,
          steps=int(result.steps[k]),
          accepted=int(result.accepted[k]),
          tau=tau,
          accept_lengths=accept_lengths(result.accept_hist[k]),
        )
      )
    self.record(rows, turn, [a.text for a in answers])
    return result, answers, elapsed


def accept_lengths(hist_H) -> list[int]:
  """A row's accepted lengths (accepted drafts + 1) per verification round, from its histogram:
  the same multiset Spec-Bench's answer files hold, in ascending order instead of decoding order."""
  return [n + 1 for n, count in enumerate(hist_H) for _ in range(int(count))]


def warm_up(
  decoder: Decoder, batches: Sequence[list[list[int]]], names: Sequence[str], compiled: set, **sampling
) -> float:
  """Compiles the program each batch will run (its longest prompt's bucket, in this sampling
  mode) unless `compiled` holds it already; returns the seconds spent. The one-token call keeps
  compile time out of the timed calls that follow."""
  start = time.perf_counter()
  for prompts, name in zip(batches, names):
    longest = max(prompts, key=len)
    program = (id(decoder), sampling.get("temperature", 0.0) > 0, math.ceil(len(longest) / decoder.prompt_bucket))
    if program not in compiled:
      compiled.add(program)
      decoder.generate([longest], names=[name], max_new_tokens=1, **sampling)
  return time.perf_counter() - start
