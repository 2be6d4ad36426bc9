"""The `distill_data` job: the target's own translations of training sentences (self-distillation).

The paper trains each language's drafter on what the target says when asked to translate, in
its chat template, at temperatures 0.0, 0.3, 0.7 and 1.0. A record is one (source sentence,
temperature); its id is `source_id * len(temperatures) + temperature_index`, and the decoder's
per-row keys come from (seed, record id, position), so a record's response does not depend on
batching, sharding or restarts.

Output in WORKDIR/data/: `selfdistill-{src}{tgt}-{shard:05d}-of-{n:05d}.jsonl`, records in id
order, cut into contiguous shards (the format: specjax.data.selfdistill). A shard is written to a
temporary file and renamed when complete, so a killed job leaves only whole shards; a restart
checks them and does the rest. WORKDIR/manifest.json (rewritten atomically after every shard)
counts what is done and echoes the settings, which a restart must match. A record's `truncated`
is true when the response reached max_new_tokens (or the cache) before any stop id; training
then appends no EOS to it.
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
from tqdm import tqdm

from specjax import console
from specjax.config_utils import workdir_path
from specjax.data.parallel import LANGS, LANGUAGE_NAMES, load_pairs, translation_message
from specjax.data.selfdistill import FIELDS, OPTIONAL_FIELDS, read_shard, shard_name
from specjax.decoding.decoder import Decoder, DecodingSettings, stop_ids
from specjax.decoding.prompts import apply_template, check_template, encode_prompt
from specjax.errors import SpecjaxError
from specjax.jobs import local_assets
from specjax.jobs.common import job_mesh, load_target_and_drafters
from specjax.models.hf import check_checkpoint, load_tokenizer
from specjax.validate import DISTILL_DEFAULT_DATA_DIR

# The settings that decide every record's bytes: a restart with other values would mix outputs.
ECHO = (
  "target",
  "tokenizer",
  "data_dir",
  "src",
  "tgt",
  "temperatures",
  "num_sources",
  "num_shards",
  "max_new_tokens",
  "seed",
  "template",
  "dtype",
)


def _check_config(config, target: str | None) -> None:
  """Mistakes that would otherwise surface only after the model loads."""
  if not target:
    raise SpecjaxError(
      "config field `target` is not set: give a Hugging Face checkpoint directory "
      "(--config.target=DIR) or preset:NAME, or use configs/distill_data.py:runlocal"
    )
  pair = (config.src, config.tgt)
  if "en" not in pair or pair[0] == pair[1] or not set(pair) - {"en"} <= set(LANGS):
    raise SpecjaxError(
      f"config fields `src`={config.src!r}, `tgt`={config.tgt!r}: one must be 'en' and the "
      f"other one of {', '.join(LANGS)}"
    )
  if not config.temperatures or any(t < 0 for t in config.temperatures):
    raise SpecjaxError(f"config field `temperatures`={tuple(config.temperatures)}: need at least one, all >= 0")
  if len(set(config.temperatures)) != len(config.temperatures):
    raise SpecjaxError(f"config field `temperatures`={tuple(config.temperatures)}: repeats a value")
  check_template(config.template)
  for field in ("num_shards", "batch_size", "max_new_tokens"):
    if config[field] < 1:
      raise SpecjaxError(f"config field `{field}`={config[field]}: must be >= 1")
  for field in ("num_sources", "max_shards_this_run"):
    if config[field] < 0:
      raise SpecjaxError(f"config field `{field}`={config[field]}: must be >= 0 (0 = all)")


def _sources(config, data_dir: str) -> list[str]:
  """Training sentences in the source language; runlocal without the shared data folder (its
  default data_dir) falls back to local_assets' sentences, so a smoke run works on a fresh
  machine. Any other data_dir must exist (specjax.validate checks it first)."""

  lang = config.tgt if config.src == "en" else config.src
  limit = config.num_sources or None
  if not os.path.isdir(data_dir) and not (config.local_assets and config.data_dir == DISTILL_DEFAULT_DATA_DIR):
    raise SpecjaxError(
      f"config field `data_dir`={config.data_dir!r}: {os.path.abspath(data_dir)} does not exist or is not a directory"
    )
  if config.local_assets and not os.path.isdir(data_dir):
    if config.src == "en":
      raise SpecjaxError(
        f"data_dir {data_dir!r} does not exist and local assets hold no English sentences: "
        "point `data_dir` at the shared data folder for en->X"
      )
    console.warning("distill_data: %s is absent; using local_assets' %s sentences", data_dir, LANGUAGE_NAMES[lang])
    return [text for _, name, text in local_assets.SENTENCES if name == LANGUAGE_NAMES[lang]][:limit]
  pairs = load_pairs(data_dir, lang, "train", limit=limit)
  return [en if config.src == "en" else x for x, en in pairs]


def _plan(config, sources: list[str], tokenizer) -> list[dict]:
  """Every record without its response, in record id order."""
  records = []
  for source_id, source in enumerate(sources):
    prompt = translation_message(config.src, config.tgt, source)
    chat_prompt = apply_template(config.template, prompt, tokenizer=tokenizer)
    for t, temperature in enumerate(config.temperatures):
      records.append(
        {
          "record_id": source_id * len(config.temperatures) + t,
          "source_id": source_id,
          "source": source,
          "prompt": prompt,
          "chat_prompt": chat_prompt,
          "temperature": float(temperature),
          "src_lang": config.src,
          "tgt_lang": config.tgt,
        }
      )
  return records


def _shards(records: list[dict], num_shards: int) -> list[list[dict]]:
  n = len(records)
  return [records[k * n // num_shards : (k + 1) * n // num_shards] for k in range(num_shards)]


def _write_atomic(path: str, lines: list[str]) -> None:
  """Writes to PATH.tmp, then renames: readers and restarts see the old file or the whole new one."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _finished_shard(path: str, expected: list[dict]) -> int | None:
  """Response tokens of a finished shard at `path`, None if there is none yet; a shard that does not
  hold the planned records (another job's, or damaged) is an error, not something to overwrite."""
  if not os.path.exists(path):
    return None
  got = list(read_shard(path))
  if len(got) != len(expected):
    raise SpecjaxError(
      f"{path}: holds {len(got)} records but this job's shard has {len(expected)}; it comes "
      "from another run: use a new workdir or remove the data folder"
    )
  for line, (g, e) in enumerate(zip(got, expected), 1):
    if (g["record_id"], g["source"], g["temperature"]) != (e["record_id"], e["source"], e["temperature"]):
      raise SpecjaxError(
        f"{path}:{line}: record {g['record_id']} is not this job's record {e['record_id']} "
        "(other sources or temperatures): use a new workdir or remove the data folder"
      )
  return sum(len(g["response_token_ids"]) for g in got)


def _check_manifest(path: str, echo: dict) -> None:
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)["config"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SpecjaxError(f"{path}: unreadable manifest of an earlier run ({e}); remove it to start over") from None
  changed = sorted(k for k in echo if previous.get(k) != echo[k])
  if changed:
    raise SpecjaxError(
      f"{path}: an earlier run in this workdir used other values of "
      + ", ".join(f"{k} ({previous.get(k)!r}, now {echo[k]!r})" for k in changed)
      + "; use a new workdir, or the earlier values to resume it"
    )


def _write_manifest(path: str, echo: dict, shards: list[dict | None], records_total: int) -> None:
  done = [s for s in shards if s is not None]
  manifest = {
    "job": "distill_data",
    "records": sum(s["records"] for s in done),
    "response_tokens": sum(s["response_tokens"] for s in done),
    "records_total": records_total,
    "shards_done": len(done),
    "shards_total": len(shards),
    "shards": [s for s in shards if s is not None],
    "config": echo,
  }
  _write_atomic(path, [json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"])


def run(config, workdir: str) -> dict:
  """Generates the missing shards; returns the manifest's counts. Only process 0 writes."""
  target = workdir_path(config, "target", workdir)
  _check_config(config, target)
  data_dir = workdir_path(config, "data_dir", workdir)
  sources = _sources(config, data_dir)
  if not sources:
    raise SpecjaxError(f"no source sentences for {config.src}->{config.tgt} in {data_dir}")
  tokenizer = _load_tokenizer(config, target, workdir)
  records = _plan(config, sources, tokenizer)
  shards = _shards(records, config.num_shards)
  echo = {k: (list(config[k]) if k == "temperatures" else config.get(k)) for k in ECHO}
  echo.update(target=target, tokenizer=workdir_path(config, "tokenizer", workdir), data_dir=data_dir)
  out_dir = os.path.join(workdir, "data")
  manifest_path = os.path.join(workdir, "manifest.json")
  writer = jax.process_index() == 0
  _check_manifest(manifest_path, echo)
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for tmp in glob.glob(os.path.join(out_dir, "*.tmp")):
      console.info("distill_data: discarding %s, a shard that an earlier run did not finish", tmp)
      os.remove(tmp)

  paths = [os.path.join(out_dir, shard_name(config.src, config.tgt, k, len(shards))) for k in range(len(shards))]
  done: list[dict | None] = [None] * len(shards)
  for k, (path, shard) in enumerate(zip(paths, shards)):
    tokens = _finished_shard(path, shard)
    if tokens is not None:
      done[k] = {"file": os.path.basename(path), "records": len(shard), "response_tokens": tokens}
  todo = [k for k in range(len(shards)) if done[k] is None and shards[k]]
  for k in range(len(shards)):  # empty shards (more shards than records) are written as empty files
    if done[k] is None and not shards[k]:
      if writer:
        _write_atomic(paths[k], [])
      done[k] = {"file": os.path.basename(paths[k]), "records": 0, "response_tokens": 0}
  if config.max_shards_this_run:
    todo = todo[: config.max_shards_this_run]
  if writer:
    _write_manifest(manifest_path, echo, done, len(records))
  console.info(
    "distill_data: %d records in %d shards; %d shards done, %d to do in this run",
    len(records),
    len(shards),
    sum(d is not None for d in done),
    len(todo),
  )
  if todo:
    _generate(
      config,
      target,
      tokenizer,
      shards,
      todo,
      paths,
      done,
      writer,
      lambda: _write_manifest(manifest_path, echo, done, len(records)),
    )
  finished = [d for d in done if d is not None]
  return {
    "records": sum(d["records"] for d in finished),
    "response_tokens": sum(d["response_tokens"] for d in finished),
    "shards_done": len(finished),
    "shards_total": len(shards),
  }


def _load_tokenizer(config, target: str, workdir: str):
  """The target's tokenizer (or config field `tokenizer`'s); runlocal builds its checkpoint first."""

  if config.local_assets and not target.startswith("preset:"):
    local_assets.ensure_checkpoints([(target, "tiny")])
  check_checkpoint(target, "config field `target`")  # config.json read by specjax before transformers reads it
  tokenizer_dir = workdir_path(config, "tokenizer", workdir) or target
  if tokenizer_dir.startswith("preset:"):
    raise SpecjaxError(
      f"target {tokenizer_dir} has random weights and no tokenizer: set config field "
      "`tokenizer` to a directory that holds one"
    )
  tokenizer = load_tokenizer(tokenizer_dir)
  if tokenizer.eos_token_id is None:
    raise SpecjaxError(f"{tokenizer_dir}: the tokenizer has no EOS token, so responses would never end")
  return tokenizer


def _generate(config, target, tokenizer, shards, todo, paths, done, writer, write_manifest) -> None:
  """Loads the target and fills the shards in `todo`, writing each as soon as it is complete."""

  mesh = job_mesh(config)
  _, model, model_config, _ = load_target_and_drafters(config, target, {}, mesh, with_tokenizer=False)
  eos = stop_ids(model_config, tokenizer)
  decoder = Decoder(model, settings=DecodingSettings.from_config(config, method="ar"), mesh=mesh)

  bar = tqdm(
    total=sum(len(shards[k]) for k in todo),
    unit="record",
    desc=f"distill {config.src}->{config.tgt}",
    disable=not writer,
  )
  tokens_total, start = 0, time.perf_counter()
  for k in todo:
    shard = shards[k]
    responses, truncated = {}, {}
    for temperature in config.temperatures:  # one decode call per temperature: sampling mode is static
      rows = [r for r in shard if r["temperature"] == float(temperature)]
      for lo in range(0, len(rows), config.batch_size):
        batch = rows[lo : lo + config.batch_size]
        result = decoder.generate(
          [encode_prompt(tokenizer, r["chat_prompt"]) for r in batch],
          temperature=float(temperature),
          seed=config.seed,
          row_ids=[r["record_id"] for r in batch],
          eos_id=eos,
          names=[f"record {r['record_id']} (source {r['source_id']})" for r in batch],
        )
        for r, ids in zip(batch, result.new_tokens):
          responses[r["record_id"]] = [int(t) for t in ids]
          truncated[r["record_id"]] = not ids or int(ids[-1]) not in eos
          tokens_total += len(ids)
        bar.update(len(batch))
        bar.set_postfix(tokens_per_s=f"{tokens_total / (time.perf_counter() - start):.1f}")
    lines = []
    for r in shard:
      ids = responses[r["record_id"]]
      out = {
        **r,
        "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "response_token_ids": ids,
        "truncated": truncated[r["record_id"]],
      }
      lines.append(json.dumps({f: out[f] for f in FIELDS + OPTIONAL_FIELDS}, ensure_ascii=False) + "\n")
    done[k] = {
      "file": os.path.basename(paths[k]),
      "records": len(shard),
      "response_tokens": sum(len(responses[r["record_id"]]) for r in shard),
    }
    if writer:
      _write_atomic(paths[k], lines)
      write_manifest()
  bar.close()
  console.info(
    "distill_data: %d records, %d response tokens in %.1f s",
    sum(len(shards[k]) for k in todo),
    tokens_total,
    time.perf_counter() - start,
  )
