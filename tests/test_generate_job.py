"""The generate job: question files, chat templates, metrics arithmetic, and the CLI end to end
(answers and metrics written; speculative output equal to plain output at temperature 0; user
mistakes reported with file and line, exit code 2, no traceback)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from specjax.decoding import metrics
from specjax.jobs.generate import exactness
from specjax.decoding.decoder import DecodeResult
from specjax.decoding.engine import RoundStats
from specjax.decoding.prompts import apply_template, encode_prompt, read_prompt_files, read_questions
from specjax.errors import SpecjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text: str | bytes):
  with open(path, "wb") as f:
    f.write(text.encode("utf-8") if isinstance(text, str) else text)
  return str(path)


def _question(qid, turns=("Translate German to English:Guten Tag.",), category="deen"):
  return json.dumps({"question_id": qid, "category": category, "turns": list(turns)})


# --- question files ----------------------------------------------------------------------


def test_read_questions_valid(tmp_path):
  path = _write(tmp_path / "q.jsonl", _question("a") + "\n\n" + _question(7, turns=("one", "two")) + "\n")
  qs = read_questions(path)
  assert [q["question_id"] for q in qs] == ["a", 7]
  assert qs[1]["turns"] == ["one", "two"] and qs[1]["source"] == f"{path}:3"


@pytest.mark.parametrize(
  "lines, expected",
  [
    (
      [_question("a"), _question("b"), '{"question_id": "c", "category": "deen", "turns": ["x"]'],
      ["line 3", "malformed JSON"],
    ),
    ([_question("a"), '{"question_id": "b", "category": "deen"}'], ["line 2", "'turns' is missing"]),
    ([_question("a", turns=())], ["line 1", "non-empty list of strings"]),
    ([_question("a", turns=("ok", 3))], ["line 1", "non-empty list of strings"]),
    (['{"question_id": "a", "turns": ["x"]}'], ["line 1", "'category' is missing"]),
    (['{"question_id": true, "category": "deen", "turns": ["x"]}'], ["line 1", "question_id"]),
    ([_question("a"), _question("a")], ["line 2", "repeats line 1"]),
    (["[1, 2]"], ["line 1", "expected a JSON object"]),
  ],
)
def test_read_questions_errors_name_file_and_line(tmp_path, lines, expected):
  path = _write(tmp_path / "bad_question.jsonl", "\n".join(lines) + "\n")
  with pytest.raises(SpecjaxError) as e:
    read_questions(path)
  message = str(e.value)
  assert path in message
  for part in expected:
    assert part in message


def test_read_questions_empty_missing_and_bad_utf8(tmp_path):
  empty = _write(tmp_path / "empty.jsonl", "\n\n")
  with pytest.raises(SpecjaxError, match="no prompts"):
    read_questions(empty)
  with pytest.raises(SpecjaxError, match="not found"):
    read_questions(str(tmp_path / "absent.jsonl"))
  bad = _write(tmp_path / "latin1.jsonl", (_question("a") + "\n").encode() + b'{"turns": ["\xe4"]}\n')
  with pytest.raises(SpecjaxError, match="line 2: invalid UTF-8"):
    read_questions(bad)


def test_read_prompt_files_glob_and_duplicates(tmp_path):
  _write(tmp_path / "deen_question.jsonl", _question("x") + "\n")
  _write(tmp_path / "fren_question.jsonl", _question("y", category="fren") + "\n")
  qs = read_prompt_files(str(tmp_path / "*_question.jsonl"))
  assert [q["category"] for q in qs] == ["deen", "fren"]
  _write(tmp_path / "zz_question.jsonl", _question("x") + "\n")
  with pytest.raises(SpecjaxError, match="repeats"):
    read_prompt_files(str(tmp_path / "*_question.jsonl"))
  with pytest.raises(SpecjaxError, match="no file matches"):
    read_prompt_files(str(tmp_path / "nothing*.jsonl"))


# --- templates and encoding --------------------------------------------------------------


def test_vicuna_template_exact():
  system = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
  )
  assert apply_template("vicuna_v1.1", "Translate German to English:Hallo") == (
    system + " USER: Translate German to English:Hallo ASSISTANT:"
  )
  assert apply_template("vicuna_v1.1", "Shorter?", history=[("Hi", "Hello!")]) == (
    system + " USER: Hi ASSISTANT: Hello!</s>USER: Shorter? ASSISTANT:"
  )


def test_llama2_and_plain_templates():
  assert apply_template("llama-2", "Hi") == "[INST] Hi [/INST]"
  assert apply_template("llama-2", "Hi", system="Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
  assert apply_template("llama-2", "More?", history=[("Hi", "Hello")]) == (
    "[INST] Hi [/INST] Hello </s><s>[INST] More? [/INST]"
  )
  assert apply_template("plain", "just this") == "just this"
  with pytest.raises(SpecjaxError, match="vicuna_v1.1, vicuna_compact, llama-2, plain"):
    apply_template("chatml", "x")


def test_encode_prompt_adds_one_bos(tmp_path):
  from specjax.models.tokenizer_utils import train_tokenizer

  tokenizer = train_tokenizer(["Guten Morgen", "Bonjour", "こんにちは"], vocab_size=300, out_dir=str(tmp_path))
  from transformers import AutoTokenizer

  reloaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert (reloaded.unk_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
  ids = encode_prompt(reloaded, "Guten Morgen, 世界")
  assert ids[0] == 1 and ids[1] != 1
  assert reloaded.decode(ids, skip_special_tokens=True) == "Guten Morgen, 世界"
  assert encode_prompt(tokenizer, "<s>Bonjour")[:2] == encode_prompt(tokenizer, "Bonjour")[:2]


# --- metrics -----------------------------------------------------------------------------


def _result():
  """Two rows, γ=3. Row 0 accepts 3, 1, 0 drafts in its three rounds; row 1 accepts 2, 2."""
  return DecodeResult(
    new_tokens=[[5] * 7, [6] * 6],
    stats=RoundStats(
      rounds_B=np.array([3, 2]),
      accepted_B=np.array([4, 4]),
      proposed_B=np.array([9, 6]),
      accept_hist_BO=np.array([[1, 1, 0, 1], [0, 0, 2, 0]]),
      pos_proposed_BG=np.array([[3, 3, 3], [2, 2, 2]]),
      pos_accepted_BG=np.array([[2, 1, 1], [2, 2, 0]]),
      pos_reached_BG=np.array([[3, 2, 1], [2, 2, 2]]),
    ),
    target_calls=3,
    drafter_calls=9,
    wall_s=2.0,
  )


def test_metrics_by_hand():
  m = metrics.compute(_result(), categories=["de", "fr"])
  json.dumps(m)  # plain Python numbers only
  assert m["tau"] == pytest.approx(1 + 8 / 5)
  assert m["tau_drafted"] == m["tau"] and m["drafted_steps"] == 5  # every round proposed drafts
  assert m["acceptance_rate"] == pytest.approx(8 / 15)
  assert m["new_tokens"] == 13 and m["tokens_per_second"] == pytest.approx(6.5)
  assert m["target_forward_passes"] == 3 and m["verification_steps"] == 5
  # positions proposed 5, 5, 5 times; first 1, 2, 3 drafts all accepted 4, 3, 1 times
  assert m["per_position_acceptance"]["cumulative"] == pytest.approx([0.8, 0.6, 0.2])
  assert m["per_position_acceptance"]["conditional"] == pytest.approx([0.8, 0.75, 1 / 3])
  assert m["accepted_hist_counts"] == [1, 1, 2, 1]
  assert m["accepted_hist"] == pytest.approx([0.2, 0.2, 0.4, 0.2])
  de, fr = m["by_category"]["de"], m["by_category"]["fr"]
  assert de["tau"] == pytest.approx(1 + 4 / 3) and fr["tau"] == pytest.approx(3.0)
  assert de["acceptance_rate"] == pytest.approx(4 / 9)
  assert fr["per_position_acceptance"]["conditional"] == pytest.approx([1.0, 1.0, 0.0])
  assert de["wall_s"] == pytest.approx(1.0) and de["tokens_per_second"] == pytest.approx(7.0)
  assert metrics.row_tau(_result()) == pytest.approx([1 + 4 / 3, 3.0])


def test_round_stats_shapes_and_old_names():
  z = RoundStats.zeros(3, 4)  # shapes from the names' suffixes: B rows, G positions, H = G + 1
  assert [a.shape for a in jax.tree.leaves(z)] == [(3,), (3,), (3,), (3, 5), (3, 4), (3, 4), (3, 4)]
  r = _result()
  assert r.steps is r.stats.rounds_B and r.accept_hist is r.stats.accept_hist_BO
  assert r.pos_reached is r.stats.pos_reached_BG and r.drafted_steps.tolist() == [3, 2]
  total = metrics.Counters.from_result(r) + metrics.Counters.from_result(r, [1])
  assert total.rows == 3 and total.stats.accept_hist_BO.tolist() == [[1, 1, 4, 1]]


def test_metrics_aggregate_sums_counters_then_divides():
  stats = jax.tree.map(np.asarray, RoundStats.zeros(1, 1)).replace(rounds_B=np.array([4]))
  plain = DecodeResult(new_tokens=[[1] * 4], stats=stats, target_calls=4, drafter_calls=0, wall_s=1.0)
  m = metrics.aggregate([_result(), _result()], [["de", "fr"], ["de", "de"]])
  assert m["tau"] == pytest.approx(1 + 16 / 10) and m["new_tokens"] == 26
  assert m["tokens_per_second"] == pytest.approx(26 / 4.0)
  assert m["by_category"]["de"]["tau"] == pytest.approx(1 + 12 / 8)
  assert m["by_category"]["de"]["rows"] == 3
  m = metrics.compute(plain)
  assert m["tau"] == 1.0 and m["acceptance_rate"] is None
  assert m["per_position_acceptance"]["cumulative"] == [None]
  assert "by_category" not in m
  mixed = metrics.aggregate([plain, _result()])  # histograms of different lengths add
  assert mixed["accepted_hist_counts"] == [1, 1, 2, 1]


# --- config and dispatch -----------------------------------------------------------------


def test_config_strings():
  sys.path.insert(0, REPO)
  try:
    from configs import generate
  finally:
    sys.path.remove(REPO)
  c = generate.get_config("runlocal,method=pld,gamma=3")
  assert (c.job, c.method, c.gamma, c.local_assets, c.dtype) == ("generate", "pld", 3, True, "float32")
  assert generate.get_config(None).template == "auto"
  with pytest.raises(SpecjaxError, match="unknown argument 'gama'"):
    generate.get_config("gama=3")
  with pytest.raises(SpecjaxError, match="expected an integer"):
    generate.get_config("gamma=x")


def test_unknown_job():
  import ml_collections
  from specjax.main import run_job

  with pytest.raises(SpecjaxError, match="'pretrian': unknown job; available: generate"):
    run_job(ml_collections.ConfigDict({"job": "pretrian"}), "/tmp/unused")


# --- the CLI end to end ------------------------------------------------------------------


def _cli(workdir, *args, devices: int = 1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run(
    [sys.executable, "-m", "specjax.main", "--workdir", str(workdir), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
  """runlocal with plain decoding; it builds the tiny checkpoints and questions the others reuse."""
  workdir = tmp_path_factory.mktemp("generate_ar")
  proc = _cli(workdir, "--config", "configs/generate.py:runlocal,method=ar")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "answers.jsonl", encoding="utf-8") as f:
    answers = [json.loads(line) for line in f]
  with open(workdir / "metrics.json", encoding="utf-8") as f:
    return workdir, answers, json.load(f)


def test_runlocal_writes_answers_and_metrics(plain_run):
  workdir, answers, m = plain_run
  questions = read_questions(str(workdir / "local_assets" / "question.jsonl"))
  assert len(answers) == sum(len(q["turns"]) for q in questions)
  assert {a["turn"] for a in answers} == {0, 1}  # the two-turn question answered twice
  for a in answers:
    assert {"question_id", "category", "text", "token_ids", "new_tokens", "tau", "wall_s"} <= set(a)
    assert a["new_tokens"] == len(a["token_ids"]) and 0 < a["new_tokens"] <= 16 and a["tau"] == 1.0
  for key in (
    "method",
    "tokens_per_second",
    "new_tokens",
    "tau",
    "acceptance_rate",
    "per_position_acceptance",
    "by_category",
    "config",
    "compile_s",
    "hardware",
    "dtype",
    "exactness",
  ):
    assert key in m
  assert m["dtype"] == m["config"]["dtype"] and m["exactness"] == exactness("ar", m["dtype"])
  assert m["method"] == "ar" and m["tau"] == 1.0 and m["acceptance_rate"] is None
  assert m["new_tokens"] == sum(a["new_tokens"] for a in answers) and m["tokens_per_second"] > 0
  assert set(m["by_category"]) == {q["category"] for q in questions}
  assert m["hardware"]["device_count"] == 1 and m["config"]["method"] == "ar"


def test_exactness_names_the_dtype():
  assert "token-identical" in exactness("sps", "float32")
  assert "near-ties" in exactness("pld", "bfloat16") and "bfloat16" in exactness("sps", "bfloat16")


@pytest.mark.parametrize(
  "method, devices, drafter_sharding", [("sps", 2, "replicated"), ("sps", 2, "sharded"), ("pld", 1, "replicated")]
)
def test_speculative_output_equals_plain_output(plain_run, tmp_path, method, devices, drafter_sharding):
  """Greedy losslessness through the whole job (sps on a 2-device mesh, drafter replicated or sharded)."""
  assets = plain_run[0] / "local_assets"
  proc = _cli(
    tmp_path,
    "--config",
    f"configs/generate.py:runlocal,method={method}",
    f"--config.target={assets}/target",
    f"--config.drafter={assets}/drafter",
    f"--config.prompts={assets}/question.jsonl",
    f"--config.drafter_sharding={drafter_sharding}",
    devices=devices,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "answers.jsonl", encoding="utf-8") as f:
    answers = [json.loads(line) for line in f]
  key = lambda a: (a["question_id"], a["turn"])
  assert {key(a): a["token_ids"] for a in answers} == {key(a): a["token_ids"] for a in plain_run[1]}
  with open(tmp_path / "metrics.json", encoding="utf-8") as f:
    m = json.load(f)
  assert m["method"] == method and m["proposed_drafts"] > 0 and m["hardware"]["device_count"] == devices


def _generate_config(arg: str):
  sys.path.insert(0, REPO)
  try:
    from configs import generate
  finally:
    sys.path.remove(REPO)
  return generate.get_config(arg)


def test_generate_is_the_harness_single_run_case(plain_run, tmp_path):
  """The generate job and the evaluation harness decode through one multi-turn protocol
  (specjax.decoding.conversations): the same run gives the same answers, turn by turn, from
  both, though they batch the questions differently (generate in file order, the harness per
  category): greedy plain decoding (the fixture's run) and sampled speculative decoding."""
  from specjax.decoding.decoder import DecodingSettings
  from specjax.eval.specbench import evaluate
  from specjax.models.hf import load_model, target_tokenizer

  assets = plain_run[0] / "local_assets"
  args = [f"--config.target={assets}/target", f"--config.drafter={assets}/drafter"]
  args += [f"--config.prompts={assets}/question.jsonl", "--config.top_k=0"]
  proc = _cli(tmp_path, "--config", "configs/generate.py:runlocal,method=sps,temperature=1.0,seed=3", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "answers.jsonl", encoding="utf-8") as f:
    sampled = [json.loads(line) for line in f]
  questions = read_questions(str(assets / "question.jsonl"))
  assert len({q["category"] for q in questions}) > 1  # the harness's batches differ from generate's
  tokenizer = target_tokenizer(None, str(assets / "target"))
  target, _ = load_model(str(assets / "target"), "float32")
  drafter, _ = load_model(str(assets / "drafter"), "float32")
  for arg, drafters, temperature, seed, expected in [
    ("runlocal,method=ar", {}, 0.0, 0, plain_run[1]),
    ("runlocal,method=sps,temperature=1.0,seed=3", {"de": drafter}, 1.0, 3, sampled),
  ]:
    config = _generate_config(arg)
    _, answers = evaluate(
      target,
      tokenizer,
      drafters,
      questions,
      runs=[(config.method, "de" if drafters else None)],
      temperatures=(temperature,),
      seeds=(seed,),
      greedy_seeds=(seed,),
      decoding=DecodingSettings.from_config(config),
      template=config.template,
      system_prompt=config.system_prompt,
      progress=False,
    )
    harness = {(a["question_id"], turn): ids for a in answers for turn, ids in enumerate(a["choices"][0]["token_ids"])}
    assert harness == {(a["question_id"], a["turn"]): a["token_ids"] for a in expected}, arg
    assert sum(len(ids) for ids in harness.values()) > len(harness)  # answers, not empty turns


def test_routed_drafters_in_one_loop(plain_run, tmp_path):
  """drafter=auto: each question drafts with its language's drafter (general for the others),
  the rows of one batch with different drafters; greedy output equals plain decoding's."""
  assets = plain_run[0] / "local_assets"
  drafters = ",".join(f"{name}={assets}/drafter" for name in ("general", "de", "fr"))
  proc = _cli(
    tmp_path,
    "--config",
    "configs/generate.py:runlocal,method=sps",
    f"--config.target={assets}/target",
    "--config.drafter=auto",
    f"--config.drafters={drafters}",
    f"--config.prompts={assets}/question.jsonl",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "answers.jsonl", encoding="utf-8") as f:
    answers = [json.loads(line) for line in f]
  key = lambda a: (a["question_id"], a["turn"])
  assert {key(a): a["token_ids"] for a in answers} == {key(a): a["token_ids"] for a in plain_run[1]}
  from specjax.eval.routing import route

  questions = {q["question_id"]: q for q in read_questions(str(assets / "question.jsonl"))}
  assert {a["drafter"] for a in answers} == {"de", "fr", "general"}  # ru, ja, zh: general
  for a in answers:
    assert a["drafter"] == route(questions[a["question_id"]], ["general", "de", "fr"]), a
  proc = _cli(tmp_path / "x", "--config", "configs/generate.py:runlocal,method=sps", "--config.drafter=auto")
  assert proc.returncode == 2 and "config field `drafters`" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_bad_prompt_line(tmp_path):
  bad = _write(tmp_path / "broken_question.jsonl", _question("a") + "\n" + _question("b") + "\n{not json\n")
  proc = _cli(tmp_path / "work", "--config", "configs/generate.py:runlocal", f"--config.prompts={bad}")
  assert proc.returncode == 2
  assert "specjax: error:" in proc.stderr and bad in proc.stderr and "line 3" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_reports_missing_target(tmp_path):
  proc = _cli(tmp_path, "--config", "configs/generate.py")
  assert proc.returncode == 2
  assert "specjax: error:" in proc.stderr and "target" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
