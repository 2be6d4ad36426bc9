"""`make demo`: the generate job on its embedded default, three ways, side by side.

Runs `configs/generate.py:runlocal` (tiny random-weight target and drafter sharing a tokenizer
trained on a few built-in sentences; no downloads, no ../shared) with plain decoding, a drafter
and prompt lookup, checks that the greedy outputs agree token for token, and prints tokens/s
and τ. The paper's whole recipe in miniature (train, distil, evaluate per language) is the
demo issue's; this shows the engine the recipe runs on.
"""
import json
import os
import sys
import tempfile

from specjax.errors import SpecjaxError


def main() -> int:
  from configs import generate
  from specjax.decoding import generate_job
  workdir = os.environ.get("SPECJAX_DEMO_DIR") or tempfile.mkdtemp(prefix="specjax_demo_")
  rows = []
  for method in ("ar", "sps", "pld"):
    config = generate.get_config(f"runlocal,method={method}")
    run_dir = os.path.join(workdir, method)
    config.target, config.drafter, config.prompts = (
        p.replace("{workdir}", workdir) for p in (config.target, config.drafter, config.prompts))
    out = generate_job.run(config, run_dir)
    with open(os.path.join(run_dir, "answers.jsonl"), encoding="utf-8") as f:
      tokens = [json.loads(line)["token_ids"] for line in f]
    rows.append((method, out, tokens))
  same = all(tokens == rows[0][2] for _, _, tokens in rows)
  print(f"\n{'method':8s} {'tokens/s':>10s} {'tau':>6s} {'accept':>7s}  (tiny random models, greedy, CPU)")
  for method, out, _ in rows:
    rate = out.get("acceptance_rate")
    print(f"{method:8s} {out['tokens_per_second']:10.1f} {out['tau']:6.2f} {'-' if rate is None else f'{rate:.2f}':>7s}")
  print(f"greedy outputs identical across methods: {same}; answers and metrics under {workdir}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  try:
    sys.exit(main())
  except SpecjaxError as e:
    print(f"specjax: error: {e}", file=sys.stderr)
    sys.exit(2)
