r"""The paper's experiment at a larger scale (not in CI): the demo's recipe on the training split of
../shared/data (all five pairs) with the real target, SmolLM2-135M-Instruct (cpu, gpu), or with
a ~100M target trained from scratch (scratch_cpu, scratch_gpu), one drafter per language,
evaluated on the held-out WMT sentences (the eval split) and on the paper's 80-prompt
multilingual Spec-Bench files.

  python benchmarks/mini_paper.py --preset cpu --workdir runs/mini_paper_cpu   # pipeline 72 min on 2 CPU cores, Spec-Bench ~55 more
  python benchmarks/mini_paper.py --preset gpu --workdir runs/mini_paper_gpu   # one NVIDIA GPU
  python benchmarks/mini_paper.py --preset scratch_cpu --workdir runs/mini_scratch   # 84 min on 2 CPU cores
  python benchmarks/mini_paper.py --preset smoke --workdir /tmp/mini_smoke     # minutes: the plumbing

Writes WORKDIR/report/report.md (held-out WMT), WORKDIR/specbench/report.md (Spec-Bench prompts)
and WORKDIR/mini_paper.json (both record sets, hardware, stage times, the command). A rerun
resumes at the first unfinished stage.

Spec-Bench prompts: all 80 per language at T=0 (--specbench_prompts_per_language N takes the
first N); at T=1 the first 16 on the cpu preset, all on gpu (--specbench_sampled_prompts_per_language N).
Each temperature's records are kept in WORKDIR/specbench/records_T{0,1}_first{N,all}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# cpu/gpu: the real target (SmolLM2-135M-Instruct); scratch_cpu/scratch_gpu: the ~100M target trained
# from scratch that README's earlier mini-paper tables used.
PRESETS = {"cpu": "real_cpu", "gpu": "real_gpu", "scratch_cpu": "mini_cpu", "scratch_gpu": "mini_gpu", "smoke": "tiny"}
# T=1 runs every method once per seed: on 2 CPU cores the 80 prompts per language are a T=0-only
# budget, so T=1 takes the first N of each language there (0 = all).
SAMPLED_PROMPTS_PER_LANGUAGE = {"cpu": 16, "gpu": 0, "scratch_cpu": 16, "scratch_gpu": 0, "smoke": 2}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data"))
  parser.add_argument("--specbench_prompts_per_language", type=int, default=0, help="T=0; 0 = all 80")
  parser.add_argument(
    "--specbench_sampled_prompts_per_language",
    type=int,
    default=None,
    help="T=1; default: the preset's (cpu 16, gpu all)",
  )
  args = parser.parse_args(argv)

  from configs import demo as demo_config
  from specjax.jobs import demo
  from specjax.data.parallel import LANGS
  from specjax.errors import SpecjaxError
  from specjax.eval import report, specbench
  from specjax.models.hf import load_model, load_tokenizer

  data_dir = os.path.abspath(args.data_dir)
  bench_glob = os.path.join(data_dir, "multilingual-specbench", "*_question.jsonl")
  if not os.path.isdir(data_dir):
    print(f"mini_paper: {data_dir} is not a directory (the shared data folder)", file=sys.stderr)
    return 2
  try:
    config = demo_config.get_config(f"scale={PRESETS[args.preset]},data_dir={data_dir}")
    if args.preset == "smoke":
      config.langs = LANGS
    started = time.perf_counter()
    out = demo.run(config, args.workdir)

    # The same models on the paper's 80-prompt benches (Vicuna-style chat turns, as trained).
    workdir = args.workdir
    target_dir = os.path.join(workdir, "target") if config.target else os.path.join(workdir, "target_train", "drafter")
    tokenizer = load_tokenizer(target_dir)
    target, _ = load_model(target_dir, "float32")
    langs = tuple(config.langs)
    drafters = {
      name: load_model(os.path.join(workdir, "drafters", name, "drafter"), "float32")[0]
      for name in ("general",) + langs
    }
    from specjax.decoding.prompts import read_prompt_files

    questions = [q for q in read_prompt_files(bench_glob) if q["category"][:2] in langs]
    from specjax.train.acceptance import first_per_category

    greedy_cap = args.specbench_prompts_per_language or (2 if args.preset == "smoke" else 0)
    sampled_cap = args.specbench_sampled_prompts_per_language
    if sampled_cap is None:
      sampled_cap = SAMPLED_PROMPTS_PER_LANGUAGE[args.preset]
    greedy_questions = first_per_category(questions, greedy_cap)
    sampled_questions = first_per_category(greedy_questions, sampled_cap)
    common = demo.evaluation_settings(config, target, tokenizer)

    def evaluated(name, fn):  # kept per temperature and prompt count: a rerun does not redo them
      cache = os.path.join(workdir, "specbench", f"{name}.json")
      if not os.path.exists(cache):
        records, _ = fn()
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "w", encoding="utf-8") as f:
          json.dump(records, f, ensure_ascii=False)
      with open(cache, encoding="utf-8") as f:
        return json.load(f)

    bench = evaluated(
      f"records_T0_first{greedy_cap or 'all'}",
      lambda: specbench.evaluate(
        target,
        tokenizer,
        drafters,
        greedy_questions,
        temperatures=(0.0,),
        seeds=(0,),
        runs=[("ar", None), ("pld", None), ("sps", "general"), ("sps", "auto")],
        **common,
      ),
    )
    bench += evaluated(
      f"records_T1_first{sampled_cap or 'all'}",
      lambda: specbench.evaluate(
        target,
        tokenizer,
        drafters,
        sampled_questions,
        temperatures=(1.0,),
        seeds=tuple(config.sampling_seeds),
        runs=[("ar", None), ("sps", "general"), ("sps", "auto")],
        **common,
      ),
    )
    report.write_report(
      bench,
      os.path.join(workdir, "specbench"),
      f"mini paper ({args.preset}): multilingual Spec-Bench prompts",
      notes=[
        f"Prompts: {bench_glob}: {len(greedy_questions)} questions at T=0, "
        f"{len(sampled_questions)} at T=1 (the first of each language; "
        f"{len(config.sampling_seeds)} seeds)."
      ],
    )
  except SpecjaxError as e:
    print(f"mini_paper: error: {e}", file=sys.stderr)
    return 2
  summary = {
    "preset": args.preset,
    "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    "hardware": {
      "machine": platform.machine(),
      "processor": platform.processor(),
      "cpus": os.cpu_count(),
      "platform": __import__("jax").devices()[0].platform,
      "device_kind": __import__("jax").devices()[0].device_kind,
    },
    "seconds": time.perf_counter() - started,
    "heldout_records": out["records"],
    "specbench_records": bench,
    "target_quality": out["quality"],
  }
  with open(os.path.join(workdir, "mini_paper.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  for temperature in (0.0, 1.0):
    report.print_table(bench, temperature)
  print(f"mini_paper: wrote {os.path.join(workdir, 'mini_paper.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
