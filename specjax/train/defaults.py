"""The trainer's config: `trainer_config(job)`, the ConfigDict that configs/pretrain.py and
configs/finetune.py start from (they set what differs), and `shrink_for_cpu`, their runlocal
variant. The fields, their defaults and their documentation are specjax.train.settings'
TrainerSettings (one default per field, defined there once); this module only lays them out
as a ConfigDict: the `acceptance` group nested (config.acceptance.gamma, ...), with its old flat
names (acceptance_gamma, ...) as aliases of the same fields for one release."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from specjax.data.parallel import EMBEDDED_CORPUS
from specjax.train.settings import TrainerSettings


def trainer_config(job: str) -> ml_collections.ConfigDict:
  defaults = TrainerSettings(job=job)
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(TrainerSettings):
    value = getattr(defaults, f.name)
    if dataclasses.is_dataclass(value):  # a nested group, and its flat aliases (GROUP_FIELD) for one release
      c[f.name] = ml_collections.ConfigDict(dataclasses.asdict(value))
      for name in c[f.name]:
        c[f"{f.name}_{name}"] = c[f.name].get_ref(name)
    elif value is None:  # an optional path (target, tokenizer, ...): unset until given
      c[f.name] = config_dict.placeholder(str)
    else:
      c[f.name] = value
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict, *, steps: int) -> None:
  """runlocal: the embedded corpus, a random tiny target built into the workdir, a tiny drafter;
  about a minute on a CPU."""

  c.local_assets = True
  c.data_dir = EMBEDDED_CORPUS
  c.target = "{workdir}/local_assets/target"
  c.drafter = "preset:tiny-drafter"
  c.dtype = c.target_dtype = "float32"
  c.sequence_length = 128
  c.batch_size = 8
  c.num_train_steps = steps
  c.learning_rate = 3e-3
  c.shuffle_buffer_size = 1000
  c.log_every = 5
  c.eval_every = max(1, steps // 2)
  c.eval_batches = 2
  c.acceptance.prompts_per_language = 2
  c.acceptance.max_new_tokens = 16
  c.acceptance.gamma = 4
  c.acceptance.batch_size = 10
  c.acceptance.prompt_bucket = 128
  c.checkpoint_every = max(1, steps // 2)
