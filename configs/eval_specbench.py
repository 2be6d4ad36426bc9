r"""Multilingual Spec-Bench evaluation: plain decoding, prompt lookup and speculative decoding with
every drafter, on every language, greedy and sampled (the paper's tables, one run).

Writes WORKDIR/metrics.json (one record per language, method, drafter, temperature and seed;
BLEU/chrF when references are given), WORKDIR/answers/<model_id>-T<t>-seed<s>.jsonl (Spec-Bench's
answer format) and WORKDIR/report.md (the paper's tables, cross-language matrix, plots).

Smoke run on a CPU (tiny random-weight target and drafters general/de/fr built into the workdir,
no network, no data):

  python -m specjax.main --config configs/eval_specbench.py:runlocal --workdir /tmp/specjax_eval

The paper's setting (Vicuna 7B v1.3 target, a general and five language drafters, greedy and
T=1 with 3 seeds, routed drafters, the cross-language matrix at T=0, 80 prompts per language):

  python -m specjax.main --config configs/eval_specbench.py \
      --config.target=/ckpt/vicuna-7b-v1.3 \
      --config.drafters=general=/ckpt/vicuna-68m,de=/ckpt/drafter-de,fr=/ckpt/drafter-fr,ja=/ckpt/drafter-ja,ru=/ckpt/drafter-ru,zh=/ckpt/drafter-zh \
      --config.drafter=auto,general --config.cross_language=true \
      --config.dtype=float16 --workdir /tmp/specjax_eval_vicuna7b

Only greedy, only SpS with the German drafter on every language:

  python -m specjax.main --config configs/eval_specbench.py:methods=ar+sps,drafter=de,temperature=0 ...

The γ ablation (one run per γ; see launch/sweep.py):

  python launch/sweep.py configs/eval_specbench.py --workdir /tmp/gamma --local -- --config.target=... --config.drafters=...

Config string arguments (comma-separated): runlocal, methods and drafter (lists joined by +),
temperature (one; default both 0 and 1), gamma, max_prompts (per language). Any field can also
be set with --config.FIELD=VALUE. Paths may contain {workdir}.
"""

import ml_collections
from ml_collections import config_dict

from specjax.config_utils import given, parse_arg, unset


def get_config(arg=None):
  # Numbers not given take the variant's default (runlocal's are small).
  arg = parse_arg(
    arg,
    source="configs/eval_specbench.py",
    runlocal=False,
    methods="ar+pld+sps",
    drafter="",
    temperature=unset(float),
    gamma=unset(int),
    max_prompts=0,
  )
  c = ml_collections.ConfigDict()
  c.job = "eval_specbench"

  # Models: Hugging Face checkpoint directories (or preset:NAME, random weights). drafters:
  # "name=path,..." with names general, de, fr, ja, ru, zh; all must share the target's tokenizer.
  c.target = config_dict.placeholder(str)
  c.tokenizer = config_dict.placeholder(str)  # default: the target's directory
  c.drafters = ""
  c.dtype = "bfloat16"  # float32, bfloat16 or float16 (the paper: float16)
  c.seed = 0  # weights of preset: models

  # What runs: methods (ar, pld, sps); for sps, drafter = auto (routed per question), all
  # (every drafter on every language), a drafter name, or several joined by "," or "+".
  # cross_language adds every language drafter on every language at T=0 (the matrix).
  c.methods = arg.methods
  c.drafter = arg.drafter or "auto"
  c.cross_language = False
  c.temperatures = (0.0, 1.0) if arg.temperature is None else (arg.temperature,)
  c.seeds = (0, 1, 2)  # sampled runs, one each
  c.greedy_seeds = (0,)  # greedy is deterministic: one run
  c.gamma = given(arg.gamma, 10)  # drafts per round; with dynamic_gamma the ceiling of the schedule
  c.dynamic_gamma = True  # transformers' schedule (start gamma_start, +2 / -1), as in the paper
  c.gamma_start = 5
  c.lookup_drafts = False  # sps: prompt lookup's drafts first where an n-gram matches, then the drafter's
  c.max_new_tokens = 1024
  c.batch_size = 1
  c.max_cache_len = config_dict.placeholder(int)  # default: the target's max_position_embeddings
  c.prompt_bucket = 64  # prompts are padded to a multiple of this: one compile per bucket

  # Prompts: Spec-Bench question.jsonl files (a glob or a comma-separated list).
  c.prompts = "../shared/data/multilingual-specbench/*_question.jsonl"
  c.max_prompts_per_language = arg.max_prompts  # 0 = all; otherwise the first N per category
  c.template = "auto"  # hf (the tokenizer's chat template) when it has one, else vicuna_v1.1
  c.system_prompt = config_dict.placeholder(str)  # default: the template's own
  # Reference translations for BLEU/chrF: "deen=/path/ref.en,..." line-aligned with the questions.
  c.references = ""

  c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); used when there is more than one device
  c.drafter_sharding = "replicated"  # or "sharded"
  # A JAX compilation cache directory: drafters of one architecture then compile once.
  c.compilation_cache = config_dict.placeholder(str)

  # local_assets: build the target, drafters and prompts when absent (specjax/jobs/local_assets.py):
  # random-weight `tiny` / `tiny-drafter` checkpoints sharing one tokenizer.
  c.local_assets = False
  if arg.runlocal:
    c.local_assets = True
    c.target = "{workdir}/local_assets/target"
    c.drafters = (
      "general={workdir}/local_assets/drafter_general,de={workdir}/local_assets/drafter_de,"
      "fr={workdir}/local_assets/drafter_fr"
    )
    c.prompts = "{workdir}/local_assets/question.jsonl"
    c.drafter = arg.drafter or "auto+general"
    c.cross_language = True
    c.seeds = (0, 1)
    c.dtype = "float32"
    c.gamma = given(arg.gamma, 4)
    c.gamma_start = 3
    c.max_new_tokens = 16
    c.prompt_bucket = 256  # every prompt, turn 2 included, in one bucket: one compile per program
    c.compilation_cache = "{workdir}/jax_cache"
  return c


def sweep():
  """The γ ablation: fixed draft lengths, then the paper's dynamic schedule (plain decoding in
  each run: the speedup's denominator is measured beside its numerator)."""
  return [{"config_arg": "methods=ar+sps", "gamma": gamma, "dynamic_gamma": False} for gamma in (1, 3, 5, 7)] + [
    {"config_arg": "methods=ar+sps", "gamma": 10, "dynamic_gamma": True}
  ]
