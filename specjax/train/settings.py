"""The trainer's settings: `TrainerSettings` (the `pretrain` and `finetune` jobs) and its
`AcceptanceSettings` group (the acceptance evaluation during training), frozen dataclasses
built once from a config with `from_config`. Every field is documented here, once, with its
one default: specjax/train/defaults.py builds the trainer's ConfigDict from these classes, and
configs/pretrain.py and configs/finetune.py set what differs.

The acceptance group is the nested config group `config.acceptance.FIELD` (prompts, gamma, ...).
Its old flat names, `acceptance_FIELD`, stay as aliases for one release: in a config that
trainer_config built they are the same field (ml_collections references), so
`--config.acceptance_gamma=4` sets `config.acceptance.gamma`; a command line that gives both
names different values is refused (specjax.validate.check_aliases). `from_config` also reads a
config that has only the flat names, and refuses one whose flat and nested values differ.

Nothing here imports JAX: the config files import this module.
"""

from __future__ import annotations

import dataclasses

from specjax.errors import SpecjaxError

DTYPES = ("float32", "bfloat16")  # the drafter's compute dtype


_ABSENT = object()


def _read(config, name: str, prefix: str):
  """config's value of group field `name`: `config.GROUP.name`, else its flat alias
  `config.GROUP_name`, else _ABSENT; SpecjaxError when the config holds both and they differ."""
  group = prefix.rstrip("_")
  nested = (
    config[group][name] if group in config and hasattr(config[group], "keys") and name in config[group] else _ABSENT
  )
  flat = config[prefix + name] if prefix + name in config else _ABSENT
  if nested is not _ABSENT and flat is not _ABSENT and _comparable(nested) != _comparable(flat):
    raise SpecjaxError(
      f"config fields `{group}.{name}`={_comparable(nested)!r} and `{prefix}{name}`="
      f"{_comparable(flat)!r} differ: `{prefix}{name}` is the old name of `{group}.{name}` "
      "(kept for one release); set one of them"
    )
  return nested if nested is not _ABSENT else flat


def _comparable(value):
  return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class AcceptanceSettings:
  """The acceptance evaluation during training (`accept/...`): the real speculative loop runs the
  drafter being trained against the target on these prompts at each evaluation temperature."""

  # "heldout:de,fr,..." (the eval split's sentences as translation prompts) or Spec-Bench
  # question.jsonl files; "" = no acceptance evaluation.
  prompts: str = "heldout:de,fr,ja,ru,zh"
  prompts_per_language: int = 8
  temperatures: tuple = (0.0, 1.0)
  gamma: int = 5
  max_new_tokens: int = 128
  batch_size: int = 8
  prompt_bucket: int = 64

  PREFIX = "acceptance_"  # the flat aliases' prefix (a class attribute, not a field)

  @classmethod
  def from_config(cls, config, **overrides) -> "AcceptanceSettings":
    """The settings `config.acceptance.FIELD` (or its alias `acceptance_FIELD`) names, defaults for
    the fields the config lacks."""
    fields = {}
    for f in dataclasses.fields(cls):
      value = _read(config, f.name, cls.PREFIX)
      if value is not _ABSENT:
        fields[f.name] = value
    return cls(**{**fields, **overrides}).checked()

  def checked(self) -> "AcceptanceSettings":
    if isinstance(self.temperatures, list):  # as a command line or JSON gives it
      object.__setattr__(self, "temperatures", tuple(self.temperatures))
    return self

  def decoding(self):
    """The DecodingSettings the acceptance evaluation's Decoder runs (drafter-model speculative)."""
    from specjax.decoding.decoder import DecodingSettings  # imports JAX

    fields = {k: getattr(self, k) for k in ("gamma", "max_new_tokens", "batch_size", "prompt_bucket")}
    return DecodingSettings(method="sps", **{k: v for k, v in fields.items() if v is not None}).checked()


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
  """How the `pretrain` and `finetune` jobs train, built once from the config (`from_config`)."""

  job: str  # pretrain or finetune (set by specjax.train.defaults.trainer_config)

  # Models. drafter: preset:NAME (from scratch), a Hugging Face checkpoint directory, or
  # run:DIR (the parameters of a specjax training run in DIR, e.g. a pretraining run).
  drafter: str = "preset:vicuna-68m"
  # The target: its tokenizer is the drafter's; its logits feed the distillation losses and the
  # acceptance evaluation. Never checkpointed.
  target: str | None = None
  tokenizer: str | None = None  # default: the target's directory
  # A reduced-vocabulary drafter (specjax.models.draft_vocab): a directory or draft_vocab.json
  # naming the tokens it predicts over, e.g. distill_data's WORKDIR (its responses' tokens,
  # `draft_vocab_coverage` of them), or "" for the full vocabulary. Stored with the export.
  draft_vocab: str = ""
  draft_vocab_coverage: float = 0.99
  target_dtype: str = "bfloat16"
  dtype: str = "bfloat16"  # the drafter's compute dtype (float32 or bfloat16); weights stay float32

  # Data: a seqio mixture of specjax.data.tasks (pretrain_multilingual, finetune_de_en, ...).
  data_dir: str = "../shared/data"  # the shared data layout, or {lang}-en/{train,eval}.{lang,en} files
  selfdistill_dir: str | None = None  # distill_data's workdir (finetuning)
  mixture: str = "pretrain_multilingual"
  template: str = "auto"  # hf (the tokenizer's chat template) when it has one, else vicuna_v1.1
  pretrain_source: str = "local"  # or tfds (C4 + Wiki-40B; needs TFDS_DATA_DIR)
  translate_source: str = "local"  # or tfds (WMT)
  tfds_data_dir: str | None = None
  data_limit: int = 0  # 0 = every example; N = the first N per language and split
  shuffle_buffer_size: int = 10_000
  data_shards: int = 0  # 0 = one per process; N: the global batch is read from N seqio shards
  sequence_length: int = 2048  # packed rows
  batch_size: int = 128  # global rows per step (the paper's effective batch)
  grad_accumulation: int = 1  # micro-batches per step (the batch is split into this many)

  # Optimisation: the paper's AdamW, cosine schedule, warmup 3%, weight decay 0.
  loss: str = "cross_entropy"  # or forward_kl, total_variation (distillation from the target)
  num_train_steps: int = 1000
  train_tokens: int = 0  # > 0: steps = train_tokens / (batch_size * sequence_length)
  learning_rate: float = 2e-5
  warmup_fraction: float = 0.03
  final_lr_fraction: float = 0.0
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0 = off
  seed: int = 0

  # (data, fsdp, tensor). fsdp shards the target (acceptance evaluation, distillation) so a 7B
  # target fits a v5e chip; a CE-only run without the target is leaner data-parallel, (-1, 1, 1):
  # specjax.aot measured 3x less temporary memory for the 68M drafter's step than under fsdp.
  mesh_shape: tuple = (1, -1, 1)

  # Logging, evaluation, checkpoints.
  log_every: int = 50
  tensorboard: bool = True
  eval_every: int = 500  # 0 = never
  eval_at_start: bool = True  # score the initial drafter too (step 0)
  eval_batches: int = 8  # teacher-forced held-out batches (mixtures with an eval split)
  acceptance: AcceptanceSettings = dataclasses.field(default_factory=AcceptanceSettings)  # config.acceptance.*
  checkpoint_every: int = 500
  checkpoints_to_keep: int = 3
  async_checkpointing: bool = True
  max_steps_this_run: int = 0  # 0 = to the end; N = stop (with a checkpoint) after N more steps
  # A resume whose data settings (batch_size, sequence_length, mixture, data folders, seed; see
  # trainer.DATA_SETTINGS) differ from the checkpoint's is refused: the data position is a step
  # count, so data would be re-read or skipped. True resumes anyway, with a warning.
  allow_resume_with_changes: bool = False
  export_hf: bool = True  # WORKDIR/drafter: the finished drafter as a Hugging Face checkpoint
  local_assets: bool = False

  @classmethod
  def from_config(cls, config, **overrides) -> "TrainerSettings":
    """The settings the config names (as they are, None included), defaults for the fields it
    lacks; then `checked`."""
    fields = {}
    for f in dataclasses.fields(cls):
      if f.name == "acceptance":
        fields[f.name] = AcceptanceSettings.from_config(config)
      elif f.name in config:
        fields[f.name] = config[f.name]
    if isinstance(fields.get("mesh_shape"), list):
      fields["mesh_shape"] = tuple(fields["mesh_shape"])
    return cls(**{**fields, **overrides}).checked()

  def replace(self, **fields) -> "TrainerSettings":
    return dataclasses.replace(self, **fields).checked()

  def checked(self) -> "TrainerSettings":
    """Self, or one SpecjaxError naming the config field at fault."""
    from specjax.train import losses  # imports JAX

    if self.loss not in losses.LOSSES:
      raise SpecjaxError(f"config field `loss`={self.loss!r}: expected one of {', '.join(losses.LOSSES)}")
    if self.dtype not in DTYPES:
      raise SpecjaxError(f"config field `dtype`={self.dtype!r}: expected one of {', '.join(DTYPES)}")
    for field in ("batch_size", "sequence_length", "grad_accumulation", "log_every"):
      if int(getattr(self, field)) < 1:
        raise SpecjaxError(f"config field `{field}`={getattr(self, field)}: must be >= 1")
    if self.batch_size % self.grad_accumulation:
      raise SpecjaxError(
        f"config fields `batch_size`={self.batch_size} and `grad_accumulation`="
        f"{self.grad_accumulation}: the batch must split into equal micro-batches"
      )
    if not self.drafter:
      raise SpecjaxError(
        "config field `drafter` is empty: give preset:NAME (from scratch), a Hugging Face "
        "checkpoint directory, or run:DIR (a specjax training run)"
      )
    if self.loss != "cross_entropy" and not self.target:
      raise SpecjaxError(f"config field `loss`={self.loss!r} distils from the target: set config field `target`")
    return self
