r"""Finetune a drafter for one language on the target's own outputs (the recipe's F step).

The data is the self-distillation set that configs/distill_data.py wrote (`selfdistill_dir`);
without it the finetune mixture falls back to the reference translations. Writes what
configs/pretrain.py writes; rerun the same command to resume.

On a CPU in about a minute (the embedded corpus, a random tiny target, a tiny drafter):

  python -m specjax.main --config configs/finetune.py:runlocal,lang=de --workdir /tmp/specjax_finetune_de

The paper's German drafter: Vicuna 68M pretrained (a Hugging Face checkpoint, or run:DIR for a
specjax pretraining run), 3 epochs over the target's German->English generations:

  python -m specjax.main --config configs/finetune.py:lang=de \
      --config.target=/ckpt/vicuna-7b-v1.3 --config.drafter=/ckpt/vicuna-68m \
      --config.selfdistill_dir=/data/selfdistill_deen --config.train_tokens=1_300_000_000 \
      --workdir gs://bucket/finetune_deen

Config string arguments (comma-separated): runlocal, lang, steps, tokens (finetuning tokens),
scratch (true: skip pretraining, start from a random drafter), lr. Any field can be set with
--config.FIELD=VALUE (fields: specjax/train/settings.py). Ablations: `sweep()` below, expanded
by `python launch/sweep.py configs/finetune.py --workdir BASE`.
"""

from specjax.config_utils import given, parse_arg, unset
from specjax.data.parallel import LANGS
from specjax.train.defaults import shrink_for_cpu, trainer_config


def get_config(arg=None):
  arg = parse_arg(
    arg,
    source="configs/finetune.py",
    runlocal=False,
    lang="de",
    steps=unset(int),
    tokens=0,
    scratch=False,
    lr=unset(float),
  )
  if arg.lang not in LANGS:
    from specjax.errors import SpecjaxError

    raise SpecjaxError(f"configs/finetune.py: lang={arg.lang!r}: expected one of {', '.join(LANGS)}")
  c = trainer_config("finetune")
  c.mixture = f"finetune_{arg.lang}_en"
  c.drafter = "preset:vicuna-68m" if arg.scratch else "run:{workdir}/../pretrain"
  c.selfdistill_dir = "{workdir}/../selfdistill"
  c.acceptance.prompts = f"heldout:{arg.lang}"
  c.acceptance.prompts_per_language = 40
  c.learning_rate = 2e-5  # the paper's (3e-5 for Llama 68M)
  c.num_train_steps = 5000
  if arg.runlocal:
    shrink_for_cpu(c, steps=given(arg.steps, 40))
    c.drafter = "preset:tiny-drafter"
    c.selfdistill_dir = None
    c.acceptance.prompts_per_language = 4
    c.sequence_length = 384  # prompts in the Vicuna template are ~120 tokens; half the row is theirs
  c.num_train_steps = given(arg.steps, c.num_train_steps)
  c.train_tokens = arg.tokens
  c.learning_rate = given(arg.lr, c.learning_rate)
  return c


def sweep():
  """The paper's ablations: finetuning tokens (log-spaced), pretrain+finetune vs finetune only,
  and the language."""
  runs = [{"config_arg": f"lang=de,tokens={tokens}"} for tokens in (4_000_000, 40_000_000, 400_000_000)]
  runs += [{"config_arg": "lang=de,scratch=true"}]
  runs += [{"config_arg": f"lang={lang}"} for lang in LANGS]
  return runs
