"""The eval_specbench job: runlocal end to end through the CLI (a record for every run, Spec-Bench
answer files, report.md), greedy losslessness across every method and drafter, speedups
derivable, BLEU/chrF, and user mistakes named."""

import json
import os
import subprocess
import sys

import pytest

from specjax.decoding.prompts import read_questions
from specjax.errors import SpecjaxError
from specjax.eval import specbench
from specjax.jobs import eval_specbench as eval_specbench_job
from specjax.jobs import local_assets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = {
  "language",
  "category",
  "method",
  "drafter",
  "temperature",
  "seed",
  "prompts",
  "new_tokens",
  "wall_s",
  "tokens_per_second",
  "tau",
  "tau_drafted",
  "acceptance_rate",
  "per_position",
  "per_position_conditional",
}


def _config(arg="runlocal"):
  sys.path.insert(0, REPO)
  try:
    from configs import eval_specbench
  finally:
    sys.path.remove(REPO)
  return eval_specbench.get_config(arg), eval_specbench


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory):
  """configs/eval_specbench.py:runlocal through the CLI: (workdir, metrics, {file name: answers})."""
  workdir = tmp_path_factory.mktemp("eval_specbench")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
    [sys.executable, "-m", "specjax.main", "--config", "configs/eval_specbench.py:runlocal", "--workdir", str(workdir)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "metrics.json", encoding="utf-8") as f:
    m = json.load(f)
  answers = {}
  for name in sorted(os.listdir(workdir / "answers")):
    with open(workdir / "answers" / name, encoding="utf-8") as f:
      answers[name] = [json.loads(line) for line in f]
  return workdir, m, answers


def _expected_runs():
  """(category, method, drafter, temperature, seed) that runlocal's config asks for."""
  config, _ = _config()
  categories = {q["category"] for q in local_assets.questions()}
  expected = set()
  for t in config.temperatures:
    for seed in config.greedy_seeds if t == 0 else config.seeds:
      for run in [("ar", None), ("pld", None), ("sps", "auto"), ("sps", "general")] + (
        [("sps", "de"), ("sps", "fr")] if t == 0 else []
      ):
        expected |= {(c, *run, float(t), seed) for c in categories}
  return expected


def test_runlocal_records_cover_every_run(runlocal):
  workdir, m, _ = runlocal
  records = m["records"]
  keys = [(r["category"], r["method"], r["drafter"], r["temperature"], r["seed"]) for r in records]
  assert len(keys) == len(set(keys)) and set(keys) == _expected_runs()
  questions = read_questions(str(workdir / "local_assets" / "question.jsonl"))
  for r in records:
    assert set(r) == RECORD_FIELDS
    assert r["prompts"] == sum(q["category"] == r["category"] for q in questions)  # every question counted
    assert r["tokens_per_second"] > 0 and r["new_tokens"] > 0 and r["tau"] >= 1.0
    assert r["language"] == {"deen": "de", "fren": "fr", "ruen": "ru", "jaen": "ja", "zhen": "zh"}.get(
      r["category"], r["category"]
    )
    if r["method"] == "ar":
      assert r["tau"] == 1.0 and r["acceptance_rate"] is None and r["per_position"] == []
    if r["method"] == "sps":
      assert r["acceptance_rate"] is not None and 1 <= len(r["per_position"]) <= 4  # runlocal's gamma
  assert m["hardware"]["platform"] == "cpu" and m["config"]["job"] == "eval_specbench" and m["bleu"] == {}
  assert os.path.isfile(workdir / "report.md") and os.path.isfile(workdir / "records.json")
  with open(workdir / "report.md", encoding="utf-8") as f:
    assert "eval_specbench.py:runlocal" in f.read()  # the command line is in the notes


def test_runlocal_answers_in_spec_bench_format(runlocal):
  workdir, m, answers = runlocal
  questions = read_questions(str(workdir / "local_assets" / "question.jsonl"))
  runs = {(r["method"], r["drafter"], r["temperature"], r["seed"]) for r in m["records"]}
  expected_files = {
    f"specjax-{method}{'-' + drafter if drafter else ''}-T{t:g}-seed{seed}.jsonl" for method, drafter, t, seed in runs
  }
  assert set(answers) == expected_files
  ids = set()
  for name, lines in answers.items():
    assert [a["question_id"] for a in lines] == [q["question_id"] for q in questions]  # one line per question
    for a, q in zip(lines, questions):
      assert name == f"{a['model_id']}-T{a['temperature']:g}-seed{a['seed']}.jsonl"
      assert {
        "question_id",
        "answer_id",
        "model_id",
        "choices",
        "tstamp",
        "category",
        "method",
        "drafter",
        "temperature",
        "seed",
      } <= set(a)
      (choice,) = a["choices"]
      assert choice["index"] == 0
      for field in ("turns", "decoding_steps", "new_tokens", "wall_time", "token_ids"):
        assert len(choice[field]) == len(q["turns"]), field
      assert choice["new_tokens"] == [len(t) for t in choice["token_ids"]]
      assert all(0 < n <= 16 for n in choice["new_tokens"])
      assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
      assert (a["drafter"] == "auto") == ("routed_drafter" in a)
      ids.add(a["answer_id"])
  assert len(ids) == sum(len(lines) for lines in answers.values())
  assert specbench._answer_id("specjax-ar", 0.0, 0, "q") == specbench._answer_id("specjax-ar", 0.0, 0, "q")
  routed = {a["question_id"]: a["routed_drafter"] for a in answers["specjax-sps-auto-T0-seed0.jsonl"]}
  assert routed["local_deen_0"] == "de" and routed["local_fren_2"] == "fr" and routed["local_zhen_8"] == "general"


def test_greedy_outputs_identical_across_methods_and_drafters(runlocal):
  """Losslessness: at T=0 every method and every drafter emits plain decoding's tokens."""
  _, _, answers = runlocal
  greedy = {
    name: {a["question_id"]: a["choices"][0]["token_ids"] for a in lines}
    for name, lines in answers.items()
    if "-T0-" in name
  }
  assert {n.split("-T0")[0] for n in greedy} == {
    "specjax-ar",
    "specjax-pld",
    "specjax-sps-auto",
    "specjax-sps-general",
    "specjax-sps-de",
    "specjax-sps-fr",
  }
  plain = greedy["specjax-ar-T0-seed0.jsonl"]
  for name, tokens in greedy.items():
    assert tokens == plain, name


def test_speedups_derivable(runlocal):
  _, m, _ = runlocal
  records = m["records"]
  plain = {(r["language"], r["temperature"], r["seed"]): r["tokens_per_second"] for r in records if r["method"] == "ar"}
  for r in records:
    assert (r["language"], r["temperature"], r["seed"]) in plain
  from specjax.eval import report

  derived = report.speedups(records)
  assert len(derived) == sum(r["method"] != "ar" for r in records) and all(d["speedup"] > 0 for d in derived)


# --- translation quality -----------------------------------------------------------------


def _answer(category, text, qid):
  return {"question_id": qid, "category": category, "choices": [{"index": 0, "turns": [text]}]}


def test_bleu_chrf_identical_text_scores_100(tmp_path):
  lines = ["The train to Hamburg leaves ten minutes late today.", "We planted tomatoes behind the house."]
  answers = [_answer("deen", text, i) for i, text in enumerate(lines)] + [_answer("chat", "no reference", 9)]
  scores = specbench.bleu_chrf(answers, {"deen": lines})
  assert set(scores) == {"deen"}
  assert scores["deen"]["bleu"] == pytest.approx(100.0) and scores["deen"]["chrf"] == pytest.approx(100.0)
  assert scores["deen"]["sentences"] == 2
  worse = specbench.bleu_chrf([_answer("deen", "A bus.", 0), _answer("deen", lines[1], 1)], {"deen": lines})
  assert worse["deen"]["bleu"] < 100.0
  path = tmp_path / "deen.ref.en"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  assert specbench.bleu_chrf(answers, {"deen": str(path)})["deen"]["bleu"] == pytest.approx(100.0)


def test_bleu_chrf_count_mismatch_names_file_and_counts(tmp_path):
  path = tmp_path / "deen.ref.en"
  path.write_text("one\ntwo\nthree\n", encoding="utf-8")
  with pytest.raises(SpecjaxError, match=r"deen\.ref\.en: 3 reference lines for 2 answers"):
    specbench.bleu_chrf([_answer("deen", "one", 0), _answer("deen", "two", 1)], {"deen": str(path)})


# --- config and mistakes -----------------------------------------------------------------


def test_config_runs_and_sweep():
  config, module = _config("methods=ar+sps,drafter=de,temperature=0")
  assert config.temperatures == (0.0,)
  assert eval_specbench_job.runs_from_config(config, ["general", "de"]) == [("ar", None), ("sps", "de")]
  config, _ = _config("drafter=all")
  config.cross_language = True
  assert eval_specbench_job.runs_from_config(config, ["general", "de"]) == [
    ("ar", None),
    ("pld", None),
    ("sps", "general"),
    ("sps", "de"),
    ("sps", "de", (0.0,)),
  ]
  runs = specbench.normalize_runs(eval_specbench_job.runs_from_config(config, ["general", "de"]), ["general", "de"])
  assert [r.model_id for r in runs] == ["specjax-ar", "specjax-pld", "specjax-sps-general", "specjax-sps-de"]
  assert runs[-1].temperatures is None  # de at every temperature already
  sweep = module.sweep()
  assert [entry["gamma"] for entry in sweep if not entry["dynamic_gamma"]] == [1, 3, 5, 7]
  with pytest.raises(SpecjaxError, match="unknown argument 'gama'"):
    module.get_config("gama=3")


def test_select_questions_keeps_first_per_category():
  qs = [{"question_id": i, "category": c} for i, c in enumerate(["deen", "deen", "fren", "deen", "fren"])]
  assert [q["question_id"] for q in eval_specbench_job._select_questions(qs, 1)] == [0, 2]
  assert eval_specbench_job._select_questions(qs, 0) == qs


@pytest.mark.parametrize(
  "overrides, expected",
  [
    ({"drafters": "general=/ckpt/g,es=/ckpt/es"}, r"`drafters`: drafter name 'es'"),
    ({"drafters": "general"}, r"`drafters`: 'general': expected name=path"),
    ({"drafter": "ja"}, r"`drafter`='ja'"),
    ({"methods": "ar,eagle"}, r"`methods`: 'eagle'"),
    (
      {"prompts": "/nonexistent/*_question.jsonl", "local_assets": False},
      r"config field `prompts`: prompts pattern .* no file matches",
    ),
    ({"references": "deen=/nonexistent/ref.en"}, r"`references`: /nonexistent/ref.en: file not found"),
  ],
)
def test_config_mistakes_are_named(tmp_path, overrides, expected):
  config, _ = _config()
  config.update(overrides)
  with pytest.raises(SpecjaxError, match=expected):
    eval_specbench_job.run(config, str(tmp_path))


def test_run_refuses_drafter_with_another_vocabulary(runlocal, tmp_path):
  assets = runlocal[0] / "local_assets"
  config, _ = _config()
  config.update(
    {
      "target": str(assets / "target"),
      "prompts": str(assets / "question.jsonl"),
      "drafters": "general=preset:tiny-drafter",
      "local_assets": False,
    }
  )
  with pytest.raises(
    SpecjaxError,
    match=r"`drafters`: drafter 'general' \(preset:tiny-drafter\) has a "
    r"vocabulary of 256 tokens",
  ):
    eval_specbench_job.run(config, str(tmp_path))


def test_evaluate_refuses_unloaded_drafter():
  questions = [{"question_id": 0, "category": "deen", "turns": ["Translate German to English:Hallo"]}]
  with pytest.raises(SpecjaxError, match=r"runs\[1\]: drafter 'de' is not loaded"):
    specbench.evaluate(None, None, {"general": None}, questions, runs=[("ar", None), ("sps", "de")])
  with pytest.raises(SpecjaxError, match=r"runs\[0\]: method 'ar' uses no drafter"):
    specbench.evaluate(None, None, {}, questions, runs=[("ar", "general")])
