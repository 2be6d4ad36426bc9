"""A drafter made from its target: the target's embeddings (with the tied or untied output layer),
final norm and a few of its layers.

  python -m specjax.models.derive TARGET OUT --layers 0        # a 1-layer drafter from layer 0
  python -m specjax.models.derive model.gguf OUT --layers 0,29

Why: a drafter must predict the target's next token, and the target's own embeddings and lowest
layers already live in its representation space; trained from random weights, a drafter with a
49k-token vocabulary needs far more text than a few CPU minutes give it before it is accepted at
all. Finetuning (configs/finetune.py) then adapts the few layers to the target's outputs.
"""

from __future__ import annotations

import argparse
import sys

from flax import nnx

from specjax.errors import SpecjaxError
from specjax.models.hf import load_model, load_tokenizer, save_hf_checkpoint
from specjax.models.llama import init_model


def drafter_from_target(target: str, layers: tuple[int, ...], out_dir: str, dtype: str = "float32") -> None:
  """Writes a Hugging Face checkpoint of the drafter (target's tokenizer beside it) to out_dir.
  target: a checkpoint directory, a .gguf file or an alias load_model knows (smollm2)."""

  model, config = load_model(target, dtype)
  if not layers or min(layers) < 0 or max(layers) >= config.num_layers:
    raise SpecjaxError(
      f"drafter layers {list(layers)}: expected indices of the target's layers in [0, {config.num_layers})"
    )
  drafter = init_model(config.replace(num_layers=len(layers)), 0)
  drafter.embed_tokens = model.embed_tokens
  drafter.norm = model.norm
  if model.lm_head is not None:
    drafter.lm_head = model.lm_head
  drafter.layers = nnx.List([model.layers[i] for i in layers])
  save_hf_checkpoint(drafter, drafter.config, out_dir, tokenizer=load_tokenizer(target))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("target", help="the target: a Hugging Face checkpoint directory or a .gguf file")
  parser.add_argument("out", help="directory for the drafter")
  parser.add_argument("--layers", default="0", help="comma-separated target layer indices (default 0)")
  args = parser.parse_args(argv)
  try:
    try:
      layers = tuple(int(x) for x in args.layers.split(","))
    except ValueError:
      raise SpecjaxError(f"--layers={args.layers!r}: expected comma-separated integers, e.g. 0 or 0,29") from None
    drafter_from_target(args.target, layers, args.out)
  except SpecjaxError as e:
    print(f"specjax: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote a {len(layers)}-layer drafter to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
