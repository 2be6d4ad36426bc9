"""The `generate` job: Spec-Bench prompts through a target (and drafter), answers and metrics out.

Spec-Bench's protocol, batched: each question's turns are rendered with the chat template, turn
2's prompt holding turn 1 and the model's answer to it; all questions' turn t are decoded before
turn t+1. One `Decoder` serves every call, so each prompt-length bucket compiles once, and a
warm-up call per new bucket keeps compile time out of tokens/s (it is reported apart).
"""
from __future__ import annotations

import json
import math
import time

import jax
from tqdm import tqdm

from specjax import console, fileio, local_assets
from specjax.config_utils import workdir_path
from specjax.decoding import engine, metrics
from specjax.decoding.decoder import Decoder
from specjax.decoding.prompts import apply_template, check_template, encode_prompt, read_prompt_files
from specjax.errors import SpecjaxError
from specjax.models.hf import load_model, target_tokenizer
from specjax.sharding import make_mesh, replicate_model

LOCAL_PRESETS = {"target": "tiny", "drafter": "tiny-drafter"}  # what local_assets builds


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
  """Runs the job; returns the metrics that it writes to WORKDIR/metrics.json."""
  paths = {field: workdir_path(config, field, workdir) for field in ("target", "drafter", "tokenizer", "prompts")}
  _check_config(config, paths)
  if config.local_assets:
    local_assets.ensure_question_file(paths["prompts"])
  questions = read_prompt_files(paths["prompts"])  # before the models load: a bad file fails fast
  if config.max_prompts:
    questions = questions[:config.max_prompts]
  if config.local_assets:
    local_assets.ensure_checkpoints([(paths[role], LOCAL_PRESETS[role]) for role in ("target", "drafter")
                                     if paths[role] and not paths[role].startswith("preset:")])

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
  sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=config.seed)

  answers, results, categories = [], [], []
  history = {i: [] for i in range(len(questions))}  # (user message, answer text) per earlier turn
  compile_s, seen_buckets = 0.0, set()
  bar = tqdm(total=sum(len(q["turns"]) for q in questions), unit="prompt", desc=f"generate ({config.method})",
             disable=jax.process_index() != 0)
  for turn in range(max(len(q["turns"]) for q in questions)):
    active = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
    texts = [apply_template(config.template, questions[i]["turns"][turn], history[i], config.system_prompt,
                            tokenizer)
             for i in active]
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    names = [f"{questions[i]['source']} (question {questions[i]['question_id']!r}, turn {turn + 1})"
             for i in active]
    if config.warmup:
      compile_s += _warm_up(decoder, prompts, names, sampling, seen_buckets)
    for lo in range(0, len(active), config.batch_size):
      rows = active[lo:lo + config.batch_size]
      result = decoder.generate(prompts[lo:lo + len(rows)], names=names[lo:lo + len(rows)],
                                row_ids=[i + turn * len(questions) for i in rows], **sampling)
      results.append(result)
      categories.append([questions[i]["category"] for i in rows])
      for k, (i, tau) in enumerate(zip(rows, metrics.row_tau(result))):
        tokens = result.new_tokens[k]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        history[i].append((questions[i]["turns"][turn], text))
        answers.append({"question_id": questions[i]["question_id"], "category": questions[i]["category"],
                        "turn": turn, "text": text, "token_ids": [int(t) for t in tokens],
                        "new_tokens": len(tokens), "steps": int(result.steps[k]),
                        "accepted": int(result.accepted[k]), "tau": tau, "wall_s": result.wall_s})
      bar.update(len(rows))
  bar.close()

  order = {q["question_id"]: i for i, q in enumerate(questions)}
  answers.sort(key=lambda a: (order[a["question_id"]], a["turn"]))
  out = {"job": "generate", "method": config.method, "prompts": len(questions), "generations": len(answers),
         "compile_s": compile_s,
         "hardware": {"device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                      "device_count": jax.device_count(), "process_count": jax.process_count()},
         **metrics.aggregate(results, categories),
         "config": config.to_dict()}
  if jax.process_index() == 0:
    _write(workdir, answers, out)
  rate = out["acceptance_rate"]
  console.info("generate: %d answers, %d new tokens in %.2f s (%.1f tokens/s), tau %.3f, acceptance %s, "
               "compile %.1f s; wrote %s", len(answers), out["new_tokens"], out["wall_s"],
               out["tokens_per_second"] or 0.0, out["tau"], "n/a" if rate is None else f"{rate:.3f}",
               compile_s, workdir)
  return out


def _write(workdir: str, answers: list[dict], out: dict) -> None:
  fileio.makedirs(workdir, exist_ok=True)
  with fileio.open(fileio.join(workdir, "answers.jsonl"), "w", encoding="utf-8") as f:
    for answer in answers:
      f.write(json.dumps(answer, ensure_ascii=False) + "\n")
  with fileio.open(fileio.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, ensure_ascii=False)
    f.write("\n")
