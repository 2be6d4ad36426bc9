"""Multilingual Spec-Bench evaluation: every method and drafter, as the paper measures (`evaluate`;
the `eval_specbench` job, specjax/jobs/eval_specbench.py, runs it from a config).

One Decoder per (method, drafter), compiled on every prompt bucket and sampling mode before its
first timed call, so tokens/s is decoding alone. For each (language, temperature, seed) every
method runs back to back: on a machine whose speed drifts (thermals, neighbours), the ratio of
two numbers measured a second apart is fairer than of two measured an hour apart. Each run
yields one RECORD (specjax/eval/__init__.py) and Spec-Bench/FastChat answer lines, from which
Spec-Bench's own speed.py and BLEU/chrF against references can be computed.

`evaluate` resumes: given the finished units (`done`, by `unit_key`) it decodes only the rest,
and hands each unit it decodes to `on_unit` (the job journals it). Decoding is seeded per (seed,
question row), so resumed answers equal an uninterrupted run's (timings and tstamp aside).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
from tqdm import tqdm

from specjax import console
from specjax.data.parallel import LANGS
from specjax.decoding import engine, metrics
from specjax.decoding.decoder import Decoder, DecodingSettings, stop_ids
from specjax.decoding.conversations import Conversations, warm_up
from specjax.decoding.prompts import check_template
from specjax.errors import SpecjaxError
from specjax.eval.routing import language_of_category, route
from specjax.models.llama import Llama

DRAFTER_NAMES = ("general",) + LANGS  # what a drafter may be called: its language, or general
ROUTED = "auto"  # the drafter of a run that picks one per question (specjax.eval.routing)


@dataclasses.dataclass(frozen=True)
class Run:
  """One (method, drafter) column of the evaluation; temperatures=None runs at every temperature."""

  method: str
  drafter: str | None = None
  temperatures: tuple[float, ...] | None = None

  @property
  def model_id(self) -> str:
    return f"specjax-{self.method}" + (f"-{self.drafter}" if self.drafter else "")


def normalize_runs(runs: Sequence, drafter_names: Sequence[str]) -> list[Run]:
  """(method, drafter[, temperatures]) tuples as Runs, checked against the loaded drafters;
  repeats are dropped (a repeat with other temperatures adds them)."""
  out: dict[tuple, Run] = {}
  for index, item in enumerate(runs):
    item = tuple(item)
    if len(item) not in (2, 3):
      raise SpecjaxError(f"runs[{index}]={item!r}: expected (method, drafter) or (method, drafter, temperatures)")
    method, drafter = item[:2]
    temperatures = tuple(float(t) for t in item[2]) if len(item) == 3 and item[2] is not None else None
    if method not in engine.METHODS:
      raise SpecjaxError(f"runs[{index}]: method {method!r}: expected one of {', '.join(engine.METHODS)}")
    if method == "sps" and drafter != ROUTED and drafter not in drafter_names:
      raise SpecjaxError(
        f"runs[{index}]: drafter {drafter!r} is not loaded; drafters: "
        f"{', '.join(drafter_names) or '(none)'}, or {ROUTED!r} (routed per question)"
      )
    if method == "sps" and drafter == ROUTED and not drafter_names:
      raise SpecjaxError(f"runs[{index}]: drafter {ROUTED!r} routes among the loaded drafters, and none is loaded")
    if method != "sps" and drafter is not None:
      raise SpecjaxError(f"runs[{index}]: method {method!r} uses no drafter, got drafter {drafter!r}")
    key = (method, drafter)
    if key in out:
      old = out[key].temperatures
      temperatures = None if old is None or temperatures is None else tuple(dict.fromkeys(old + temperatures))
    out[key] = Run(method, drafter, temperatures)
  return list(out.values())


def _answer_id(model_id: str, temperature: float, seed: int, question_id) -> str:
  """Deterministic (FastChat uses a random shortuuid): a re-run names the same answer the same."""
  key = json.dumps([model_id, temperature, seed, question_id])
  return hashlib.sha1(key.encode("utf-8")).hexdigest()[:22]


def _trim_none(values: list) -> list:
  """Positions never proposed at the end (ar, or beyond a dynamic γ's reach) say nothing."""
  values = list(values)
  while values and values[-1] is None:
    values.pop()
  return values


class _Evaluation:
  """The state of one `evaluate` call: decoders, their compiled buckets, and the routing."""

  def __init__(
    self,
    target,
    tokenizer,
    drafters,
    questions,
    runs,
    *,
    decoding: DecodingSettings,
    template,
    system_prompt,
    mesh,
    eos_id,
  ):
    self.tokenizer, self.questions = tokenizer, questions
    self.template, self.system_prompt, self.eos_id = template, system_prompt, eos_id
    self.batch_size = decoding.batch_size
    self.routed: dict[int, str] = {}
    if any(run.drafter == ROUTED for run in runs):
      for i, q in enumerate(questions):
        name = route(q, available=list(drafters))
        if name not in drafters:
          raise SpecjaxError(
            f"{q.get('source', q['question_id'])}: drafter=auto routes question "
            f"{q['question_id']!r} to drafter {name!r}, which is not loaded (drafters: "
            f"{', '.join(drafters)}); add a {name!r} drafter"
          )
        self.routed[i] = name
    needed = []  # decoder keys, (method, drafter name | None)
    for run in runs:
      if run.drafter == ROUTED:
        needed += [("sps", name) for name in dict.fromkeys(self.routed.values())]
      else:
        needed.append((run.method, run.drafter))
    self.decoders = {
      key: Decoder(target, drafters[key[1]] if key[1] else None, decoding, method=key[0], mesh=mesh)
      for key in dict.fromkeys(needed)
    }
    self.compiled: set[tuple] = set()  # the programs warm_up compiled
    self.compile_s = 0.0

  def decoder_key(self, run: Run, question_index: int) -> tuple:
    return ("sps", self.routed[question_index]) if run.drafter == ROUTED else (run.method, run.drafter)

  def decode(self, run: Run, indices: list[int], temperature: float, seed: int) -> tuple[list, float, dict]:
    """Every turn of the questions at `indices` (turn t+1's prompt holds turn t's answer).

    Returns (DecodeResults, seconds inside the generate calls, per question: its TurnAnswers and
    each one's share of its batch's seconds).
    """
    conversations = Conversations(self.questions, self.tokenizer, self.template, self.system_prompt)
    turns = {i: [] for i in indices}  # per turn: (TurnAnswer, wall seconds)
    results, wall_s = [], 0.0
    sampling = dict(temperature=temperature, seed=seed, eos_id=self.eos_id)
    for turn in range(max(len(self.questions[i]["turns"]) for i in indices)):
      groups: dict[tuple, list[int]] = {}
      for i in conversations.rows_with_turn(indices, turn):
        groups.setdefault(self.decoder_key(run, i), []).append(i)
      for key, rows in groups.items():
        decoder = self.decoders[key]
        prompts, names = conversations.prompts(rows, turn)
        starts = range(0, len(rows), self.batch_size)
        self.compile_s += warm_up(
          decoder,
          [prompts[lo : lo + self.batch_size] for lo in starts],
          [names[lo] for lo in starts],
          self.compiled,
          **sampling,
        )
        for lo in starts:
          batch = slice(lo, lo + self.batch_size)
          result, answers, elapsed = conversations.decode(
            decoder, rows[batch], turn, prompts[batch], names[batch], **sampling
          )
          wall_s += elapsed
          results.append(result)
          for i, answer in zip(rows[batch], answers):
            turns[i].append((answer, elapsed / len(answers)))
    return results, wall_s, turns


def evaluate(
  target: Llama,
  tokenizer,
  drafters: Mapping[str, Llama],
  questions: list[dict],
  *,
  runs: Sequence[tuple],
  temperatures: Sequence[float] = (0.0, 1.0),
  seeds: Sequence[int] = (0, 1, 2),
  greedy_seeds: Sequence[int] = (0,),
  decoding: DecodingSettings | None = None,
  template: str = "vicuna_v1.1",
  system_prompt: str | None = None,
  mesh=None,
  eos_id: int | Sequence[int] | None = None,
  progress: bool = True,
  done: Mapping[tuple, dict] | None = None,
  on_unit: Callable[[dict], None] | None = None,
  **decoding_fields,
) -> tuple[list[dict], list[dict]]:
  """Decodes every category's questions with every run; returns (records, answers).

  runs: (method, drafter) pairs, e.g. [("ar", None), ("pld", None), ("sps", "general"),
  ("sps", "de"), ("sps", "auto")], optionally with a third element, the temperatures that run
  is limited to. A language drafter runs on every category's questions (the cross-language
  matrix); "auto" picks each question's drafter with specjax.eval.routing.route.
  Greedy decoding is deterministic, so T=0 runs once per `greedy_seeds`; T>0 once per `seeds`.
  answers: one Spec-Bench answer per (run, temperature, seed, question): question_id, category,
  answer_id, model_id, tstamp, and choices[0] with per turn text, decoding_steps, new_tokens,
  wall_time (a batch's time shared by its rows) and token_ids, and accept_lengths over all
  turns; tagged with method, drafter, temperature, seed (and routed_drafter for "auto").
  decoding: how every run decodes (its method comes from the run); decoding_fields (gamma=,
  max_new_tokens=, batch_size=, ...) override its fields.
  done: finished units by `unit_key` ({"record", "answers", "compile_s"}, from a journal): used as
  they are, not decoded (target and drafters may be None when every unit is done). on_unit: called
  with each unit decoded here ({"key", "record", "answers", "compile_s"}), e.g. to journal it.
  """

  decoding = (decoding or DecodingSettings()).replace(**decoding_fields)
  runs = normalize_runs(runs, list(drafters))
  if not runs:
    raise SpecjaxError("runs: nothing to evaluate (give at least one (method, drafter) pair)")
  if not questions:
    raise SpecjaxError("questions: nothing to evaluate")
  check_template(template)
  if any(t < 0 for t in temperatures) or not temperatures:
    raise SpecjaxError(f"temperatures={tuple(temperatures)}: need at least one, each >= 0")
  state = None  # built at the first unit to decode (none when every unit is done)
  by_category = _by_category(questions)
  work = work_units(questions, runs, temperatures, seeds, greedy_seeds)
  records, answers = [], []
  done, compile_s, decoded = done or {}, 0.0, 0
  bar = tqdm(total=len(work), unit="run", desc="specbench", disable=not progress or jax.process_index() != 0)
  for category, temperature, seed, run in work:
    finished = done.get(unit_key(category, temperature, seed, run))
    if finished is not None:
      records.append(finished["record"])
      answers += finished["answers"]
      compile_s += finished.get("compile_s", 0.0)
      bar.update(1)
      continue
    if state is None:
      state = _Evaluation(
        target,
        tokenizer,
        drafters,
        questions,
        runs,
        decoding=decoding,
        template=template,
        system_prompt=system_prompt,
        mesh=mesh,
        eos_id=stop_ids(target.config, tokenizer) if eos_id is None else eos_id,
      )
    compiled_before = state.compile_s
    decoded += 1
    indices = by_category[category]
    bar.set_postfix_str(f"{category} T={temperature:g} seed={seed} {run.model_id}")
    results, wall_s, turns = state.decode(run, indices, temperature, seed)
    m = metrics.aggregate(results)
    unit_answers = []
    records.append(
      {
        "language": language_of_category(category) or category,
        "category": category,
        "method": run.method,
        "drafter": run.drafter,
        "temperature": temperature,
        "seed": seed,
        "prompts": len(indices),
        "new_tokens": m["new_tokens"],
        "wall_s": wall_s,
        "tokens_per_second": m["new_tokens"] / wall_s if wall_s else None,
        "tau": m["tau"],
        "tau_drafted": m["tau_drafted"],
        "acceptance_rate": m["acceptance_rate"],
        "per_position": _trim_none(m["per_position_acceptance"]["cumulative"]),
        "per_position_conditional": _trim_none(m["per_position_acceptance"]["conditional"]),
      }
    )
    for i in indices:
      q = questions[i]
      answered = [answer for answer, _ in turns[i]]
      answer = {
        "question_id": q["question_id"],
        "category": category,
        "answer_id": _answer_id(run.model_id, temperature, seed, q["question_id"]),
        "model_id": run.model_id,
        "choices": [
          {
            "index": 0,
            "turns": [a.text for a in answered],
            "decoding_steps": [a.steps for a in answered],
            "new_tokens": [len(a.token_ids) for a in answered],
            "wall_time": [wall for _, wall in turns[i]],
            "accept_lengths": [n for a in answered for n in a.accept_lengths],
            "token_ids": [a.token_ids for a in answered],
          }
        ],
        "tstamp": time.time(),
        "method": run.method,
        "drafter": run.drafter,
        "temperature": temperature,
        "seed": seed,
      }
      if run.drafter == ROUTED:
        answer["routed_drafter"] = state.routed[i]
      unit_answers.append(answer)
    answers += unit_answers
    if on_unit is not None:
      on_unit(
        {
          "key": list(unit_key(category, temperature, seed, run)),
          "record": records[-1],
          "answers": unit_answers,
          "compile_s": state.compile_s - compiled_before,
        }
      )
    bar.update(1)
  bar.close()
  order = {q["question_id"]: i for i, q in enumerate(questions)}
  answers.sort(key=lambda a: (a["model_id"], a["temperature"], a["seed"], order[a["question_id"]]))
  console.info(
    "eval_specbench: %d records (%d decoded now) from %d decoders; compile (warm-up, not timed) %.1f s",
    len(records),
    decoded,
    len(state.decoders) if state else 0,
    compile_s + (state.compile_s if state else 0.0),
  )
  return records, answers


def _by_category(questions: list[dict]) -> dict[str, list[int]]:
  out: dict[str, list[int]] = {}
  for i, q in enumerate(questions):
    out.setdefault(q["category"], []).append(i)
  return out


def work_units(questions: list[dict], runs: Sequence[Run], temperatures, seeds, greedy_seeds) -> list[tuple]:
  """(category, temperature, seed, Run) in decoding order. Innermost loop over runs: the methods
  compared within one (language, temperature, seed) run back to back."""
  return [
    (category, float(t), int(seed), run)
    for category in _by_category(questions)
    for t in temperatures
    for seed in (greedy_seeds if t == 0 else seeds)
    for run in runs
    if run.temperatures is None or float(t) in run.temperatures
  ]


def unit_key(category: str, temperature: float, seed: int, run: Run) -> tuple:
  """One unit of the evaluation, as its journal line names it."""
  return (category, float(temperature), int(seed), run.model_id)


# --- translation quality -----------------------------------------------------------------


def bleu_chrf(answers: Sequence[dict], references: Mapping[str, Sequence[str] | str]) -> dict:
  """Corpus BLEU and chrF (sacrebleu) per category of one run's answers, first turns only.

  references: category -> reference lines, or -> a file of them (one line per question, in
  question order). Hypotheses are the answers of that category in the order given.
  Categories without references are skipped. Returns {category: {"bleu", "chrf", "sentences"}}.
  """
  import sacrebleu

  hypotheses: dict[str, list[str]] = {}
  for answer in answers:
    category = answer.get("category")
    if category in references:
      hypotheses.setdefault(category, []).append(answer["choices"][0]["turns"][0])
  out = {}
  for category, hyps in hypotheses.items():
    refs, source = references[category], f"references[{category!r}]"
    if isinstance(refs, str):
      refs, source = read_reference_file(refs), refs
    refs = list(refs)
    if len(refs) != len(hyps):
      raise SpecjaxError(
        f"{source}: {len(refs)} reference lines for {len(hyps)} answers of category "
        f"{category!r}; references must be line-aligned with the questions"
      )
    out[category] = {
      "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
      "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
      "sentences": len(hyps),
    }
  return out


def read_reference_file(path: str) -> list[str]:
  """One reference per line; a final newline does not add an empty reference."""
  if not os.path.isfile(path):
    raise SpecjaxError(f"config field `references`: {path}: file not found")
  with open(path, encoding="utf-8") as f:
    return f.read().rstrip("\n").split("\n")
