"""GGUF file -> Hugging Face checkpoint directory: `python -m specjax.models.convert SRC DST [--dtype float32]`.

SRC is a llama-architecture .gguf file (or `smollm2`, the packaged SmolLM2-135M-Instruct). DST gets
config.json, generation_config.json, model.safetensors and the tokenizer files (chat template
included), which load in specjax (`load_hf_checkpoint`) and in transformers' LlamaForCausalLM.
Converting once saves every later run the dequantization and the GGUF metadata parse.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from specjax.errors import SpecjaxError
from specjax.models.config import DTYPES
from specjax.models.gguf import load_gguf_checkpoint, load_gguf_tokenizer
from specjax.models.hf import save_hf_checkpoint


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # reported like every other mistake (exit code 2, one line)
    raise SpecjaxError(f"{message} (--help lists the arguments)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m specjax.models.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("src", help="a .gguf file, or smollm2")
  p.add_argument("dst", help="the Hugging Face checkpoint directory to write")
  p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the written weights")
  return p


def convert(src: str, dst: str, dtype: str = "float32") -> None:
  """Writes the Hugging Face directory `dst` from the GGUF file `src`."""

  model, config = load_gguf_checkpoint(src, dtype=dtype)
  tokenizer = load_gguf_tokenizer(src)
  try:
    save_hf_checkpoint(model, config, dst, tokenizer=tokenizer)
  except OSError as e:
    raise SpecjaxError(f"{dst}: cannot write the checkpoint ({e.strerror or e})") from None


def main(argv: Sequence[str] | None = None) -> int:
  """Returns the exit status: 0 written, 2 a mistake in the arguments or the file."""
  try:
    args = _parser().parse_args(argv)
    convert(args.src, args.dst, args.dtype)
  except SpecjaxError as e:
    print(f"specjax: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
