"""The trainer's config fields and their defaults, shared by configs/pretrain.py and
configs/finetune.py (which set what differs). Every field is documented here, once."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def trainer_config(job: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = job

  # Models. drafter: preset:NAME (from scratch), a Hugging Face checkpoint directory, or
  # run:DIR (the parameters of a specjax training run in DIR, e.g. a pretraining run).
  c.drafter = "preset:vicuna-68m"
  # The target: its tokenizer is the drafter's; its logits feed the distillation losses and the
  # acceptance evaluation. Never checkpointed.
  c.target = config_dict.placeholder(str)
  c.tokenizer = config_dict.placeholder(str)  # default: the target's directory
  # A reduced-vocabulary drafter (specjax.models.draft_vocab): a directory or draft_vocab.json
  # naming the tokens it predicts over, e.g. distill_data's WORKDIR (its responses' tokens,
  # `draft_vocab_coverage` of them), or "" for the full vocabulary. Stored with the export.
  c.draft_vocab = ""
  c.draft_vocab_coverage = 0.99
  c.target_dtype = "bfloat16"
  c.dtype = "bfloat16"  # the drafter's compute dtype (float32 or bfloat16); weights stay float32

  # Data: a seqio mixture of specjax.data.tasks (pretrain_multilingual, finetune_de_en, ...).
  c.data_dir = "../shared/data"  # the shared data layout, or {lang}-en/{train,eval}.{lang,en} files
  c.selfdistill_dir = config_dict.placeholder(str)  # distill_data's workdir (finetuning)
  c.mixture = "pretrain_multilingual"
  c.template = "auto"  # hf (the tokenizer's chat template) when it has one, else vicuna_v1.1
  c.pretrain_source = "local"  # or tfds (C4 + Wiki-40B; needs TFDS_DATA_DIR)
  c.translate_source = "local"  # or tfds (WMT)
  c.tfds_data_dir = config_dict.placeholder(str)
  c.data_limit = 0  # 0 = every example; N = the first N per language and split
  c.shuffle_buffer_size = 10_000
  c.data_shards = 0  # 0 = one per process; N: the global batch is read from N seqio shards
  c.sequence_length = 2048  # packed rows
  c.batch_size = 128  # global rows per step (the paper's effective batch)
  c.grad_accumulation = 1  # micro-batches per step (the batch is split into this many)

  # Optimisation: the paper's AdamW, cosine schedule, warmup 3%, weight decay 0.
  c.loss = "cross_entropy"  # or forward_kl, total_variation (distillation from the target)
  c.num_train_steps = 1000
  c.train_tokens = 0  # > 0: steps = train_tokens / (batch_size * sequence_length)
  c.learning_rate = 2e-5
  c.warmup_fraction = 0.03
  c.final_lr_fraction = 0.0
  c.weight_decay = 0.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_clip_norm = 1.0  # 0 = off
  c.seed = 0

  # (data, fsdp, tensor). fsdp shards the target (acceptance evaluation, distillation) so a 7B
  # target fits a v5e chip; a CE-only run without the target is leaner data-parallel, (-1, 1, 1):
  # specjax.aot measured 3x less temporary memory for the 68M drafter's step than under fsdp.
  c.mesh_shape = (1, -1, 1)

  # Logging, evaluation, checkpoints.
  c.log_every = 50
  c.tensorboard = True
  c.eval_every = 500  # 0 = never
  c.eval_at_start = True  # score the initial drafter too (step 0)
  c.eval_batches = 8  # teacher-forced held-out batches (mixtures with an eval split)
  # Acceptance prompts: "heldout:de,fr,..." (the eval split's sentences as translation prompts)
  # or Spec-Bench question.jsonl files; "" = no acceptance evaluation.
  c.acceptance_prompts = "heldout:de,fr,ja,ru,zh"
  c.acceptance_prompts_per_language = 8
  c.acceptance_temperatures = (0.0, 1.0)
  c.acceptance_gamma = 5
  c.acceptance_max_new_tokens = 128
  c.acceptance_batch_size = 8
  c.acceptance_prompt_bucket = 64
  c.checkpoint_every = 500
  c.checkpoints_to_keep = 3
  c.async_checkpointing = True
  c.max_steps_this_run = 0  # 0 = to the end; N = stop (with a checkpoint) after N more steps
  # A resume whose data settings (batch_size, sequence_length, mixture, data folders, seed; see
  # trainer.DATA_SETTINGS) differ from the checkpoint's is refused: the data position is a step
  # count, so data would be re-read or skipped. True resumes anyway, with a warning.
  c.allow_resume_with_changes = False
  c.export_hf = True  # WORKDIR/drafter: the finished drafter as a Hugging Face checkpoint
  c.local_assets = False
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict, *, steps: int) -> None:
  """runlocal: the embedded corpus, a random tiny target built into the workdir, a tiny drafter;
  about a minute on a CPU."""
  from specjax.data.parallel import EMBEDDED_CORPUS
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
  c.acceptance_prompts_per_language = 2
  c.acceptance_max_new_tokens = 16
  c.acceptance_gamma = 4
  c.acceptance_batch_size = 10
  c.acceptance_prompt_bucket = 128
  c.checkpoint_every = max(1, steps // 2)
