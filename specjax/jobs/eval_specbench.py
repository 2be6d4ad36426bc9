"""The `eval_specbench` job: every method and drafter on multilingual Spec-Bench, as the paper measures.

The decoding and the records are specjax.eval.specbench's `evaluate`; this job reads the config,
the question and reference files, loads the target and drafters, and writes the outputs.

Nothing computed is thrown away: each finished (run, category, temperature, seed) unit's answers
are appended to its file in WORKDIR/answers/ at once, and the unit (its record and answers) to
WORKDIR/answers.progress.jsonl (specjax.journal, as the generate job). A rerun of the same command
skips the finished units and decodes the rest; a finished job's rerun loads no model. Decoding is
seeded per (seed, question row), so the resumed answers equal an uninterrupted run's (timings and
tstamp aside); a journal of other settings is refused, naming them.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence

import jax

from specjax import console, fileio, journal
from specjax.config_utils import workdir_path
from specjax.data.parallel import LANGS
from specjax.decoding import engine
from specjax.decoding.decoder import DecodingSettings
from specjax.decoding.prompts import check_template, read_prompt_files
from specjax.errors import SpecjaxError
from specjax.eval import report
from specjax.eval.specbench import (
  DRAFTER_NAMES,
  ROUTED,
  bleu_chrf,
  evaluate,
  normalize_runs,
  read_reference_file,
  unit_key,
  work_units,
)
from specjax.jobs import local_assets
from specjax.jobs.common import job_mesh, load_target_and_drafters, named_paths
from specjax.jobs.local_assets import LOCAL_PRESETS
from specjax.models.hf import check_checkpoint
from specjax.train.acceptance import first_per_category

# Fields that change no answer; every other field must match the journal's to resume.
NOT_ECHOED = ("compilation_cache", "references")


def _split_list(value, field: str) -> list[str]:
  """A list field given as "a,b" or "a+b" (config strings split on commas) or a sequence."""
  items = value.replace("+", ",").split(",") if isinstance(value, str) else list(value)
  items = [str(item).strip() for item in items if str(item).strip()]
  if not items:
    raise SpecjaxError(f"config field `{field}` is empty")
  return items


def runs_from_config(config, drafter_names: Sequence[str]) -> list[tuple]:
  """The (method, drafter[, temperatures]) runs that `methods`, `drafter` and `cross_language` ask for."""
  methods = _split_list(config.methods, "methods")
  for method in methods:
    if method not in engine.METHODS:
      raise SpecjaxError(f"config field `methods`: {method!r}: expected some of {', '.join(engine.METHODS)}")
  runs = [(method, None) for method in methods if method != "sps"]
  if "sps" in methods:
    for choice in _split_list(config.drafter, "drafter"):
      if choice == "all":
        runs += [("sps", name) for name in drafter_names]
      elif choice == ROUTED or choice in drafter_names:
        runs.append(("sps", choice))
      else:
        raise SpecjaxError(
          f"config field `drafter`={choice!r}: expected {ROUTED!r}, 'all', or a drafter of "
          f"config field `drafters` ({', '.join(drafter_names) or 'none given'})"
        )
    if config.cross_language:
      runs += [("sps", name, (0.0,)) for name in drafter_names if name in LANGS]
  return runs


def _check_config(config, paths: dict, drafter_paths: dict[str, str]) -> None:
  """Mistakes that would otherwise surface only after the models load."""
  if not paths["target"]:
    raise SpecjaxError(
      "config field `target` is not set: give a Hugging Face checkpoint directory "
      "(--config.target=DIR), or use configs/eval_specbench.py:runlocal"
    )
  if not paths["prompts"]:
    raise SpecjaxError("config field `prompts` is not set: give Spec-Bench question.jsonl paths or a glob")
  for name in drafter_paths:
    if name not in DRAFTER_NAMES:
      raise SpecjaxError(f"config field `drafters`: drafter name {name!r}: expected one of {', '.join(DRAFTER_NAMES)}")
  check_template(config.template)
  if config.max_prompts_per_language < 0:
    raise SpecjaxError(
      f"config field `max_prompts_per_language`={config.max_prompts_per_language}: must be >= 0 (0 = all)"
    )
  if config.drafter_sharding not in ("replicated", "sharded"):
    raise SpecjaxError(
      f"config field `drafter_sharding`={config.drafter_sharding!r}: expected 'replicated' or 'sharded'"
    )
  if not tuple(config.temperatures) or any(float(t) < 0 for t in config.temperatures):
    raise SpecjaxError(f"config field `temperatures`={tuple(config.temperatures)}: need at least one, each >= 0")
  if not tuple(config.seeds):
    raise SpecjaxError("config field `seeds` is empty")


def _select_questions(questions: list[dict], per_category: int) -> list[dict]:
  """The first `per_category` questions of each category (0 = all), in file order."""

  return first_per_category(questions, per_category)


def _read_references(
  reference_paths: dict[str, str], all_questions: list[dict], kept: list[dict]
) -> dict[str, list[str]]:
  """Reference lines per category, checked against every question of that category, then cut to
  the questions kept (max_prompts_per_language keeps the first ones)."""
  out = {}
  for category, path in reference_paths.items():
    lines = read_reference_file(path)
    total = sum(q["category"] == category for q in all_questions)
    if total == 0:
      raise SpecjaxError(
        f"config field `references`: category {category!r} ({path}) has no questions; "
        f"categories: {', '.join(dict.fromkeys(q['category'] for q in all_questions))}"
      )
    if len(lines) != total:
      raise SpecjaxError(
        f"config field `references`: {path}: {len(lines)} lines for {total} questions of category {category!r}"
      )
    out[category] = lines[: sum(q["category"] == category for q in kept)]
  return out


def answers_file_name(answer: dict) -> str:
  return f"{answer['model_id']}-T{answer['temperature']:g}-seed{answer['seed']}.jsonl"


def run(config, workdir: str) -> dict:
  """Runs the job; returns what it writes to WORKDIR/metrics.json."""
  paths = {field: workdir_path(config, field, workdir) for field in ("target", "tokenizer", "prompts")}
  drafter_paths = named_paths(config.drafters, "drafters", workdir)
  _check_config(config, paths, drafter_paths)
  runs = runs_from_config(config, list(drafter_paths))
  reference_paths = named_paths(config.references, "references", workdir)
  if config.local_assets and not glob.has_magic(paths["prompts"]) and "," not in paths["prompts"]:
    local_assets.ensure_question_file(paths["prompts"])  # a glob or list names real files: never write there
  try:  # before the models load: a bad file fails fast
    all_questions = read_prompt_files(paths["prompts"])
  except SpecjaxError as e:
    raise SpecjaxError(f"config field `prompts`: {e}") from None
  questions = _select_questions(all_questions, config.max_prompts_per_language)
  references = _read_references(reference_paths, all_questions, questions)
  if config.local_assets:
    local_assets.ensure_checkpoints(
      [(paths["target"], LOCAL_PRESETS["target"])]
      + [(path, LOCAL_PRESETS["drafter"]) for path in drafter_paths.values() if not path.startswith("preset:")]
    )
  if config.compilation_cache:
    # Drafters of one architecture then compile once: the programs differ only in weights.
    jax.config.update("jax_compilation_cache_dir", workdir_path(config, "compilation_cache", workdir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  for name, path in drafter_paths.items():  # every checkpoint checked before any loads
    check_checkpoint(path, f"config field `drafters` ({name})")
  writer = jax.process_index() == 0
  progress = _journal(config, workdir, questions, writer)  # an unwritable workdir fails here, before any load
  done = {tuple(u["key"]): u for u in progress.units}
  units = work_units(
    questions,
    normalize_runs(runs, list(drafter_paths)),
    tuple(config.temperatures),
    tuple(config.seeds),
    tuple(config.greedy_seeds),
  )
  todo = [u for u in units if unit_key(*u) not in done]
  if done:
    console.info(
      "eval_specbench: resuming %s: %d of %d units done, %d to decode",
      progress.path,
      len(units) - len(todo),
      len(units),
      len(todo),
    )
  mesh = job_mesh(config)
  tokenizer = target = None
  drafters = {name: None for name in drafter_paths}
  if todo:
    tokenizer, target, drafters = _load(config, paths, drafter_paths, mesh)

  def on_unit(unit):
    file = fileio.join(workdir, "answers", answers_file_name(unit["answers"][0]))
    progress.append(unit, {file: unit["answers"]})

  records, answers = evaluate(
    target,
    tokenizer,
    drafters,
    questions,
    runs=runs,
    temperatures=tuple(config.temperatures),
    seeds=tuple(config.seeds),
    greedy_seeds=tuple(config.greedy_seeds),
    decoding=DecodingSettings.from_config(config),
    template=config.template,
    system_prompt=config.system_prompt,
    mesh=mesh,
    done=done,
    on_unit=on_unit,
  )

  files: dict[str, list[dict]] = {}
  for answer in answers:
    files.setdefault(answers_file_name(answer), []).append(answer)
  bleu = {name[: -len(".jsonl")]: bleu_chrf(group, references) for name, group in files.items()} if references else {}
  device = jax.devices()[0]
  hardware = {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
  }
  out = {"job": "eval_specbench", "records": records, "bleu": bleu, "hardware": hardware, "config": config.to_dict()}
  if writer:
    target_name = os.path.basename(paths["target"].rstrip("/"))
    try:
      _write(
        workdir,
        files,
        out,
        title=f"Multilingual Spec-Bench: {target_name} on {jax.device_count()} x {device.device_kind}",
        notes=_notes(config, drafter_paths, len(questions)),
      )
    except OSError as e:
      raise SpecjaxError(
        f"{workdir}: writing the answers, metrics.json and report failed ({e.strerror or e}); "
        f"every unit is in {progress.path}: free space and rerun the same command"
      ) from None
  console.info("eval_specbench: %d records, %d answer files; wrote %s", len(records), len(files), workdir)
  return out


def _echo(config) -> dict:
  """The settings a resume must share, as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in NOT_ECHOED}))


def _journal(config, workdir: str, questions: list[dict], writer: bool) -> journal.Journal:
  """WORKDIR/answers.progress.jsonl; the answer files rewritten from its finished units (an earlier
  run's other files in WORKDIR/answers/ removed, so appends never land after stale lines)."""
  answers_dir = fileio.join(workdir, "answers")

  def outputs(units):
    files: dict[str, list[dict]] = {}
    for unit in units:
      for answer in unit["answers"]:
        files.setdefault(fileio.join(answers_dir, answers_file_name(answer)), []).append(answer)
    if writer:
      fileio.makedirs(answers_dir, exist_ok=True)
      for stale in fileio.glob(fileio.join(answers_dir, "specjax-*-T*-seed*.jsonl")):
        if stale not in files:
          fileio.remove(stale)
    return files

  progress = journal.Journal(
    workdir,
    {"config": _echo(config), "question_ids": [q["question_id"] for q in questions]},
    job="eval_specbench",
    kind="unit",
    required=("key", "record", "answers"),
    explain={"question_ids": "answered other questions (the prompt files changed)"},
    outputs=outputs,
    writer=writer,
  )
  progress.check_processes_agree("units")
  return progress


def _load(config, paths: dict, drafter_paths: dict[str, str], mesh):
  """(tokenizer, target, drafters by name), the target checked before its tokenizer loads."""

  def check_vocabulary(name, path, drafter, target):
    if drafter.config.vocab_size != target.config.vocab_size:
      raise SpecjaxError(
        f"config field `drafters`: drafter {name!r} ({path}) has a vocabulary of "
        f"{drafter.config.vocab_size} tokens, the target ({paths['target']}) "
        f"{target.config.vocab_size}; a drafter must share the target's tokenizer"
      )

  tokenizer, target, _, drafters = load_target_and_drafters(
    config, paths["target"], drafter_paths, mesh, tokenizer_path=paths["tokenizer"], check_drafter=check_vocabulary
  )
  return tokenizer, target, drafters


def _notes(config, drafter_paths: dict[str, str], num_questions: int) -> list[str]:
  """What the report needs to be reproduced: the command line and the settings behind it."""
  gamma = f"γ={config.gamma}" + (f" (dynamic, start {config.gamma_start})" if config.dynamic_gamma else "")
  if config.get("lookup_drafts"):
    gamma += ", drafter runs take prompt lookup's drafts first where an n-gram matches (lookup_drafts)"
  drafters = ", ".join(f"{name} = {path}" for name, path in drafter_paths.items()) or "none"
  return [
    f"Command: `python -m specjax.main {' '.join(sys.argv[1:])}`",
    f"Drafters: {drafters}",
    (
      f"{gamma}, max_new_tokens={config.max_new_tokens}, template {config.template}, dtype {config.dtype}, "
      f"batch size {config.batch_size}, {num_questions} questions"
    ),
  ]


def _write(workdir: str, files: dict[str, list[dict]], out: dict, title: str, notes: list[str]) -> None:

  answers_dir = fileio.join(workdir, "answers")
  fileio.makedirs(answers_dir, exist_ok=True)
  for stale in fileio.glob(fileio.join(answers_dir, "specjax-*-T*-seed*.jsonl")):  # an earlier run's, here
    if os.path.basename(stale) not in files:
      fileio.remove(stale)
  for name, answers in files.items():
    with fileio.open(fileio.join(answers_dir, name), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(answer, ensure_ascii=False) + "\n" for answer in answers)
  with fileio.open(fileio.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
    f.write("\n")
  report.write_report(out["records"], workdir, title, notes=notes)
  for temperature in sorted({r["temperature"] for r in out["records"]}):
    report.print_table(out["records"], temperature)
