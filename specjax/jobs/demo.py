"""The paper's recipe in miniature (job `demo`; `make demo`): a target, self-distillation, drafters,
evaluation per language, a report.

With a real target (config field `target`: a checkpoint directory, a .gguf file or `smollm2`,
the default):
1. The target, imported once into WORKDIR/target (a GGUF file dequantised to float32).
2. Self-distillation data: its own translations of the training sources, in its chat template.
3. Reduced vocabularies (specjax.models.draft_vocab): per language, the tokens of
   `draft_vocab_coverage` of the target's responses, all padded to one size.
4. A general drafter: the target's embeddings, final norm and `drafter_layers`
   (specjax.models.derive), trained on monolingual text of every language.
5. One drafter per language finetuned from the general one on the target's outputs (P+F).
Without one (scale=scratch, tiny, mini_*), steps 1-2 are a byte-level BPE tokenizer and a small
target trained from scratch to translate X->English, and drafters start from random weights.
6. Evaluation on held-out sentences never used in training: plain decoding, prompt lookup,
   the general drafter and every language's drafter on every language (the cross-language
   matrix) at T=0; plain, prompt lookup, general and routed (`auto`: each prompt's own language
   drafter) at T=1 over several seeds. WORKDIR/report/ holds report.md, the plots and
   summary.json (speedup and τ per temperature, method and language).

Every stage leaves a DONE file; a killed demo rerun with the same command resumes at the first
unfinished stage (and inside a training stage, at its last checkpoint).
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import ml_collections
import numpy as np

from specjax.config_utils import workdir_path
from specjax.data.parallel import EMBEDDED_CORPUS, LANGS, load_pairs, translation_message
from specjax.data.selfdistill import read_records
from specjax.decoding.decoder import stop_ids
from specjax.errors import SpecjaxError
from specjax.eval import report, specbench
from specjax.eval.report import speedups
from specjax.jobs import distill_data
from specjax.jobs import train as train_job
from specjax.jobs.local_assets import TEMPLATE_TEXT
from specjax.models.config import LlamaConfig
from specjax.models.derive import drafter_from_target
from specjax.models.draft_vocab import choose_token_ids, coverage_of, draft_token_ids, save_draft_vocab
from specjax.models.hf import load_model, load_tokenizer, save_hf_checkpoint
from specjax.models.tokenizer_utils import make_random_checkpoint, train_tokenizer
from specjax.train.acceptance import first_per_category
from specjax.train.defaults import trainer_config
from specjax.train.writers import read_metrics


def _model_config(fields) -> LlamaConfig:
  return LlamaConfig(vocab_size=0, **dict(fields))


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "DONE"))


def _mark_done(path: str, info: dict | None = None) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "DONE"), "w") as f:
    json.dump(info or {}, f)


def _stage(name: str, path: str, fn):
  """Runs fn() unless `path` holds DONE; logs the stage's wall time."""
  if _done(path):
    print(f"[demo] {name}: done earlier ({path})", flush=True)
    return
  start = time.perf_counter()
  print(f"[demo] {name} ...", flush=True)
  info = fn() or {}
  _mark_done(path, {"seconds": time.perf_counter() - start, **info})
  print(f"[demo] {name}: {time.perf_counter() - start:.0f} s", flush=True)


def _trainer_config(config, job: str, **fields):

  c = trainer_config(job)
  c.update(
    data_dir=config.data_dir,
    template=config.template,
    dtype="float32",
    target_dtype="float32",
    shuffle_buffer_size=2000,
    log_every=config.log_every,
    eval_every=0,
    eval_batches=0,
    tensorboard=config.tensorboard,
    acceptance_prompts="",
    checkpoint_every=100_000,
    warmup_fraction=0.05,
    pretrain_source="local",
    translate_source=config.data,
    seed=config.seed,
  )
  c.update(fields)
  return c


def _distill_config(config, lang: str, target_dir: str, data_dir: str):
  """configs/distill_data.py's fields for one language of the demo."""

  return ml_collections.ConfigDict(
    dict(
      job="distill_data",
      target=target_dir,
      tokenizer=None,
      dtype="float32",
      data_dir=data_dir,
      src=lang,
      tgt="en",
      num_sources=config.distill_sources,
      template=config.template,
      temperatures=tuple(config.distill_temperatures),
      max_new_tokens=config.get("distill_max_new_tokens") or config.max_new_tokens,
      batch_size=config.distill_batch_size,
      seed=config.seed,
      max_cache_len=None,
      prompt_bucket=config.prompt_bucket,
      mesh_shape=(1, -1, 1),
      num_shards=4,
      max_shards_this_run=0,
      local_assets=False,
    )
  )


def _shown_path(path: str) -> str:
  """A path as a report shows it: the embedded corpus by name, others relative to the working
  directory when inside it (a report carries no machine's absolute paths)."""
  if os.path.abspath(path) == os.path.abspath(EMBEDDED_CORPUS):
    return "the embedded corpus (specjax/assets/corpus)"
  rel = os.path.relpath(path)
  return path if rel.startswith("..") and not path.startswith("..") else rel


def _heldout_questions(config, data_dir: str) -> list[dict]:
  questions = []
  for lang in config.langs:
    pairs = load_pairs(data_dir, lang, "eval", config.eval_prompts_per_language)
    questions += [
      {
        "question_id": f"heldout_{lang}en_{i}",
        "category": f"{lang}en",
        "turns": [translation_message(lang, "en", x)],
        "reference": en,
      }
      for i, (x, en) in enumerate(pairs)
    ]
  return questions


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns the evaluation records and the report's path."""

  if jax.process_count() > 1:
    raise SpecjaxError("the demo runs in one process (its models are small); drop SPECJAX_DISTRIBUTED")
  langs = tuple(config.langs)
  if not langs or set(langs) - set(LANGS):
    raise SpecjaxError(f"config field `langs`={langs}: expected a non-empty subset of {', '.join(LANGS)}")
  if config.data not in ("local", "tfds"):
    raise SpecjaxError(f"config field `data`={config.data!r}: expected local or tfds")
  data_dir = workdir_path(config, "data_dir", workdir)
  config.unlock()
  config.data_dir = data_dir
  for lang in langs:  # fail now, naming the file, rather than inside a stage
    load_pairs(data_dir, lang, "eval", 1)
  os.makedirs(workdir, exist_ok=True)
  path = lambda *p: os.path.join(workdir, *p)
  started = time.perf_counter()

  if config.target:
    _real_target_pipeline(config, langs, data_dir, path, started)
    return _evaluate_and_report(config, langs, data_dir, path, started, path("target"))

  def tokenizer_stage():
    texts = []
    for lang in langs:
      for x, en in load_pairs(data_dir, lang, "train"):
        texts += [x, en]

    tok = train_tokenizer([TEMPLATE_TEXT] + texts, config.vocab_size, path("tokenizer"))
    return {"vocab_size": len(tok)}

  _stage("tokenizer", path("tokenizer"), tokenizer_stage)
  tokenizer = load_tokenizer(path("tokenizer"))

  # 2. The target: a translator X->en trained from random weights.
  def target_stage():
    make_random_checkpoint(
      path("target_init"), _model_config(config.target_model), tokenizer=tokenizer, seed=config.seed
    )
    c = _trainer_config(
      config,
      "pretrain",
      drafter=path("target_init"),
      tokenizer=path("tokenizer"),
      mixture="finetune_multilingual",
      selfdistill_dir=None,
      num_train_steps=config.target_steps,
      batch_size=config.batch_size,
      sequence_length=config.sequence_length,
      learning_rate=config.target_lr,
    )
    out = train_job.run(c, path("target_train"))
    return {"final_loss": out.get("loss")}

  _stage("train the target", path("target_train"), target_stage)
  target_dir = path("target_train", "drafter")

  # 3. Self-distillation data, one distill_data workdir per language.

  for lang in langs:

    def one(lang=lang):
      return distill_data.run(_distill_config(config, lang, target_dir, data_dir), path("selfdistill", lang))

    _stage(f"self-distillation data {lang}->en", path("selfdistill", lang), one)

  # 4. The general drafter: monolingual text of every language.
  drafter_init = path("drafter_init")
  if not os.path.exists(os.path.join(drafter_init, "config.json")):
    make_random_checkpoint(drafter_init, _model_config(config.drafter_model), tokenizer=tokenizer, seed=config.seed + 1)

  _train_drafters(config, langs, path, target_dir, drafter_init, tokenizer_dir=path("tokenizer"))

  return _evaluate_and_report(config, langs, data_dir, path, started, target_dir)


def _finetune_config(
  config, path, target_dir, lang, steps, start, acceptance_prompts=4, acceptance_gamma=None, **fields
):
  return _trainer_config(
    config,
    "finetune",
    drafter=start,
    target=target_dir,
    tokenizer=target_dir,
    mixture=f"finetune_{lang}_en",
    selfdistill_dir=path("selfdistill"),
    num_train_steps=steps,
    batch_size=config.batch_size,
    sequence_length=config.sequence_length,
    learning_rate=config.finetune_lr,
    eval_every=steps if config.acceptance_during_training else 0,
    eval_at_start=True,
    acceptance_prompts=f"heldout:{lang}",
    acceptance_prompts_per_language=acceptance_prompts,
    acceptance_temperatures=(0.0,),
    acceptance_gamma=acceptance_gamma or config.gamma,
    acceptance_max_new_tokens=config.max_new_tokens,
    acceptance_batch_size=4,
    **fields,
  )


def _real_target_pipeline(config, langs, data_dir, path, started) -> None:
  """Stages 1-5 for a real checkpoint: import it, distil, choose each language's vocabulary,
  build the general drafter from the target's own embeddings and lowest layers, pretrain it on the
  corpus's text, finetune one per language on the target's outputs."""

  target_dir = path("target")

  def import_stage():  # one conversion (GGUF dequantised to float32): every later load is a memory map
    model, cfg = load_model(config.target, "float32")
    save_hf_checkpoint(model, cfg, target_dir, tokenizer=load_tokenizer(config.target))
    return {"source": config.target, "parameters": cfg.num_params}

  _stage(f"import the target ({config.target})", target_dir, import_stage)

  for lang in langs:

    def one(lang=lang):
      c = _distill_config(config, lang, target_dir, data_dir)
      return distill_data.run(c, path("selfdistill", lang))

    _stage(f"self-distillation data {lang}->en", path("selfdistill", lang), one)

  def vocab_stage():
    return _choose_vocabularies(config, langs, path, target_dir)

  if config.draft_vocab_coverage:
    _stage("draft vocabularies", path("draft_vocab"), vocab_stage)

  drafter_init = path("drafter_init")
  if not os.path.exists(os.path.join(drafter_init, "config.json")):
    drafter_from_target(target_dir, tuple(config.drafter_layers), drafter_init)

  _train_drafters(config, langs, path, target_dir, drafter_init, tokenizer_dir=target_dir, with_vocab=True)


def _train_drafters(config, langs, path, target_dir, drafter_init, *, tokenizer_dir, with_vocab=False) -> None:
  """The recipe's P and F: the general drafter pretrained from `drafter_init` on monolingual text
  of every language, then one drafter per language finetuned from it on the target's outputs
  (each over its reduced vocabulary when `with_vocab` and config.draft_vocab_coverage)."""
  vocab = lambda name: path("draft_vocab", name) if with_vocab and config.draft_vocab_coverage else ""

  def general_stage():
    c = _trainer_config(
      config,
      "pretrain",
      drafter=drafter_init,
      tokenizer=tokenizer_dir,
      mixture="pretrain_multilingual",
      num_train_steps=config.pretrain_steps,
      batch_size=config.batch_size,
      sequence_length=config.sequence_length,
      learning_rate=config.drafter_lr,
      draft_vocab=vocab("general"),
    )
    train_job.run(c, path("drafters", "general"))

  _stage("pretrain the general drafter", path("drafters", "general"), general_stage)
  general = f"run:{path('drafters', 'general')}"
  for lang in langs:
    _stage(
      f"finetune the {lang} drafter",
      path("drafters", lang),
      lambda lang=lang: train_job.run(
        _finetune_config(config, path, target_dir, lang, config.finetune_steps, general, draft_vocab=vocab(lang)),
        path("drafters", lang),
      ),
    )


def _choose_vocabularies(config, langs, path, target_dir) -> dict:
  """Each language's reduced vocabulary from the target's responses in it; the general drafter's
  from all of them. Returns each one's size and how much of its responses it covers."""

  target_config = LlamaConfig.from_hf_json(os.path.join(target_dir, "config.json"))
  stops = target_config.stop_token_ids
  responses = {lang: [r["response_token_ids"] for r in read_records(path("selfdistill", lang))] for lang in langs}
  info = {}
  groups = [(lang, responses[lang]) for lang in langs] + [("general", sum(responses.values(), []))]
  # One size for all (the largest): same-shaped drafters share one compiled decoding loop.
  size = max(
    len(choose_token_ids(rows, target_config.vocab_size, config.draft_vocab_coverage, always=stops))
    for _, rows in groups
  )
  for name, rows in groups:
    ids = choose_token_ids(rows, target_config.vocab_size, config.draft_vocab_coverage, always=stops, min_size=size)
    save_draft_vocab(path("draft_vocab", name), ids, {"coverage": config.draft_vocab_coverage, "responses": len(rows)})
    info[name] = {"size": int(len(ids)), "coverage": coverage_of(ids, rows)}
    print(
      f"[demo] draft vocabulary {name}: {len(ids)} tokens cover {info[name]['coverage']:.3f} of the target's responses",
      flush=True,
    )
  return info


def evaluation_settings(config, target, tokenizer) -> dict:
  """specbench.evaluate's keyword settings for a demo config (benchmarks/mini_paper.py uses them
  for the Spec-Bench prompts too): batch 1, the config's γ, budget, template and lookup_drafts."""
  return dict(
    gamma=config.gamma,
    max_new_tokens=config.max_new_tokens,
    template=config.template,
    batch_size=1,
    eos_id=stop_ids(target.config, tokenizer),
    prompt_bucket=config.prompt_bucket,
    lookup_drafts=config.lookup_drafts,
  )


def _evaluate_and_report(config, langs, data_dir, path, started, target_dir) -> dict:
  """Stage 6: every method on the held-out prompts at T=0 and T=1, the report and summary.json."""

  tokenizer = load_tokenizer(target_dir)
  questions = _heldout_questions(config, data_dir)
  target, _ = load_model(target_dir, "float32")
  drafters = {name: load_model(path("drafters", name, "drafter"), "float32")[0] for name in ("general",) + langs}
  common = evaluation_settings(config, target, tokenizer)
  sampled_questions = first_per_category(questions, config.sampled_prompts_per_language)

  def evaluate_stage():  # minutes at the mini paper's scale: kept, so a rerun goes straight to the report
    records, answers = specbench.evaluate(
      target,
      tokenizer,
      drafters,
      questions,
      temperatures=(0.0,),
      seeds=(config.seed,),
      runs=[("ar", None), ("pld", None), ("sps", "general")] + [("sps", lang) for lang in langs] + [("sps", "auto")],
      **common,
    )
    sampled, sampled_answers = specbench.evaluate(
      target,
      tokenizer,
      drafters,
      sampled_questions,
      temperatures=(1.0,),
      seeds=tuple(config.sampling_seeds),
      runs=[("ar", None), ("pld", None), ("sps", "general"), ("sps", "auto")],
      **common,
    )
    os.makedirs(path("eval"), exist_ok=True)
    with open(path("eval", "records.json"), "w", encoding="utf-8") as f:
      json.dump({"records": records + sampled, "answers": answers + sampled_answers}, f, ensure_ascii=False)

  _stage("evaluate on held-out prompts", path("eval"), evaluate_stage)
  with open(path("eval", "records.json"), encoding="utf-8") as f:
    evaluated = json.load(f)
  records, answers = evaluated["records"], evaluated["answers"]
  references = {f"{lang}en": [q["reference"] for q in questions if q["category"] == f"{lang}en"] for lang in langs}
  greedy_target = [a for a in answers if a.get("method") == "ar" and a.get("temperature") == 0.0]
  quality = specbench.bleu_chrf(greedy_target, references)
  elapsed = time.perf_counter() - started
  notes = [
    f"Corpus: {_shown_path(data_dir)} (training split for every model, {len(questions)} held-out prompts for evaluation); "
    f"languages {', '.join(langs)}; template {config.template}; γ={config.gamma}; "
    f"max_new_tokens={config.max_new_tokens}; batch size 1."
    + (
      " Drafter runs (general, specialized, routed) take prompt lookup's drafts first where an n-gram"
      " matches, the drafter's after them (lookup_drafts); the prompt-lookup row is lookup alone."
      if config.lookup_drafts
      else ""
    ),
    f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
    f"{jax.devices()[0].platform}; pipeline time {elapsed / 60:.1f} min (stages resumed from earlier runs "
    "are not counted).",
    "Target quality on the held-out sentences (greedy): "
    + ", ".join(f"{cat} BLEU {q['bleu']:.1f} / chrF {q['chrf']:.1f}" for cat, q in quality.items()),
    _sizes_note(target, drafters["general"]),
  ]
  ablations = []
  if config.ablations:

    def finetune_config(lang, steps, start, acceptance_prompts=4, acceptance_gamma=None):
      return _finetune_config(
        config,
        path,
        target_dir,
        lang,
        steps,
        start,
        acceptance_prompts,
        acceptance_gamma,
        draft_vocab=path("draft_vocab", lang) if config.draft_vocab_coverage else "",
      )

    ablations = _ablations(config, langs[0], path, finetune_config, target, tokenizer, drafters, questions, common)
  report_path = report.write_report(
    records, path("report"), "specjax demo: the recipe in miniature", notes=notes, ablations=ablations
  )
  with open(path("report", "answers.jsonl"), "w", encoding="utf-8") as f:
    for a in answers:
      f.write(json.dumps(a, ensure_ascii=False) + "\n")
  for temperature in (0.0, 1.0):
    report.print_table(records, temperature)
  summary = _summary(config, records, target, drafters, elapsed)
  with open(path("report", "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  print(f"[demo] report: {report_path}", flush=True)
  return {"summary": summary, "records": records, "report": report_path, "quality": quality, "seconds": elapsed}


def _ablations(config, lang, path, finetune_config, target, tokenizer, drafters, questions, common) -> list[tuple]:
  """The paper's ablations at demo scale, on one language: τ against finetuning tokens (log x,
  fitted line; P+F runs of increasing length), pretrain+finetune against finetune only (same
  steps from random weights), and speedup and τ against γ. Returns write_report's ablations."""

  def tau_and_tokens(run_dir):
    records = read_metrics(run_dir)
    tokens = sum(r.get("loss_tokens", 0) for r in records if r["kind"] == "train")
    return [r for r in records if r["kind"] == "eval"][-1]["accept/T0/tau"], tokens

  n = config.ablation_prompts
  runs = [(steps, f"run:{path('drafters', 'general')}", f"{lang}_steps{steps}") for steps in config.ablation_steps]
  runs.append((config.finetune_steps, path("drafter_init"), f"{lang}_scratch"))
  for steps, start, name in runs:
    _stage(
      f"ablation: finetune {name}",
      path("ablations", name),
      lambda steps=steps, start=start, name=name: train_job.run(
        finetune_config(lang, steps, start, n, config.ablation_acceptance_gamma), path("ablations", name)
      ),
    )
  tokens_points = []
  for steps, _, name in runs[:-1]:
    tau, tokens = tau_and_tokens(path("ablations", name))
    tokens_points.append({"x": tokens, "y": tau, "label": f"{lang}: pretrain + finetune"})
  scratch_tau, _ = tau_and_tokens(path("ablations", runs[-1][2]))
  pf_tau, _ = tau_and_tokens(path("ablations", runs[-2][2]))
  pf_points = [
    {"x": 0, "y": scratch_tau, "label": "finetune only"},
    {"x": 1, "y": pf_tau, "label": "pretrain + finetune"},
  ]

  own = [q for q in questions if q["category"] == f"{lang}en"]

  gamma_points = []
  for gamma in config.ablation_gammas:
    records, _ = specbench.evaluate(
      target,
      tokenizer,
      {lang: drafters[lang]},
      own,
      temperatures=(0.0,),
      seeds=(config.seed,),
      runs=[("ar", None), ("sps", lang)],
      **{**common, "gamma": gamma},
      progress=False,
    )
    sps = [r for r in speedups(records) if r["method"] == "sps"][0]
    gamma_points += [{"x": gamma, "y": sps["speedup"], "label": "speedup"}, {"x": gamma, "y": sps["tau"], "label": "τ"}]
  g = config.ablation_acceptance_gamma
  return [
    (
      f"τ against finetuning tokens ({lang}, T=0, γ={g})",
      tokens_points,
      "finetuning tokens (response tokens seen)",
      "τ",
      True,
      True,
    ),
    (
      f"Pretrain + finetune against finetune only ({lang}, T=0, γ={g}, {config.finetune_steps} steps each)",
      pf_points,
      "0 = finetune only, 1 = pretrain + finetune",
      "τ",
      False,
      False,
    ),
    (f"γ ({lang}, T=0, specialized drafter)", gamma_points, "γ (drafts per round)", "speedup, τ", False, False),
  ]


def _summary(config, records, target, drafters, seconds) -> dict:
  """report/summary.json: per temperature, method and language, speedup over plain decoding and τ.
  Methods: plain, pld, general, specialized (each language's own drafter), routed (auto)."""

  def method_of(r):
    if r["method"] != "sps":
      return {"ar": "plain", "pld": "pld"}[r["method"]]
    if r["drafter"] in ("general", "auto"):
      return {"general": "general", "auto": "routed"}[r["drafter"]]
    return "specialized" if r["drafter"] == r["language"] else None  # the matrix's other cells

  out = {
    "target": {"name": config.target or "trained from scratch", "parameters": target.config.num_params},
    "drafters": {
      name: {
        "parameters": d.config.num_params,
        "layers": d.config.num_layers,
        "draft_vocab_size": None if draft_token_ids(d) is None else len(draft_token_ids(d)),
      }
      for name, d in drafters.items()
    },
    "gamma": config.gamma,
    "lookup_drafts": config.lookup_drafts,
    "max_new_tokens": config.max_new_tokens,
    "seconds": seconds,
  }
  cells: dict[tuple, list] = {}
  plain = [{**r, "speedup": 1.0} for r in records if r["method"] == "ar"]
  for row in plain + speedups(records):
    method = method_of(row)
    if method is not None:
      cells.setdefault((f"T{row['temperature']:g}", method, row["language"]), []).append(row)
  for (key, method, lang), rows in sorted(cells.items()):  # T=1: the mean over seeds
    taus = [r["tau"] for r in rows if r["tau"] is not None]
    out.setdefault(key, {}).setdefault(method, {})[lang] = {
      "speedup": float(np.mean([r["speedup"] for r in rows])),
      "tau": float(np.mean(taus)) if taus else None,
      "seeds": len(rows),
    }
  return out


def _sizes_note(target, drafter) -> str:
  return (
    f"Target {target.config.num_params / 1e6:.2f}M parameters ({target.config.num_layers} layers, hidden "
    f"{target.config.hidden_size}); drafters {drafter.config.num_params / 1e6:.2f}M ({drafter.config.num_layers} "
    f"layers, hidden {drafter.config.hidden_size})."
  )
