"""The paper's recipe in miniature (job `demo`; `make demo`): train a target, distil, train drafters,
evaluate per language, report.

1. A byte-level BPE tokenizer on the corpus's training split.
2. A small target trained from scratch to translate X->English (X = de, fr, ja, ru, zh).
3. Self-distillation data: the target's own translations of the training sources at T=0 and T=1.
4. A general drafter pretrained on monolingual text of every language (no prompts, no target).
5. One drafter per language finetuned from the general one on the target's outputs for that
   language (the paper's P+F).
6. Evaluation on held-out sentences never used in training: plain decoding, prompt lookup,
   the general drafter and every language's drafter on every language (the cross-language
   matrix) at T=0; plain, prompt lookup, general and routed (`auto`: each prompt's own language
   drafter) at T=1 over several seeds. WORKDIR/report/report.md holds the tables and plots.

Every stage leaves a DONE file; a killed demo rerun with the same command resumes at the first
unfinished stage (and inside a training stage, at its last checkpoint).
"""
from __future__ import annotations

import json
import os
import platform
import time

import jax

from specjax.config_utils import workdir_path
from specjax.data.parallel import LANGS, load_pairs, translation_message
from specjax.errors import SpecjaxError
from specjax.models.config import LlamaConfig


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
  from specjax.train.defaults import trainer_config
  c = trainer_config(job)
  c.update(data_dir=config.data_dir, template=config.template, dtype="float32", target_dtype="float32",
           shuffle_buffer_size=2000, log_every=config.log_every, eval_every=0, eval_batches=0,
           tensorboard=config.tensorboard, acceptance_prompts="", checkpoint_every=100_000, warmup_fraction=0.05,
           pretrain_source="local", translate_source=config.data, seed=config.seed)
  c.update(fields)
  return c


def _distill_config(config, lang: str, target_dir: str, data_dir: str):
  """configs/distill_data.py's fields for one language of the demo."""
  import ml_collections
  return ml_collections.ConfigDict(dict(
      job="distill_data", target=target_dir, tokenizer=None, dtype="float32", data_dir=data_dir, src=lang,
      tgt="en", num_sources=config.distill_sources, template=config.template,
      temperatures=tuple(config.distill_temperatures), max_new_tokens=config.max_new_tokens,
      batch_size=config.distill_batch_size, seed=config.seed, max_cache_len=None, prompt_bucket=config.prompt_bucket,
      mesh_shape=(1, -1, 1), num_shards=4, max_shards_this_run=0, local_assets=False))


def _heldout_questions(config, data_dir: str) -> list[dict]:
  questions = []
  for lang in config.langs:
    pairs = load_pairs(data_dir, lang, "eval", config.eval_prompts_per_language)
    questions += [{"question_id": f"heldout_{lang}en_{i}", "category": f"{lang}en",
                   "turns": [translation_message(lang, "en", x)], "reference": en}
                  for i, (x, en) in enumerate(pairs)]
  return questions


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns the evaluation records and the report's path."""
  from specjax.models.hf import load_model, load_tokenizer
  from specjax.models.tokenizer_utils import make_random_checkpoint, train_tokenizer
  from specjax.train import trainer

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

  def tokenizer_stage():
    texts = []
    for lang in langs:
      for x, en in load_pairs(data_dir, lang, "train"):
        texts += [x, en]
    from specjax.local_assets import TEMPLATE_TEXT
    tok = train_tokenizer([TEMPLATE_TEXT] + texts, config.vocab_size, path("tokenizer"))
    return {"vocab_size": len(tok)}
  _stage("tokenizer", path("tokenizer"), tokenizer_stage)
  tokenizer = load_tokenizer(path("tokenizer"))

  # 2. The target: a translator X->en trained from random weights.
  def target_stage():
    make_random_checkpoint(path("target_init"), _model_config(config.target_model), tokenizer=tokenizer,
                           seed=config.seed)
    c = _trainer_config(config, "pretrain", drafter=path("target_init"), tokenizer=path("tokenizer"),
                        mixture="finetune_multilingual", selfdistill_dir=None,
                        num_train_steps=config.target_steps, batch_size=config.batch_size,
                        sequence_length=config.sequence_length, learning_rate=config.target_lr)
    out = trainer.run(c, path("target_train"))
    return {"final_loss": out.get("loss")}
  _stage("train the target", path("target_train"), target_stage)
  target_dir = path("target_train", "drafter")

  # 3. Self-distillation data, one distill_data workdir per language.
  from specjax.data import selfdistill
  for lang in langs:
    def one(lang=lang):
      return selfdistill.run(_distill_config(config, lang, target_dir, data_dir), path("selfdistill", lang))
    _stage(f"self-distillation data {lang}->en", path("selfdistill", lang), one)

  # 4. The general drafter: monolingual text of every language.
  drafter_init = path("drafter_init")
  if not os.path.exists(os.path.join(drafter_init, "config.json")):
    make_random_checkpoint(drafter_init, _model_config(config.drafter_model), tokenizer=tokenizer,
                           seed=config.seed + 1)

  def general_stage():
    c = _trainer_config(config, "pretrain", drafter=drafter_init, tokenizer=path("tokenizer"),
                        mixture="pretrain_multilingual", num_train_steps=config.pretrain_steps,
                        batch_size=config.batch_size, sequence_length=config.sequence_length,
                        learning_rate=config.drafter_lr)
    trainer.run(c, path("drafters", "general"))
  _stage("pretrain the general drafter", path("drafters", "general"), general_stage)

  # 5. One drafter per language: the general one finetuned on the target's outputs.
  def finetune_config(lang, steps, start, acceptance_prompts=4, acceptance_gamma=None):
    return _trainer_config(config, "finetune", drafter=start, target=target_dir, tokenizer=path("tokenizer"),
                           mixture=f"finetune_{lang}_en", selfdistill_dir=path("selfdistill"), num_train_steps=steps,
                           batch_size=config.batch_size, sequence_length=config.sequence_length,
                           learning_rate=config.finetune_lr,
                           eval_every=steps if config.acceptance_during_training else 0, eval_at_start=True,
                           acceptance_prompts=f"heldout:{lang}", acceptance_prompts_per_language=acceptance_prompts,
                           acceptance_temperatures=(0.0,), acceptance_gamma=acceptance_gamma or config.gamma,
                           acceptance_max_new_tokens=config.max_new_tokens, acceptance_batch_size=4)

  for lang in langs:
    _stage(f"finetune the {lang} drafter", path("drafters", lang), lambda lang=lang: trainer.run(
        finetune_config(lang, config.finetune_steps, f"run:{path('drafters', 'general')}"), path("drafters", lang)))

  # 6. Evaluation and report.
  from specjax.eval import report, specbench
  questions = _heldout_questions(config, data_dir)
  target, _ = load_model(target_dir, "float32")
  drafters = {name: load_model(path("drafters", name, "drafter"), "float32")[0] for name in ("general",) + langs}
  common = dict(gamma=config.gamma, max_new_tokens=config.max_new_tokens, template=config.template,
                batch_size=1, eos_id=tokenizer.eos_token_id, prompt_bucket=config.prompt_bucket)
  def evaluate_stage():  # minutes at the mini paper's scale: kept, so a rerun goes straight to the report
    records, answers = specbench.evaluate(
        target, tokenizer, drafters, questions, temperatures=(0.0,), seeds=(config.seed,),
        runs=[("ar", None), ("pld", None), ("sps", "general")] + [("sps", lang) for lang in langs]
        + [("sps", "auto")], **common)
    sampled, sampled_answers = specbench.evaluate(
        target, tokenizer, drafters, questions, temperatures=(1.0,), seeds=tuple(config.sampling_seeds),
        runs=[("ar", None), ("pld", None), ("sps", "general"), ("sps", "auto")], **common)
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
      f"Corpus: {data_dir} (training split for every model, {len(questions)} held-out prompts for evaluation); "
      f"languages {', '.join(langs)}; template {config.template}; γ={config.gamma}; "
      f"max_new_tokens={config.max_new_tokens}; batch size 1.",
      f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
      f"{jax.devices()[0].platform}; pipeline time {elapsed / 60:.1f} min (stages resumed from earlier runs "
      "are not counted).",
      "Target quality on the held-out sentences (greedy): " + ", ".join(
          f"{cat} BLEU {q['bleu']:.1f} / chrF {q['chrf']:.1f}" for cat, q in quality.items()),
      _sizes_note(target, drafters["general"]),
  ]
  ablations = []
  if config.ablations:
    ablations = _ablations(config, langs[0], path, finetune_config, target, tokenizer, drafters, questions, common)
  report_path = report.write_report(records, path("report"), "specjax demo: the recipe in miniature", notes=notes,
                                    ablations=ablations)
  with open(path("report", "answers.jsonl"), "w", encoding="utf-8") as f:
    for a in answers:
      f.write(json.dumps(a, ensure_ascii=False) + "\n")
  for temperature in (0.0, 1.0):
    report.print_table(records, temperature)
  print(f"[demo] report: {report_path}", flush=True)
  return {"records": records, "report": report_path, "quality": quality, "seconds": elapsed}


def _ablations(config, lang, path, finetune_config, target, tokenizer, drafters, questions, common) -> list[tuple]:
  """The paper's ablations at demo scale, on one language: τ against finetuning tokens (log x,
  fitted line; P+F runs of increasing length), pretrain+finetune against finetune only (same
  steps from random weights), and speedup and τ against γ. Returns write_report's ablations."""
  from specjax.eval import specbench
  from specjax.train import trainer
  from specjax.train.writers import read_metrics

  def tau_and_tokens(run_dir):
    records = read_metrics(run_dir)
    tokens = sum(r.get("loss_tokens", 0) for r in records if r["kind"] == "train")
    return [r for r in records if r["kind"] == "eval"][-1]["accept/T0/tau"], tokens

  n = config.ablation_prompts
  runs = [(steps, f"run:{path('drafters', 'general')}", f"{lang}_steps{steps}") for steps in config.ablation_steps]
  runs.append((config.finetune_steps, path("drafter_init"), f"{lang}_scratch"))
  for steps, start, name in runs:
    _stage(f"ablation: finetune {name}", path("ablations", name),
           lambda steps=steps, start=start, name=name: trainer.run(
               finetune_config(lang, steps, start, n, config.ablation_acceptance_gamma), path("ablations", name)))
  tokens_points = []
  for steps, _, name in runs[:-1]:
    tau, tokens = tau_and_tokens(path("ablations", name))
    tokens_points.append({"x": tokens, "y": tau, "label": f"{lang}: pretrain + finetune"})
  scratch_tau, _ = tau_and_tokens(path("ablations", runs[-1][2]))
  pf_tau, _ = tau_and_tokens(path("ablations", runs[-2][2]))
  pf_points = [{"x": 0, "y": scratch_tau, "label": "finetune only"}, {"x": 1, "y": pf_tau, "label": "pretrain + finetune"}]

  own = [q for q in questions if q["category"] == f"{lang}en"]
  from specjax.eval.report import speedups
  gamma_points = []
  for gamma in config.ablation_gammas:
    records, _ = specbench.evaluate(target, tokenizer, {lang: drafters[lang]}, own, temperatures=(0.0,),
                                    seeds=(config.seed,), runs=[("ar", None), ("sps", lang)],
                                    **{**common, "gamma": gamma}, progress=False)
    sps = [r for r in speedups(records) if r["method"] == "sps"][0]
    gamma_points += [{"x": gamma, "y": sps["speedup"], "label": "speedup"}, {"x": gamma, "y": sps["tau"], "label": "τ"}]
  g = config.ablation_acceptance_gamma
  return [(f"τ against finetuning tokens ({lang}, T=0, γ={g})", tokens_points, "finetuning tokens (response tokens seen)",
           "τ", True, True),
          (f"Pretrain + finetune against finetune only ({lang}, T=0, γ={g}, {config.finetune_steps} steps each)",
           pf_points,
           "0 = finetune only, 1 = pretrain + finetune", "τ", False, False),
          (f"γ ({lang}, T=0, specialized drafter)", gamma_points, "γ (drafts per round)", "speedup, τ", False, False)]


def _sizes_note(target, drafter) -> str:
  return (f"Target {target.config.num_params / 1e6:.2f}M parameters ({target.config.num_layers} layers, hidden "
          f"{target.config.hidden_size}); drafters {drafter.config.num_params / 1e6:.2f}M ({drafter.config.num_layers} "
          f"layers, hidden {drafter.config.hidden_size}).")
