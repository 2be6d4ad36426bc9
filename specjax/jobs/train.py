"""The `pretrain` and `finetune` jobs: one drafter training loop (configs/pretrain.py and
configs/finetune.py hold the commands; the pieces are specjax.train's).

Per step: the next packed batch of the seqio mixture (each process reads its own data shards),
one jitted train step over the (data, fsdp, tensor) mesh with the state donated; metrics are
fetched one step late so the host never waits for the device. Every `log_every` steps a line
goes to WORKDIR/metrics.jsonl and TensorBoard; every `eval_every` steps the drafter is scored
teacher-forced on held-out data and, with the real speculative loop, against the target
(`accept/...`). Checkpoints (orbax, asynchronous) every `checkpoint_every` steps and on SIGTERM;
a rerun of the same command resumes from the latest one with the same data position, so its
losses continue those of an uninterrupted run. The finished drafter is exported as a Hugging
Face checkpoint in WORKDIR/drafter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from specjax import console, fileio
from specjax import sharding as shd
from specjax.config_utils import workdir_path
from specjax.errors import SpecjaxError
from specjax.data.selfdistill import read_records
from specjax.jobs import local_assets
from specjax.models.config import PRESETS, LlamaConfig
from specjax.models.draft_vocab import DRAFT_VOCAB_FILE, choose_token_ids, load_draft_vocab, save_draft_vocab
from specjax.models.hf import check_checkpoint, load_model, load_tokenizer, save_hf_checkpoint
from specjax.models.llama import init_model
from specjax.train.checkpoint import Checkpointer, check_settings, checkpoint_dir, newest_meta, restore_params
from specjax.train.optimizer import make_optimizer
from specjax.train.settings import TrainerSettings
from specjax.train.step import BATCH_FEATURES, StepSpec, init_state, jit_train_step, make_train_step
from specjax.train.trainer import Batches, Evaluator, run_settings, total_steps
from specjax.train.writers import MetricWriter


class _Preempted:
  """SIGTERM (TPU preemption, `kill`) sets a flag the loop checks after each step."""

  def __init__(self):
    self.flag = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    console.warning("SIGTERM: saving a checkpoint after this step, then stopping")
    self.flag = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _register_data(config, workdir: str, tokenizer_dir: str) -> None:
  from specjax.data import tasks  # seqio and TensorFlow: imported only when data is read

  tasks.register_tasks(
    workdir_path(config, "data_dir", workdir),
    tokenizer_dir,
    config.template,
    workdir_path(config, "selfdistill_dir", workdir),
    limit=config.data_limit or None,
    pretrain_source=config.pretrain_source,
    translate_source=config.translate_source,
    tfds_data_dir=config.get("tfds_data_dir"),
    shuffle_buffer_size=config.shuffle_buffer_size,
  )
  tasks.check_selfdistill_for(config.mixture)


def _drafter_config(config, paths, vocab_size: int):
  """The drafter's LlamaConfig and, for an HF checkpoint, its weights; compute dtype from config."""
  spec = paths["drafter"]
  if spec.startswith("preset:"):
    name = spec.split(":", 1)[1]
    if name not in PRESETS:
      raise SpecjaxError(f"config field `drafter`={spec!r}: unknown preset; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(vocab_size=vocab_size), None
  if spec.startswith("run:"):
    exported = fileio.join(spec[4:], "drafter", "config.json")
    run_config = fileio.join(spec[4:], "drafter_config.json")
    for path in (run_config, exported):
      if fileio.exists(path):
        if fileio.is_remote(path):  # from_hf_json reads local files only
          with fileio.open(path) as f:
            return LlamaConfig.from_hf_dict(json.load(f), source=path), None
        return LlamaConfig.from_hf_json(path), None
    raise SpecjaxError(f"config field `drafter`={spec!r}: {run_config} not found (is it a specjax training run?)")
  model, cfg = load_model(spec, "float32")  # a Hugging Face directory or a .gguf file
  return cfg, model


def _build_drafter(config, paths, vocab_size: int, mesh):
  cfg, hf_model = _drafter_config(config, paths, vocab_size)
  if cfg.vocab_size != vocab_size:
    raise SpecjaxError(
      f"config field `drafter`={paths['drafter']!r}: its vocabulary has {cfg.vocab_size} tokens, "
      f"the target's tokenizer {vocab_size}; a drafter must share the target's tokenizer"
    )
  cfg = cfg.replace(dtype=config.dtype, param_dtype="float32")
  model = init_model(cfg, seed=config.seed)
  if hf_model is not None:
    nnx.update(model, nnx.state(hf_model, nnx.Param))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise SpecjaxError("the drafter holds state besides parameters; the trainer does not support it")
  params = jax.device_put(params, shd.state_shardings(params, mesh))
  if paths["drafter"].startswith("run:"):
    params, step = restore_params(paths["drafter"][4:], params, shd.state_shardings(params, mesh))
    console.info("drafter: parameters of %s at step %d", paths["drafter"], step)
  return graphdef, params, cfg


def _draft_vocab(config, workdir, paths, vocab_size: int, tokenizer) -> np.ndarray | None:
  """The reduced vocabulary the drafter trains over: config field `draft_vocab` (a draft_vocab.json,
  a directory holding one, or a distill_data workdir whose responses choose it), else the one a
  `run:DIR` or Hugging Face drafter carries, else None (the full vocabulary)."""
  spec = workdir_path(config, "draft_vocab", workdir)
  if not spec:
    drafter = paths["drafter"]
    source = os.path.join(drafter[4:], "drafter") if drafter.startswith("run:") else drafter
    return None if drafter.startswith("preset:") else load_draft_vocab(source)
  if spec.endswith(".json"):
    ids = load_draft_vocab(os.path.dirname(spec) or ".") if os.path.basename(spec) == DRAFT_VOCAB_FILE else None
    if ids is None:
      raise SpecjaxError(f"config field `draft_vocab`={spec!r}: expected a {DRAFT_VOCAB_FILE} file or a directory")
  elif fileio.exists(fileio.join(spec, DRAFT_VOCAB_FILE)):
    ids = load_draft_vocab(spec)
  elif os.path.isdir(spec):
    stops = [t for t in (tokenizer.eos_token_id,) if t is not None]
    ids = choose_token_ids(
      (r["response_token_ids"] for r in read_records(spec)), vocab_size, config.draft_vocab_coverage, always=stops
    )
  else:
    raise SpecjaxError(f"config field `draft_vocab`={spec!r}: no such file or directory")
  if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
    raise SpecjaxError(f"config field `draft_vocab`={spec!r}: token ids must lie in [0, {vocab_size})")
  return ids


def _check_resume(config, workdir: str, step: int | None = None, meta: dict | None = None) -> int | None:
  """A resume with other data settings is refused (the newest checkpoint's record, read before
  anything loads; or the restored step's); returns the step checked."""
  if meta is None:
    found = newest_meta(checkpoint_dir(workdir))
    if found is None:
      return None
    step, meta = found
  check_settings(
    f"{checkpoint_dir(workdir)}/{step}",
    meta.get("settings"),
    run_settings(config),
    allow=bool(config.get("allow_resume_with_changes")),
  )
  return step


def _finite(metrics: dict) -> bool:
  return all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm", "param_norm"))


def run(config, workdir: str) -> dict:
  """Trains; returns the last logged metrics. Resumes from WORKDIR/checkpoints when present."""
  settings = TrainerSettings.from_config(config)  # checked: a mistake in a field fails here
  paths = {f: workdir_path(config, f, workdir) for f in ("drafter", "target", "tokenizer")}
  if config.get("local_assets"):
    local_assets.ensure_corpus_checkpoints(paths["target"])
  tokenizer_dir = paths["tokenizer"] or paths["target"]
  if not tokenizer_dir or tokenizer_dir.startswith("preset:"):
    raise SpecjaxError(
      "config field `tokenizer` must name a directory holding the target's tokenizer "
      "(defaults to `target` when that is a checkpoint directory)"
    )
  checked = _check_resume(config, workdir)
  check_checkpoint(paths["target"], "config field `target`")  # read by specjax before transformers reads it
  if not paths["drafter"].startswith(("preset:", "run:")):
    check_checkpoint(paths["drafter"], "config field `drafter`")
  tokenizer = load_tokenizer(tokenizer_dir)
  mesh = shd.make_mesh(settings.mesh_shape)
  steps = total_steps(config)

  target = target_params = target_graphdef = None
  needs_target = settings.loss != "cross_entropy" or (settings.eval_every and settings.acceptance.prompts)
  if needs_target and paths["target"]:
    target, _ = load_model(paths["target"], settings.target_dtype, mesh, seed=settings.seed)
    target_graphdef, target_params = nnx.split(target)
  vocab_size = target.config.vocab_size if target is not None else len(tokenizer)
  _register_data(config, workdir, tokenizer_dir)

  graphdef, params, drafter_cfg = _build_drafter(config, paths, vocab_size, mesh)
  draft_ids_W = _draft_vocab(config, workdir, paths, vocab_size, tokenizer)
  tx, schedule = make_optimizer(config, steps)
  spec = StepSpec(loss=settings.loss, with_target=settings.loss != "cross_entropy")
  state = init_state(params, tx, settings.seed)
  A, L = settings.grad_accumulation, settings.sequence_length
  batch_shapes = {k: (A, settings.batch_size // A, L) for k in BATCH_FEATURES}
  device_ids_W = None if draft_ids_W is None else jax.numpy.asarray(draft_ids_W)
  step_fn, state_sh = jit_train_step(
    make_train_step(graphdef, target_graphdef if spec.with_target else None, tx, schedule, spec, device_ids_W),
    state,
    target_params if spec.with_target else None,
    batch_shapes,
    mesh,
  )
  state = jax.device_put(state, state_sh)

  checkpointer = Checkpointer(
    checkpoint_dir(workdir),
    save_every=settings.checkpoint_every,
    keep=settings.checkpoints_to_keep,
    async_save=settings.async_checkpointing,
    settings=run_settings(config),
  )
  start = 0
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state, shardings=state_sh)
    if int(meta["step"]) != checked:  # fell back to an older step than the one checked
      _check_resume(config, workdir, int(meta["step"]), meta)
    start = int(meta["step"])
    console.info("resuming from %s at step %d", checkpointer.directory, start)
  if jax.process_index() == 0:
    fileio.makedirs(workdir, exist_ok=True)
    with fileio.open(fileio.join(workdir, "drafter_config.json"), "w") as f:
      json.dump(drafter_cfg.to_hf_dict(), f, indent=2)

  writer = MetricWriter(workdir, resume_step=start, tensorboard=settings.tensorboard)
  evaluator = Evaluator(
    config,
    workdir,
    mesh,
    graphdef,
    state["params"],
    target,
    target_graphdef,
    target_params,
    tokenizer,
    spec,
    draft_ids_W,
  )
  batches = Batches(config, settings.mixture, "train", mesh, start)
  last = {}
  try:
    if start == 0 and settings.eval_every and settings.eval_at_start:
      last = evaluator(0, state["params"], writer)
    live = _Run(
      start=start,
      steps=steps,
      state=state,
      step_fn=step_fn,
      target_params=target_params if spec.with_target else None,
      batches=batches,
      checkpointer=checkpointer,
      writer=writer,
      evaluator=evaluator,
      export=_Export(graphdef, drafter_cfg, tokenizer, draft_ids_W, workdir),
    )
    last = _loop(settings, live, last)
  finally:
    batches.close()
    checkpointer.close()
    writer.close()
  return last


@dataclasses.dataclass
class _Run:
  """The run's live objects, built by `run` and driven by `_loop`: where it starts and ends, the
  train state (donated to each step), the jitted step and its target parameters (None without a
  distillation loss), the data, the checkpoints, the metric writer, the evaluation and what the
  finished drafter is exported with."""

  start: int  # the step this run resumes from (0: a fresh run)
  steps: int  # the run's steps in all (total_steps(config))
  state: dict
  step_fn: object
  target_params: object
  batches: Batches
  checkpointer: Checkpointer
  writer: MetricWriter
  evaluator: Evaluator
  export: "_Export"


@dataclasses.dataclass(frozen=True)
class _Export:
  """What the finished drafter is written with: WORKDIR/drafter (a Hugging Face checkpoint)."""

  graphdef: object
  drafter_cfg: object  # its LlamaConfig
  tokenizer: object
  draft_ids_W: np.ndarray | None  # its reduced vocabulary, or None
  workdir: str


def _loop(settings: TrainerSettings, live: _Run, last: dict) -> dict:
  """Trains from live.start to live.steps (or settings.max_steps_this_run more steps, or until
  SIGTERM), logging, evaluating and checkpointing on the way; exports the drafter when finished.
  Returns `last` (the metrics so far) updated with the run's last metrics, step and finished."""
  state, step_fn, target_params, batches = live.state, live.step_fn, live.target_params, live.batches
  checkpointer, writer, evaluator = live.checkpointer, live.writer, live.evaluator
  start, steps = live.start, live.steps
  tokens_per_step = settings.batch_size * settings.sequence_length
  stop_at = steps if not settings.max_steps_this_run else min(steps, start + settings.max_steps_this_run)
  bar = tqdm(total=steps, initial=start, unit="step", desc=settings.job, disable=jax.process_index() != 0)
  window = {"metrics": [], "t0": time.perf_counter(), "steps": 0}
  pending = None  # (step number, device metrics): fetched one step late
  good_step = start if checkpointer.latest_step() is not None else None

  def fetch(item):
    step_no, device_metrics = item
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not _finite(m):
      kept = checkpointer.latest_step()
      raise SpecjaxError(
        f"step {step_no}: the loss or gradient is not finite (loss {m['loss']}, grad norm "
        f"{m['grad_norm']}); stopped. The last good checkpoint is "
        f"{'step ' + str(kept) if kept is not None else 'none (no step finished)'} in "
        f"{checkpointer.directory}; lower learning_rate or check the data"
      )
    window["metrics"].append(m)
    return m

  def log(step_no):
    elapsed = time.perf_counter() - window["t0"]
    ms = window["metrics"]
    record = {k: float(np.mean([m[k] for m in ms])) for k in ms[0] if k not in ("learning_rate", "loss_tokens")}
    record["learning_rate"] = ms[-1]["learning_rate"]
    record["loss_tokens"] = float(sum(m["loss_tokens"] for m in ms))
    # Excludes the first step's compile unless that step is logged on its own (log_every=1).
    record["tokens_per_second"] = window["steps"] * tokens_per_step / max(elapsed, 1e-9)
    record["steps_per_second"] = window["steps"] / max(elapsed, 1e-9)
    writer.write(step_no, {"kind": "train", **record})
    bar.set_postfix(loss=f"{record['loss']:.4f}")
    window.update(metrics=[], t0=time.perf_counter(), steps=0)
    return record

  with _Preempted() as preempted:
    step = start
    while step < stop_at:
      batch = next(batches)
      state, device_metrics = step_fn(state, target_params, batch)
      step += 1
      window["steps"] += 1
      if step == start + 1 and step % settings.log_every:  # the first call compiled: time from here
        jax.block_until_ready(device_metrics)
        window.update(t0=time.perf_counter(), steps=0)
      if pending is not None:
        fetch(pending)
      pending = (step, device_metrics)
      bar.update(1)
      final = step == stop_at
      if (
        step % settings.log_every == 0
        or final
        or checkpointer.due(step)
        or preempted.flag
        or (settings.eval_every and step % settings.eval_every == 0)
      ):
        fetch(pending)  # the state about to be logged, evaluated or saved is known to be finite
        pending = None
      if window["metrics"] and (step % settings.log_every == 0 or final):
        last = {**last, **log(step)}
      if settings.eval_every and step % settings.eval_every == 0:
        last = {**last, **evaluator(step, state["params"], writer)}
        window["t0"] = time.perf_counter()  # evaluation time is not training time
      if checkpointer.due(step) or final or preempted.flag:
        checkpointer.save(step, state, {"step": step, "data_step": step, "job": settings.job})
        good_step = step
      if preempted.flag:
        break
    if pending is not None:
      fetch(pending)
  bar.close()
  checkpointer.wait()
  finished = step >= steps
  out = live.export
  if finished and settings.export_hf:  # every process gathers the weights; process 0 writes them
    save_hf_checkpoint(
      nnx.merge(out.graphdef, state["params"]),
      out.drafter_cfg.replace(dtype="float32"),
      os.path.join(out.workdir, "drafter"),
      tokenizer=out.tokenizer,
    )
    if out.draft_ids_W is not None and jax.process_index() == 0:
      save_draft_vocab(
        os.path.join(out.workdir, "drafter"), out.draft_ids_W, {"coverage": settings.draft_vocab_coverage}
      )
  console.info(
    "%s: stopped at step %d of %d (%s); last checkpoint step %s",
    settings.job,
    step,
    steps,
    "finished" if finished else "interrupted",
    good_step,
  )
  return {**last, "step": step, "finished": finished}
