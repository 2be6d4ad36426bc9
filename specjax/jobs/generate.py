"""The `generate` job: Spec-Bench prompts through a target (and drafter), answers and metrics out.

Spec-Bench's multi-turn protocol is specjax.decoding.conversations', as in the evaluation harness
(specjax.eval.specbench, which decodes through the same `Conversations`): this job is its
single-run case, one method at one sampling setting over every question in file order, batched
as given, with its answers flat per turn. All questions' turn t are decoded before turn t+1. One
`Decoder` serves every call, so each prompt-length bucket compiles once, and a warm-up call per
new program keeps compile time out of tokens/s (it is reported apart). Generation stops at the
stop ids every decoding job uses (`stop_ids`: the checkpoint's EOS list and the tokenizer's).

Nothing computed is thrown away: each finished batch's answers are appended to
WORKDIR/answers.jsonl at once (flushed to disk), and the batch (answers, decode counters) to
WORKDIR/answers.progress.jsonl (specjax.journal, shared with eval_specbench), a journal whose first
line records the config. A rerun of the same
command reads the journal, skips every finished batch and decodes the rest with the same batches
(and so the same padded shapes and row ids): its answers equal an uninterrupted run's. A journal
from other settings is an error naming them, not something mixed in. Writing is tried before the
models load, so an unwritable workdir fails in a second, not after decoding.
"""

from __future__ import annotations

import json

import jax
from tqdm import tqdm

from specjax import console, fileio, journal
from specjax.config_utils import workdir_path
from specjax.decoding import engine, metrics
from specjax.decoding.conversations import Conversations, warm_up
from specjax.decoding.decoder import Decoder, DecodingSettings, stop_ids
from specjax.decoding.prompts import check_template, read_prompt_files
from specjax.errors import SpecjaxError
from specjax.jobs import local_assets
from specjax.eval.routing import route
from specjax.eval.specbench import DRAFTER_NAMES, ROUTED
from specjax.jobs.common import job_mesh, load_target_and_drafters, named_paths
from specjax.jobs.local_assets import LOCAL_PRESETS
from specjax.models.hf import check_checkpoint

ANSWERS = "answers.jsonl"
JOURNAL = journal.NAME
# Fields that do not change a single answer; every other field must match the journal's to resume.
NOT_ECHOED = ("warmup",)


def _check_config(config, paths: dict[str, str | None]) -> None:
  """Mistakes that would otherwise surface only after the models load."""
  if not paths["target"]:
    raise SpecjaxError(
      "config field `target` is not set: give a Hugging Face checkpoint directory "
      "(--config.target=DIR) or preset:NAME, or use configs/generate.py:runlocal"
    )
  if config.method not in engine.METHODS:
    raise SpecjaxError(f"config field `method`={config.method!r}: expected one of {', '.join(engine.METHODS)}")
  if config.method == "sps" and not paths["drafter"]:
    raise SpecjaxError(
      "method 'sps' needs a drafter: set config field `drafter` (--config.drafter=DIR), or use method=ar or method=pld"
    )
  if config.method == "sps" and paths["drafter"] == ROUTED and not paths["drafters"]:
    raise SpecjaxError(
      f"config field `drafter`={ROUTED!r} routes each question to a drafter of config field `drafters`, "
      "which is not set: give --config.drafters=general=DIR,de=DIR,..."
    )
  for name in paths["drafters"]:
    if name not in DRAFTER_NAMES:
      raise SpecjaxError(f"config field `drafters`: drafter name {name!r}: expected one of {', '.join(DRAFTER_NAMES)}")
  if not paths["prompts"]:
    raise SpecjaxError("config field `prompts` is not set: give a Spec-Bench question.jsonl path or glob")
  check_template(config.template)
  if config.drafter_sharding not in ("replicated", "sharded"):
    raise SpecjaxError(
      f"config field `drafter_sharding`={config.drafter_sharding!r}: expected 'replicated' or 'sharded'"
    )
  if config.max_prompts < 0:
    raise SpecjaxError(f"config field `max_prompts`={config.max_prompts}: must be >= 0 (0 = all)")


def run(config, workdir: str) -> dict:
  """Runs the job (resuming a killed run of the same command); returns the metrics that it
  writes to WORKDIR/metrics.json."""
  paths = {field: workdir_path(config, field, workdir) for field in ("target", "drafter", "tokenizer", "prompts")}
  paths["drafters"] = named_paths(config.get("drafters"), "drafters", workdir)
  _check_config(config, paths)
  if config.local_assets:
    local_assets.ensure_question_file(paths["prompts"])
  questions = read_prompt_files(paths["prompts"])  # before the models load: a bad file fails fast
  if config.max_prompts:
    questions = questions[: config.max_prompts]
  writer = jax.process_index() == 0
  progress = Journal(workdir, _echo(config), [q["question_id"] for q in questions], writer)  # fails before decoding
  progress.check_processes_agree("batches")
  plan = _plan(questions, config.batch_size)
  todo = [b for b in plan if (b["turn"], b["lo"]) not in progress.batches]
  if progress.batches:
    console.info(
      "generate: resuming %s: %d of %d batches done, %d to decode",
      progress.path,
      len(plan) - len(todo),
      len(plan),
      len(todo),
    )

  answers, results, categories = [], [], []
  compile_s = sum(b["compile_s"] for b in progress.batches.values())
  decoder = tokenizer = routed = None
  if todo:
    if config.local_assets:
      checkpoints = [(paths["target"], LOCAL_PRESETS["target"])]
      checkpoints += [(path, LOCAL_PRESETS["drafter"]) for path in _drafter_paths(config, paths).values()]
      local_assets.ensure_checkpoints(
        [(path, preset) for path, preset in checkpoints if not path.startswith("preset:")]
      )
    tokenizer, decoder, decoder_names = _load(config, paths)
    if config.method == "sps" and paths["drafter"] == ROUTED:  # each question's drafter, by its language
      routed = {i: decoder_names.index(_route(q, decoder_names)) for i, q in enumerate(questions)}
  conversations = Conversations(questions, tokenizer, config.template, config.system_prompt)
  sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=config.seed)
  if decoder is not None:
    sampling["eos_id"] = stop_ids(decoder.target_config, tokenizer)
  compiled = set()
  bar = tqdm(
    total=sum(len(b["rows"]) for b in plan),
    initial=sum(len(b["rows"]) for b in plan if b not in todo),
    unit="prompt",
    desc=f"generate ({config.method})",
    disable=not writer,
  )
  for turn in range(max(len(q["turns"]) for q in questions)):
    batches = [b for b in plan if b["turn"] == turn]
    warm = 0.0
    if any((turn, b["lo"]) not in progress.batches for b in batches):
      # Every prompt of the turn, rendered before any of its answers is recorded; b["lo"] indexes them.
      prompts, names = conversations.prompts([i for b in batches for i in b["rows"]], turn)
      if config.warmup:  # the program of every batch of the turn, as an uninterrupted run compiles them
        starts = [b["lo"] for b in batches]
        warm = warm_up(
          decoder,
          [prompts[lo : lo + config.batch_size] for lo in starts],
          [names[lo] for lo in starts],
          compiled,
          **sampling,
        )
        compile_s += warm
    for b in batches:
      done = progress.batches.get((turn, b["lo"]))
      if done is None:
        rows = slice(b["lo"], b["lo"] + len(b["rows"]))
        batch_sampling = sampling if routed is None else {**sampling, "drafter_index": [routed[i] for i in b["rows"]]}
        done = _decode_batch(decoder, conversations, questions, b, prompts[rows], names[rows], batch_sampling, warm)
        if routed is not None:
          for i, answer in zip(b["rows"], done["answers"]):
            answer["drafter"] = decoder_names[routed[i]]
        warm = 0.0  # the turn's compile time is journaled with its first decoded batch
        progress.append(done)
        bar.update(len(b["rows"]))
      else:
        conversations.record(b["rows"], turn, [answer["text"] for answer in done["answers"]])
      results.append(done["result"])
      categories.append([questions[i]["category"] for i in b["rows"]])
      answers += done["answers"]
  bar.close()

  order = {q["question_id"]: i for i, q in enumerate(questions)}
  answers.sort(key=lambda a: (order[a["question_id"]], a["turn"]))
  out = {
    "job": "generate",
    "method": config.method,
    "prompts": len(questions),
    "generations": len(answers),
    "compile_s": compile_s,
    "dtype": config.dtype,
    "exactness": exactness(config.method, config.dtype),
    "hardware": {
      "device_kind": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
    },
    **metrics.aggregate(results, categories),
    "config": config.to_dict(),
  }
  if writer:
    progress.finish(answers, out)
  rate = out["acceptance_rate"]
  console.info(
    "generate: %d answers, %d new tokens in %.2f s (%.1f tokens/s), tau %.3f, acceptance %s, compile %.1f s; wrote %s",
    len(answers),
    out["new_tokens"],
    out["wall_s"],
    out["tokens_per_second"] or 0.0,
    out["tau"],
    "n/a" if rate is None else f"{rate:.3f}",
    compile_s,
    workdir,
  )
  return out


def _drafter_paths(config, paths) -> dict[str, str]:
  """The drafters to load by name: none (ar, pld), config field `drafter`, or with drafter=auto
  every one of config field `drafters`."""
  if config.method != "sps":
    return {}
  return dict(paths["drafters"]) if paths["drafter"] == ROUTED else {"drafter": paths["drafter"]}


def _route(question: dict, names: list[str]) -> str:
  name = route(question, available=names)
  if name not in names:
    raise SpecjaxError(
      f"{question['source']}: drafter=auto routes question {question['question_id']!r} to drafter "
      f"{name!r}, which config field `drafters` does not name ({', '.join(names)}); add a {name!r} drafter"
    )
  return name


def _load(config, paths):
  """(tokenizer, Decoder, drafter names): with drafter=auto one routed Decoder over all of them."""
  drafter_paths = _drafter_paths(config, paths)
  for name, path in drafter_paths.items():  # every checkpoint checked before any loads
    check_checkpoint(path, "config field `drafter`" if name == "drafter" else f"config field `drafters` ({name})")
  mesh = job_mesh(config)
  tokenizer, target, _, drafters = load_target_and_drafters(
    config, paths["target"], drafter_paths, mesh, tokenizer_path=paths["tokenizer"]
  )
  names = list(drafters)
  drafter = None if not names else drafters[names[0]] if len(names) == 1 else [drafters[n] for n in names]
  decoder = Decoder(target, drafter, DecodingSettings.from_config(config), mesh=mesh)
  return tokenizer, decoder, names


def _plan(questions: list[dict], batch_size: int) -> list[dict]:
  """The batches of an uninterrupted run: per turn, the questions that have it, cut every batch_size."""
  plan = []
  for turn in range(max(len(q["turns"]) for q in questions)):
    active = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
    plan += [{"turn": turn, "lo": lo, "rows": active[lo : lo + batch_size]} for lo in range(0, len(active), batch_size)]
  return plan


def _decode_batch(decoder, conversations, questions, batch, prompts, names, sampling, compile_s) -> dict:
  turn, rows = batch["turn"], batch["rows"]
  result, turn_answers, _ = conversations.decode(decoder, rows, turn, prompts, names, **sampling)
  answers = [
    {
      "question_id": questions[i]["question_id"],
      "category": questions[i]["category"],
      "turn": turn,
      "text": a.text,
      "token_ids": a.token_ids,
      "new_tokens": len(a.token_ids),
      "steps": a.steps,
      "accepted": a.accepted,
      "tau": a.tau,
      "wall_s": result.wall_s,
    }
    for i, a in zip(rows, turn_answers)
  ]
  return {
    "turn": turn,
    "lo": batch["lo"],
    "rows": list(rows),
    "answers": answers,
    "result": result,
    "compile_s": compile_s,
  }


def _echo(config) -> dict:
  """The settings a resume must share, as they read back from JSON (tuples become lists)."""
  return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in NOT_ECHOED}))


# --- the journal (specjax.journal): answers and decode counters of every finished batch ---------


class Journal(journal.Journal):
  """WORKDIR/answers.progress.jsonl (line 1: the settings and question ids; then one line per
  finished batch: its answers and DecodeResult) and WORKDIR/answers.jsonl (answers as they
  finish; sorted when the job ends). `batches`: the finished ones by (turn, first row)."""

  def __init__(self, workdir: str, echo: dict, question_ids: list, writer: bool = True):
    self.answers_path = fileio.join(workdir, ANSWERS)
    super().__init__(
      workdir,
      {"config": echo, "question_ids": question_ids},
      job="generate",
      kind="batch",
      required=("turn", "lo", "rows", "answers", "result"),
      explain={"question_ids": "answered other questions (the prompt files changed)"},
      outputs=lambda units: {self.answers_path: [a for u in units for a in u["answers"]]},
      writer=writer,
    )
    self.batches: dict[tuple[int, int], dict] = {(u["turn"], u["lo"]): u for u in self.units}

  def append(self, batch: dict) -> None:
    """A finished batch: its answers to answers.jsonl, then the batch to the journal (which makes it done)."""
    self.batches[(batch["turn"], batch["lo"])] = batch
    super().append(batch, {self.answers_path: batch["answers"]})

  def finish(self, answers: list[dict], out: dict) -> None:
    """answers.jsonl in question order, and metrics.json (the journal stays: a rerun does nothing)."""
    try:
      _write(self.workdir, answers, out)
    except OSError as e:
      raise SpecjaxError(
        f"{self.workdir}: writing answers.jsonl and metrics.json failed ({e.strerror or e}); "
        f"the answers are in {self.path}: free space and rerun the same command"
      ) from None


def exactness(method: str, dtype: str) -> str:
  """What speculative output is guaranteed to equal, in this dtype (metrics.json says it)."""
  if method == "ar":
    return "plain decoding"
  if dtype == "float32":
    return (
      "greedy: token-identical to plain greedy decoding (float32); sampled: the target's distribution, "
      "exactly (rejection sampling)"
    )
  return (
    f"greedy in {dtype}: equal to plain greedy decoding except at near-ties, which a {dtype} verification "
    "of γ+1 tokens and a one-token step can round differently (float32 is token-identical); sampled: the "
    "target's distribution, exactly (rejection sampling)"
  )


def _write(workdir: str, answers: list[dict], out: dict) -> None:
  fileio.makedirs(workdir, exist_ok=True)
  journal.rewrite(fileio.join(workdir, ANSWERS), answers)
  tmp = fileio.join(workdir, "metrics.json.tmp")
  with fileio.open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
    f.write("\n")
  fileio.replace(tmp, fileio.join(workdir, "metrics.json"))
