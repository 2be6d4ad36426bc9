"""The drafter trainer's pieces (the `pretrain` and `finetune` job, specjax/jobs/train.py, runs
them in its loop): the step count, the global batches each process feeds from its seqio shards,
the data settings a resume must keep, and the held-out and acceptance evaluation.

Batches: the next packed batch of the seqio mixture from this process's data shards, as global
[A, b, L] arrays on the (data, fsdp, tensor) mesh, positioned at a step so a resume reads the
data an uninterrupted run would. Evaluator: the drafter scored teacher-forced on held-out data
(`eval/...`) and, with the real speculative loop, against the target (`accept/...`).
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np

from specjax import sharding as shd
from specjax.errors import SpecjaxError
from specjax.train.acceptance import AcceptanceEval
from specjax.train.settings import AcceptanceSettings
from specjax.train.step import make_eval_step


def total_steps(config) -> int:
  """num_train_steps, or train_tokens / tokens per step when train_tokens is set."""
  if config.get("train_tokens"):
    return max(1, int(math.ceil(config.train_tokens / (config.batch_size * config.sequence_length))))
  if config.num_train_steps < 1:
    raise SpecjaxError(f"config field `num_train_steps`={config.num_train_steps}: must be >= 1 (or set train_tokens)")
  return int(config.num_train_steps)


def _data_shards(config) -> tuple[list[int], int]:
  """The seqio shards this process reads, and their total. Each process owns data_shards /
  process_count consecutive shards; a single process given data_shards=N reads all N, so its
  global batches equal those of an N-process run."""
  n_proc, pid = jax.process_count(), jax.process_index()
  num = int(config.get("data_shards") or n_proc)
  if num % n_proc:
    raise SpecjaxError(f"config field `data_shards`={num}: must be a multiple of the {n_proc} processes")
  per = num // n_proc
  if config.batch_size % num or (config.batch_size // num) % config.grad_accumulation:
    raise SpecjaxError(
      f"config field `batch_size`={config.batch_size}: must split into {num} data shards of a "
      f"multiple of grad_accumulation={config.grad_accumulation} rows each"
    )
  return list(range(pid * per, (pid + 1) * per)), num


def _check_nonempty(name: str, split: str, sequence_length: int, shard_info) -> None:
  """An endless stream of an empty task hangs a mixture forever (it waits for the task's first
  example): check that every task of `name` yields one at this length before training."""
  import seqio
  from specjax.data import tasks  # seqio and TensorFlow: imported only when data is read

  provider = seqio.get_mixture_or_task(name)
  for task in getattr(provider, "tasks", [provider]):
    probe = tasks.get_tf_dataset(
      task.name, sequence_length, split=split, shard_info=shard_info, batch_size=None, num_epochs=1, shuffle=False
    )
    if not any(True for _ in probe.take(1)):
      raise SpecjaxError(
        f"task {task.name!r} of {name!r} ({split}) yields no example at sequence_length="
        f"{sequence_length}: prompts longer than half of it are dropped; raise sequence_length "
        "or check data_dir / selfdistill_dir"
      )


class Batches:
  """Global [A, b, L] batches on the mesh from this process's seqio shards, positioned at a step."""

  def __init__(self, config, name: str, split: str, mesh, start_step: int, *, num_epochs=None, shuffle=True):
    import seqio
    from specjax.data import tasks  # seqio and TensorFlow: imported only when data is read

    shards, num = _data_shards(config)
    self.per_shard = config.batch_size // num
    if num_epochs is None:
      _check_nonempty(name, split, config.sequence_length, seqio.ShardInfo(index=shards[0], num_shards=num))
    self.iterators = [
      tasks.get_dataset(
        name,
        config.sequence_length,
        split=split,
        seed=config.seed,
        shard_info=seqio.ShardInfo(index=i, num_shards=num),
        start_step=start_step,
        batch_size=self.per_shard,
        num_epochs=num_epochs,
        shuffle=shuffle,
      )
      for i in shards
    ]
    A, L = config.grad_accumulation, config.sequence_length
    self.global_shape = (A, config.batch_size // A, L)
    self.sharding = shd.logical_sharding(self.global_shape, (None, "batch", "length"), mesh)
    self.local_rows = self.per_shard * len(shards)

  def __next__(self) -> dict[str, jax.Array]:
    parts = [next(it) for it in self.iterators]  # StopIteration ends a finite (eval) pass
    A = self.global_shape[0]
    out = {}
    for key in parts[0]:
      local = np.concatenate([p[key] for p in parts], axis=0)
      if local.shape[0] != self.local_rows:  # the last batch of a finite pass
        pad = np.zeros((self.local_rows - local.shape[0],) + local.shape[1:], local.dtype)
        local = np.concatenate([local, pad])  # loss weights 0: padding adds nothing
      local = local.reshape(self.local_rows // A, A, -1).transpose(1, 0, 2)  # row r -> micro r % A
      out[key] = jax.make_array_from_process_local_data(self.sharding, np.ascontiguousarray(local), self.global_shape)
    return out

  def close(self):
    for it in self.iterators:
      it.close()


# The fields that decide which examples a step reads (the data position is a step count): a
# resume with other values would re-read or skip data, so it is refused unless the user asks.
DATA_SETTINGS = (
  "batch_size",
  "sequence_length",
  "grad_accumulation",
  "mixture",
  "data_dir",
  "selfdistill_dir",
  "template",
  "pretrain_source",
  "translate_source",
  "tfds_data_dir",
  "data_limit",
  "shuffle_buffer_size",
  "seed",
  "tokenizer",
)


def run_settings(config) -> dict:
  """This run's data settings as they read back from a checkpoint's JSON record."""
  settings = {k: config.get(k) for k in DATA_SETTINGS}
  settings["data_shards"] = _data_shards(config)[1]  # the effective number (0 means one per process)
  return json.loads(json.dumps(settings))


class Evaluator:
  """Teacher-forced loss/accuracy on held-out batches (`eval/`) and speculative acceptance
  against the target (`accept/`), both on the current drafter parameters."""

  def __init__(
    self,
    config,
    workdir,
    mesh,
    graphdef,
    params,
    target,
    target_graphdef,
    target_params,
    tokenizer,
    spec,
    draft_ids_W=None,
  ):
    self.config, self.mesh, self.graphdef = config, mesh, graphdef
    self.target_params = target_params if spec.with_target else None
    self.eval_step = jax.jit(
      make_eval_step(
        graphdef,
        target_graphdef if spec.with_target else None,
        spec,
        None if draft_ids_W is None else jax.numpy.asarray(draft_ids_W),
      )
    )
    self.has_heldout = False
    if config.eval_every and config.eval_batches:
      import seqio

      provider = seqio.get_mixture_or_task(config.mixture)
      self.has_heldout = "eval" in provider.splits
    self.acceptance = None
    if config.eval_every and AcceptanceSettings.from_config(config).prompts and target is not None:
      self.acceptance = AcceptanceEval(config, workdir, target, graphdef, params, tokenizer, mesh, draft_ids_W)

  def __call__(self, step, params, writer) -> dict:
    record = {}
    if self.has_heldout:
      batches = Batches(self.config, self.config.mixture, "eval", self.mesh, 0, num_epochs=1, shuffle=False)
      sums = None
      try:
        for _ in range(self.config.eval_batches):
          try:
            batch = next(batches)
          except StopIteration:
            break
          out = jax.device_get(self.eval_step(params, self.target_params, batch))
          sums = out if sums is None else jax.tree.map(np.add, sums, out)
      finally:
        batches.close()
      if sums is not None:
        w = max(float(sums["weight"]), 1.0)
        record.update(
          {
            "eval/loss": float(sums["loss"]) / w,
            "eval/cross_entropy": float(sums["cross_entropy"]) / w,
            "eval/token_accuracy": float(sums["correct"]) / w,
          }
        )
    if self.acceptance is not None:
      record.update(self.acceptance(step, params))
    if record:
      writer.write(step, {"kind": "eval", **record})
    return record
