r"""Pretrain a drafter from scratch on general multilingual text (the recipe's P step).

Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard, WORKDIR/checkpoints (orbax; rerun the same
command to resume) and WORKDIR/drafter (the finished drafter, a Hugging Face checkpoint).

On a CPU in about a minute (the embedded corpus, a random tiny target for the acceptance
evaluation, a tiny drafter):

  python -m specjax.main --config configs/pretrain.py:runlocal --workdir /tmp/specjax_pretrain

The paper's 68M drafter for Vicuna 7B, on the shared data's training split (a TPU VM or GPU):

  python -m specjax.main --config configs/pretrain.py \
      --config.target=/ckpt/vicuna-7b-v1.3 --workdir gs://bucket/pretrain_68m

On C4 and Wiki-40B from TFDS instead: add --config.pretrain_source=tfds.

Config string arguments (comma-separated): runlocal, size (a model preset, e.g. vicuna-68m),
steps, batch_size, sequence_length, lr. Any field can be set with --config.FIELD=VALUE; the
fields are documented in specjax/train/settings.py. Ablations: `sweep()` below, expanded by
`python launch/sweep.py configs/pretrain.py --workdir BASE`.
"""

from specjax.config_utils import given, parse_arg, unset
from specjax.train.defaults import shrink_for_cpu, trainer_config


def get_config(arg=None):
  arg = parse_arg(
    arg,
    source="configs/pretrain.py",
    runlocal=False,
    size="",
    steps=unset(int),
    batch_size=unset(int),
    sequence_length=unset(int),
    lr=unset(float),
  )
  c = trainer_config("pretrain")
  c.mixture = "pretrain_multilingual"
  c.drafter = f"preset:{arg.size or 'vicuna-68m'}"
  c.learning_rate = 3e-4  # from scratch; the paper's 2e-5 is for finetuning a pretrained drafter
  c.num_train_steps = 20_000
  c.eval_every = 1000
  c.checkpoint_every = 1000
  if arg.runlocal:
    shrink_for_cpu(c, steps=given(arg.steps, 40))
    c.drafter = f"preset:{arg.size or 'tiny-drafter'}"
  c.num_train_steps = given(arg.steps, c.num_train_steps)
  c.batch_size = given(arg.batch_size, c.batch_size)
  c.sequence_length = given(arg.sequence_length, c.sequence_length)
  c.learning_rate = given(arg.lr, c.learning_rate)
  return c


def sweep():
  """Drafter size: the paper's 68M and a smaller and a larger sibling (presets)."""
  return [{"config_arg": f"size={size}"} for size in ("drafter-small", "vicuna-68m", "drafter-large")]
