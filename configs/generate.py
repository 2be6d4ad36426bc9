r"""Generate answers to Spec-Bench prompts and measure speed and acceptance (the paper's evaluation).

Writes WORKDIR/answers.jsonl (one line per prompt turn) and WORKDIR/metrics.json (tokens/s,
τ, acceptance rate, per-position acceptance, by category, compile time, hardware, this config).

Smoke run on a CPU (tiny random-weight models built into the workdir, no network, no data):

  python -m specjax.main --config configs/generate.py:runlocal --workdir /tmp/specjax_generate

The paper's setting (Vicuna 7B v1.3 target, a 68M drafter, greedy, five languages):

  python -m specjax.main --config configs/generate.py:method=sps \
      --config.target=/ckpt/vicuna-7b-v1.3 --config.drafter=/ckpt/vicuna-68m-deen \
      --workdir /tmp/specjax_sps_deen

Mixed-language prompts, each question drafted by its own language's drafter in one compiled loop:

  python -m specjax.main --config configs/generate.py:method=sps,batch_size=8 --config.drafter=auto \
      --config.drafters=general=runs/demo/drafters/general/drafter,de=runs/demo/drafters/de/drafter,... \
      --config.target=smollm2 --workdir /tmp/specjax_routed

Plain decoding on the same prompts (the speedup's denominator) and prompt lookup:

  python -m specjax.main --config configs/generate.py:method=ar --config.target=... --workdir ...
  python -m specjax.main --config configs/generate.py:method=pld,gamma=4 --config.target=... --workdir ...

Config string arguments (comma-separated): runlocal, method, gamma, temperature, seed,
batch_size, max_new_tokens. Any field can also be set with --config.FIELD=VALUE.
Paths in target, drafter, tokenizer and prompts may contain {workdir}.
"""

import ml_collections
from ml_collections import config_dict

from specjax.config_utils import given, parse_arg, unset


def get_config(arg=None):
  # Numbers not given take the variant's default (runlocal's are small).
  arg = parse_arg(
    arg,
    source="configs/generate.py",
    runlocal=False,
    method="sps",
    gamma=unset(int),
    temperature=0.0,
    seed=0,
    batch_size=unset(int),
    max_new_tokens=unset(int),
  )
  c = ml_collections.ConfigDict()
  c.job = "generate"

  # Models: a Hugging Face checkpoint directory (with its tokenizer), or preset:NAME (random
  # weights; then `tokenizer` must name a directory with a tokenizer).
  c.target = config_dict.placeholder(str)
  c.drafter = config_dict.placeholder(str)  # needed by method=sps only; "auto": route by language (below)
  # drafter=auto: name=path,... (general, de, fr, ja, ru, zh); each question drafts with its
  # language's drafter (else general), all in one compiled loop (the rows of a batch may differ).
  c.drafters = config_dict.placeholder(str)
  c.tokenizer = config_dict.placeholder(str)  # default: the target's directory
  c.dtype = "bfloat16"  # weights and activations: float32, bfloat16 or float16

  # Decoding: ar (plain), sps (drafter model), pld (prompt lookup).
  c.method = arg.method
  c.gamma = given(arg.gamma, 10)  # drafts per round; with dynamic_gamma the ceiling of the schedule
  c.dynamic_gamma = True  # transformers' schedule, as in the paper: start gamma_start, +2 / -1
  c.gamma_start = 5
  c.lookup_drafts = False  # sps: prompt lookup's drafts first where an n-gram matches, then the drafter's
  c.temperature = arg.temperature  # 0 = greedy
  c.top_k = 0  # 0 = off
  c.top_p = 1.0
  c.max_new_tokens = given(arg.max_new_tokens, 1024)
  c.batch_size = given(arg.batch_size, 1)
  c.seed = arg.seed
  c.max_cache_len = config_dict.placeholder(int)  # default: the target's max_position_embeddings
  c.prompt_bucket = 64  # prompts are padded to a multiple of this: one compile per bucket

  # Prompts: Spec-Bench question.jsonl files (a path, a glob, or a comma-separated list).
  c.prompts = "../shared/data/multilingual-specbench/*_question.jsonl"
  c.max_prompts = 0  # 0 = all; otherwise the first N questions
  c.template = "auto"  # hf (the tokenizer's chat template) when it has one, else vicuna_v1.1; or llama-2, plain
  c.system_prompt = config_dict.placeholder(str)  # default: the template's own

  c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); used when there is more than one device
  c.drafter_sharding = "replicated"  # or "sharded": the drafter by the same rules as the target
  c.warmup = True  # compile before timing, so tokens/s excludes compile time

  # local_assets: build target, drafter and prompts when absent: random-weight checkpoints of
  # the `tiny` and `tiny-drafter` presets sharing a tokenizer trained on a few built-in
  # sentences, and a question file made from them (specjax/jobs/local_assets.py). runlocal uses it.
  c.local_assets = False
  if arg.runlocal:
    c.local_assets = True
    c.target = "{workdir}/local_assets/target"
    c.drafter = "{workdir}/local_assets/drafter"
    c.prompts = "{workdir}/local_assets/question.jsonl"
    c.dtype = "float32"
    c.gamma = given(arg.gamma, 4)
    c.max_new_tokens = given(arg.max_new_tokens, 16)
    c.batch_size = given(arg.batch_size, 4)
    c.prompt_bucket = 128
  return c
