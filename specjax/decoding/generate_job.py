"""The `generate` job: Spec-Bench prompts through a target (and drafter), answers and metrics out.

Spec-Bench's protocol, batched: each question's turns are rendered with the chat template, turn
2's prompt holding turn 1 and the model's answer to it; all questions' turn t are decoded before
turn t+1. One `Decoder` serves every call, so each prompt-length bucket compiles once, and a
warm-up call per new bucket keeps compile time out of tokens/s (it is reported apart).

Nothing computed is thrown away: each finished batch's answers are appended to
WORKDIR/answers.jsonl at once (flushed to disk), and the batch (answers, decode counters) to
WORKDIR/answers.progress.jsonl, a journal whose first line records the config. A rerun of the same
command reads the journal, skips every finished batch and decodes the rest with the same batches
(and so the same padded shapes and row ids): its answers equal an uninterrupted run's. A journal
from other settings is an error naming them, not something mixed in. Writing is tried before the
models load, so an unwritable workdir fails in a second, not after decoding.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from specjax import console, fileio, local_assets
from specjax.config_utils import workdir_path
from specjax.decoding import engine, metrics
from specjax.decoding.decoder import Decoder
from specjax.decoding.prompts import apply_template, check_template, encode_prompt, read_prompt_files
from specjax.errors import SpecjaxError
from specjax.models.hf import check_checkpoint, load_model, target_tokenizer
from specjax.sharding import make_mesh, replicate_model

LOCAL_PRESETS = {"target": "tiny", "drafter": "tiny-drafter"}  # what local_assets builds
ANSWERS = "answers.jsonl"
JOURNAL = "answers.progress.jsonl"
# Fields that do not change a single answer; every other field must match the journal's to resume.
NOT_ECHOED = ("warmup",)


def _check_config(config, paths: dict[str, str | None]) -> None:
  """Mistakes that would otherwise surface only after the models load."""
  if not paths["target"]:
    raise SpecjaxError("config field `target` is not set: give a Hugging Face checkpoint directory "
                       "(--config.target=DIR) or preset:NAME, or use configs/generate.py:runlocal")
  if config.method not in engine.METHODS:
    raise SpecjaxError(f"config field `method`={config.method!r}: expected one of {', '.join(engine.METHODS)}")
  if config.method == "sps" and not paths["drafter"]:
    raise SpecjaxError("method 'sps' needs a drafter: set config field `drafter` (--config.drafter=DIR), or use "
                       "method=ar or method=pld")
  if not paths["prompts"]:
    raise SpecjaxError("config field `prompts` is not set: give a Spec-Bench question.jsonl path or glob")
  check_template(config.template)
  if config.drafter_sharding not in ("replicated", "sharded"):
    raise SpecjaxError(f"config field `drafter_sharding`={config.drafter_sharding!r}: expected 'replicated' "
                       "or 'sharded'")
  if config.max_prompts < 0:
    raise SpecjaxError(f"config field `max_prompts`={config.max_prompts}: must be >= 0 (0 = all)")


def _warm_up(decoder: Decoder, prompts: list[list[int]], names: list[str], sampling: dict, seen: set) -> float:
  """Compiles the program of every prompt-length bucket not seen yet; returns the seconds spent."""
  start = time.perf_counter()
  for ids, name in zip(prompts, names):
    bucket = math.ceil(len(ids) / decoder.prompt_bucket)
    if bucket not in seen:
      seen.add(bucket)
      decoder.generate([ids], names=[name], max_new_tokens=1, **sampling)
  return time.perf_counter() - start


def run(config, workdir: str) -> dict:
  """Runs the job (resuming a killed run of the same command); returns the metrics that it
  writes to WORKDIR/metrics.json."""
  paths = {field: workdir_path(config, field, workdir) for field in ("target", "drafter", "tokenizer", "prompts")}
  _check_config(config, paths)
  if config.local_assets:
    local_assets.ensure_question_file(paths["prompts"])
  questions = read_prompt_files(paths["prompts"])  # before the models load: a bad file fails fast
  if config.max_prompts:
    questions = questions[:config.max_prompts]
  writer = jax.process_index() == 0
  journal = Journal(workdir, _echo(config), [q["question_id"] for q in questions], writer)  # fails before decoding
  if jax.process_count() > 1:  # every process must skip the same batches, or the collectives would hang
    from jax.experimental import multihost_utils
    try:
      multihost_utils.assert_equal(np.int64(len(journal.batches)), "finished batches")
    except AssertionError:
      raise SpecjaxError(f"{journal.path}: the processes see different finished batches; the workdir must be one "
                         "directory that every process reads (e.g. gs://...)") from None
  plan = _plan(questions, config.batch_size)
  todo = [b for b in plan if (b["turn"], b["lo"]) not in journal.batches]
  if journal.batches:
    console.info("generate: resuming %s: %d of %d batches done, %d to decode", journal.path, len(plan) - len(todo),
                 len(plan), len(todo))

  answers, results, categories = [], [], []
  history = {i: [] for i in range(len(questions))}  # (user message, answer text) per earlier turn
  compile_s = sum(b["compile_s"] for b in journal.batches.values())
  decoder = tokenizer = None
  if todo:
    if config.local_assets:
      local_assets.ensure_checkpoints([(paths[role], LOCAL_PRESETS[role]) for role in ("target", "drafter")
                                       if paths[role] and not paths[role].startswith("preset:")])
    tokenizer, decoder = _load(config, paths)
  sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=config.seed)
  seen_buckets = set()
  bar = tqdm(total=sum(len(b["rows"]) for b in plan), initial=sum(len(b["rows"]) for b in plan if b not in todo),
             unit="prompt", desc=f"generate ({config.method})", disable=not writer)
  for turn in range(max(len(q["turns"]) for q in questions)):
    batches = [b for b in plan if b["turn"] == turn]
    active = [i for b in batches for i in b["rows"]]
    prompts = names = None
    for b in batches:
      done = journal.batches.get((turn, b["lo"]))
      if done is None:
        if prompts is None:  # this turn's prompts, from the earlier turns' answers (decoded or resumed)
          texts = [apply_template(config.template, questions[i]["turns"][turn], history[i], config.system_prompt,
                                  tokenizer)
                   for i in active]
          prompts = [encode_prompt(tokenizer, text) for text in texts]
          names = [f"{questions[i]['source']} (question {questions[i]['question_id']!r}, turn {turn + 1})"
                   for i in active]
          if config.warmup:  # every bucket of the turn, as an uninterrupted run compiles them
            compile_s += (warm := _warm_up(decoder, prompts, names, sampling, seen_buckets))
          else:
            warm = 0.0
        done = _decode_batch(decoder, tokenizer, questions, b, prompts[b["lo"]:b["lo"] + len(b["rows"])],
                             names[b["lo"]:b["lo"] + len(b["rows"])], sampling, warm)
        warm = 0.0
        journal.append(done)
        bar.update(len(b["rows"]))
      results.append(done["result"])
      categories.append([questions[i]["category"] for i in b["rows"]])
      for i, answer in zip(b["rows"], done["answers"]):
        history[i].append((questions[i]["turns"][turn], answer["text"]))
        answers.append(answer)
  bar.close()

  order = {q["question_id"]: i for i, q in enumerate(questions)}
  answers.sort(key=lambda a: (order[a["question_id"]], a["turn"]))
  out = {"job": "generate", "method": config.method, "prompts": len(questions), "generations": len(answers),
         "compile_s": compile_s, "dtype": config.dtype, "exactness": exactness(config.method, config.dtype),
         "hardware": {"device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                      "device_count": jax.device_count(), "process_count": jax.process_count()},
         **metrics.aggregate(results, categories),
         "config": config.to_dict()}
  if writer:
    journal.finish(answers, out)
  rate = out["acceptance_rate"]
  console.info("generate: %d answers, %d new tokens in %.2f s (%.1f tokens/s), tau %.3f, acceptance %s, "
               "compile %.1f s; wrote %s", len(answers), out["new_tokens"], out["wall_s"],
               out["tokens_per_second"] or 0.0, out["tau"], "n/a" if rate is None else f"{rate:.3f}",
               compile_s, workdir)
  return out


def _load(config, paths):
  if config.method == "sps":
    check_checkpoint(paths["drafter"], "config field `drafter`")  # both checked before either loads
  tokenizer = target_tokenizer(paths["tokenizer"], paths["target"])
  mesh = make_mesh(tuple(config.mesh_shape)) if jax.device_count() > 1 else None
  target, _ = load_model(paths["target"], config.dtype, mesh, seed=config.seed)
  drafter = None
  if config.method == "sps":
    sharded = mesh is not None and config.drafter_sharding == "sharded"
    drafter, _ = load_model(paths["drafter"], config.dtype, mesh if sharded else None, seed=config.seed + 1)
    if mesh is not None and not sharded:
      replicate_model(drafter, mesh)
  decoder = Decoder(target, drafter, method=config.method, gamma=config.gamma, dynamic_gamma=config.dynamic_gamma,
                    gamma_start=config.gamma_start, max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size, mesh=mesh, max_cache_len=config.max_cache_len,
                    prompt_bucket=config.prompt_bucket)
  return tokenizer, decoder


def _plan(questions: list[dict], batch_size: int) -> list[dict]:
  """The batches of an uninterrupted run: per turn, the questions that have it, cut every batch_size."""
  plan = []
  for turn in range(max(len(q["turns"]) for q in questions)):
    active = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
    plan += [{"turn": turn, "lo": lo, "rows": active[lo:lo + batch_size]} for lo in range(0, len(active), batch_size)]
  return plan


def _decode_batch(decoder, tokenizer, questions, batch, prompts, names, sampling, compile_s) -> dict:
  turn, rows = batch["turn"], batch["rows"]
  n = len(questions)
  result = decoder.generate(prompts, names=names, row_ids=[i + turn * n for i in rows], **sampling)
  answers = []
  for k, (i, tau) in enumerate(zip(rows, metrics.row_tau(result))):
    tokens = result.new_tokens[k]
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    answers.append({"question_id": questions[i]["question_id"], "category": questions[i]["category"],
                    "turn": turn, "text": text, "token_ids": [int(t) for t in tokens],
                    "new_tokens": len(tokens), "steps": int(result.steps[k]),
                    "accepted": int(result.accepted[k]), "tau": tau, "wall_s": result.wall_s})
  return {"turn": turn, "lo": batch["lo"], "rows": list(rows), "answers": answers, "result": result,
          "compile_s": compile_s}


def _echo(config) -> dict:
  """The settings a resume must share, as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in NOT_ECHOED}))


# --- the journal: answers and decode counters of every finished batch -----------------------


def _to_json(x):
  """A DecodeResult (dataclasses of numpy arrays and numbers) as JSON-able data, exactly."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {"__dataclass__": f"{type(x).__module__}:{type(x).__qualname__}",
            **{f.name: _to_json(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}}
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    a = np.asarray(x)
    return {"__array__": a.tolist(), "dtype": str(a.dtype), "shape": list(a.shape)}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, dict):
    return {k: _to_json(v) for k, v in x.items()}
  return x


def _from_json(x):
  if isinstance(x, dict) and "__dataclass__" in x:
    module, name = x["__dataclass__"].split(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: _from_json(v) for k, v in x.items() if k != "__dataclass__"})
  if isinstance(x, dict) and "__array__" in x:
    return np.asarray(x["__array__"], dtype=x["dtype"]).reshape(x["shape"])
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  if isinstance(x, dict):
    return {k: _from_json(v) for k, v in x.items()}
  return x


class Journal:
  """WORKDIR/answers.progress.jsonl (line 1: the settings and question ids; then one line per
  finished batch) and WORKDIR/answers.jsonl (answers as they finish; sorted when the job ends).

  Opening it reads what an earlier run finished, drops a half-written last line (a kill during a
  write), checks the settings match, and writes both files back, so a workdir that cannot be
  written fails here, before any model loads."""

  def __init__(self, workdir: str, echo: dict, question_ids: list, writer: bool = True):
    self.workdir, self.writer = workdir, writer
    self.path = fileio.join(workdir, JOURNAL)
    self.answers_path = fileio.join(workdir, ANSWERS)
    self.header = {"kind": "header", "config": echo, "question_ids": question_ids}
    self.batches: dict[tuple[int, int], dict] = {}
    lines = self._read()
    if lines:
      self._check_header(lines[0], echo, question_ids)
      for line in lines[1:]:
        batch = {**line, "result": _from_json(line["result"])}
        self.batches[(batch["turn"], batch["lo"])] = batch
    if writer:
      try:
        fileio.makedirs(workdir, exist_ok=True)
        _rewrite(self.path, [self.header] + [self._line(b) for b in self.batches.values()])
        _rewrite(self.answers_path, [a for b in self.batches.values() for a in b["answers"]])
      except OSError as e:
        raise SpecjaxError(f"{workdir}: cannot write the answers there ({e.strerror or e}); give a workdir you can "
                           "write") from None

  def _read(self) -> list[dict]:
    if not fileio.exists(self.path):
      return []
    try:
      with fileio.open(self.path, "r", encoding="utf-8") as f:
        raw = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise SpecjaxError(f"{self.path}: cannot read the journal of an earlier run ({e}); remove it to start "
                         "over") from None
    lines = []
    for k, text in enumerate(raw, 1):
      if not text.strip():
        continue
      try:
        line = json.loads(text)
        if not isinstance(line, dict) or line.get("kind") != ("header" if not lines else "batch"):
          raise ValueError("unexpected record")
        if lines:
          _from_json(line["result"])
          line["answers"], line["turn"], line["lo"], line["rows"]  # noqa: B018
      except (ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        if k == len(raw):  # no newline after it: the write was cut
          console.warning("generate: %s: dropping a half-written last line (an interrupted write)", self.path)
          break
        raise SpecjaxError(f"{self.path}:{k}: not a line this job wrote ({e}); remove the file to start "
                           "over") from None
      lines.append(line)
    return lines

  def _check_header(self, header: dict, echo: dict, question_ids: list) -> None:
    before = header.get("config", {})
    changed = sorted(k for k in set(before) | set(echo) if before.get(k) != echo.get(k))
    if changed:
      raise SpecjaxError(f"{self.path}: an earlier run in this workdir used other values of "
                         + ", ".join(f"{k} ({before.get(k)!r}, now {echo.get(k)!r})" for k in changed)
                         + "; use a new workdir, the earlier values to resume it, or remove the file to start over")
    if header.get("question_ids") != question_ids:
      raise SpecjaxError(f"{self.path}: an earlier run in this workdir answered other questions (the prompt files "
                         "changed); use a new workdir, or remove the file to start over")

  @staticmethod
  def _line(batch: dict) -> dict:
    return {"kind": "batch", **{k: v for k, v in batch.items() if k not in ("kind", "result")},
            "result": _to_json(batch["result"])}

  def _append(self, path: str, records: list[dict]) -> None:
    with fileio.open(path, "a", encoding="utf-8") as f:
      f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
      f.flush()
      if not fileio.is_remote(path):
        os.fsync(f.fileno())

  def append(self, batch: dict) -> None:
    """A finished batch: its answers to answers.jsonl, then the batch to the journal (which makes it done)."""
    self.batches[(batch["turn"], batch["lo"])] = batch
    if not self.writer:
      return
    try:
      self._append(self.answers_path, batch["answers"])
      self._append(self.path, [self._line(batch)])
    except OSError as e:
      raise SpecjaxError(f"{self.workdir}: writing the answers failed ({e.strerror or e}); the finished batches are "
                         f"in {self.path}: free space or fix the workdir and rerun the same command to resume") from None

  def finish(self, answers: list[dict], out: dict) -> None:
    """answers.jsonl in question order, and metrics.json (the journal stays: a rerun does nothing)."""
    _write(self.workdir, answers, out)


def exactness(method: str, dtype: str) -> str:
  """What speculative output is guaranteed to equal, in this dtype (metrics.json says it)."""
  if method == "ar":
    return "plain decoding"
  if dtype == "float32":
    return ("greedy: token-identical to plain greedy decoding (float32); sampled: the target's distribution, "
            "exactly (rejection sampling)")
  return (f"greedy in {dtype}: equal to plain greedy decoding except at near-ties, which a {dtype} verification "
          "of γ+1 tokens and a one-token step can round differently (float32 is token-identical); sampled: the "
          "target's distribution, exactly (rejection sampling)")


def _rewrite(path: str, records: list[dict]) -> None:
  """One JSON line per record, to PATH.tmp and then renamed: readers see the old file or the new."""
  tmp = path + ".tmp"
  with fileio.open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  fileio.replace(tmp, path)


def _write(workdir: str, answers: list[dict], out: dict) -> None:
  fileio.makedirs(workdir, exist_ok=True)
  _rewrite(fileio.join(workdir, ANSWERS), answers)
  tmp = fileio.join(workdir, "metrics.json.tmp")
  with fileio.open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
    f.write("\n")
  fileio.replace(tmp, fileio.join(workdir, "metrics.json"))
