r"""Self-distillation data: the target's own translations of training sentences (the paper's recipe).

Writes WORKDIR/data/selfdistill-{src}{tgt}-{shard}-of-{n}.jsonl and WORKDIR/manifest.json; a
killed run restarted with the same command finishes the missing shards only.

Smoke run on a CPU (a tiny random-weight target built into the workdir; a few dozen German
sentences from ../shared/data, or local_assets' sentences when that folder is absent):

  python -m specjax.main --config configs/distill_data.py:runlocal --workdir /tmp/specjax_distill

The paper's setting (Vicuna 7B v1.3 target, German->English, temperatures 0.0, 0.3, 0.7, 1.0):

  python -m specjax.main --config configs/distill_data.py:src=de \
      --config.target=/ckpt/vicuna-7b-v1.3 --workdir /tmp/specjax_distill_deen

Config string arguments (comma-separated): runlocal, src, tgt, num_sources, num_shards,
batch_size, max_new_tokens, seed, max_shards_this_run. Any field can also be set with
--config.FIELD=VALUE (e.g. --config.temperatures='(0.0, 1.0)'). Paths in target, tokenizer and
data_dir may contain {workdir}.
"""

import ml_collections
from ml_collections import config_dict

from specjax.config_utils import given, parse_arg, unset


def get_config(arg=None):
  # Numbers not given take the variant's default (runlocal's are small); num_sources=0 means all.
  arg = parse_arg(
    arg,
    source="configs/distill_data.py",
    runlocal=False,
    src="de",
    tgt="en",
    num_sources=unset(int),
    num_shards=unset(int),
    batch_size=unset(int),
    max_new_tokens=unset(int),
    seed=0,
    max_shards_this_run=0,
  )
  c = ml_collections.ConfigDict()
  c.job = "distill_data"

  # The target: a Hugging Face checkpoint directory (with its tokenizer), or preset:NAME (random
  # weights; then `tokenizer` must name a directory with a tokenizer).
  c.target = config_dict.placeholder(str)
  c.tokenizer = config_dict.placeholder(str)  # default: the target's directory
  c.dtype = "bfloat16"  # float32, bfloat16 or float16

  # Sources: the training split of src-en (or en-tgt) in the shared data folder
  # (specjax.data.parallel; evaluation sentences are never used).
  c.data_dir = "../shared/data"
  c.src = arg.src
  c.tgt = arg.tgt  # one of src, tgt is "en"
  c.num_sources = given(arg.num_sources, 0)  # 0 = every training sentence
  c.template = "auto"  # hf (the tokenizer's chat template) when it has one, else vicuna_v1.1; or llama-2, plain

  # Generation: plain decoding, one record per (sentence, temperature).
  c.temperatures = (0.0, 0.3, 0.7, 1.0)
  c.max_new_tokens = given(arg.max_new_tokens, 256)
  c.batch_size = given(arg.batch_size, 32)
  c.seed = arg.seed
  c.max_cache_len = config_dict.placeholder(int)  # default: the target's max_position_embeddings
  c.prompt_bucket = 64  # prompts are padded to a multiple of this: one compile per bucket
  c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor); used when there is more than one device

  # Output: records cut into num_shards files, each written whole.
  c.num_shards = given(arg.num_shards, 64)
  c.max_shards_this_run = arg.max_shards_this_run  # 0 = all; N = stop after N new shards

  # local_assets: build the target when absent (a random-weight `tiny` checkpoint with a tokenizer
  # trained on specjax/jobs/local_assets.py's sentences). runlocal uses it.
  c.local_assets = False
  if arg.runlocal:
    c.local_assets = True
    c.target = "{workdir}/local_assets/target"
    c.dtype = "float32"
    c.num_sources = given(arg.num_sources, 24)
    c.num_shards = given(arg.num_shards, 4)
    c.batch_size = given(arg.batch_size, 8)
    c.max_new_tokens = given(arg.max_new_tokens, 16)
    c.prompt_bucket = 128
  return c
