"""The demo pipeline (the paper's recipe in miniature) end to end, in its tiny configuration."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import demo as demo_config  # noqa: E402


def test_tiny_demo_runs_every_stage_and_reports(tmp_path, capsys):
  from specjax.jobs import demo

  config = demo_config.get_config("scale=tiny")
  out = demo.run(config, str(tmp_path))
  langs = tuple(config.langs)
  for stage in (
    ["tokenizer", "target_train", "drafters/general"]
    + [f"selfdistill/{l}" for l in langs]
    + [f"drafters/{l}" for l in langs]
  ):
    assert os.path.exists(tmp_path / stage / "DONE"), stage
  # self-distillation data holds the target's outputs at both temperatures
  with open(tmp_path / "selfdistill" / langs[0] / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["records_total"] == config.distill_sources * len(config.distill_temperatures)
  records = out["records"]
  keys = {(r["language"], r["method"], r["drafter"], r["temperature"]) for r in records}
  for lang in langs:
    for key in [
      ("ar", None, 0.0),
      ("pld", None, 0.0),
      ("sps", "general", 0.0),
      ("sps", "auto", 0.0),
      ("ar", None, 1.0),
      ("sps", "general", 1.0),
      ("sps", "auto", 1.0),
    ] + [("sps", d, 0.0) for d in langs]:
      assert (lang,) + key in keys, (lang, key)
  seeds = {r["seed"] for r in records if r["temperature"] == 1.0}
  assert seeds == set(config.sampling_seeds)
  report = open(out["report"], encoding="utf-8").read()
  assert "SpS, general drafter" in report and "Plain decoding" in report
  assert os.path.exists(tmp_path / "report" / "speedup_T0.png")
  # greedy outputs are identical across methods (losslessness through the whole recipe)
  answers = [json.loads(line) for line in open(tmp_path / "report" / "answers.jsonl", encoding="utf-8")]
  greedy = {}
  for a in answers:
    if a["temperature"] == 0.0:
      greedy.setdefault(a["question_id"], set()).add(tuple(a["choices"][0]["token_ids"][0]))
  assert greedy and all(len(v) == 1 for v in greedy.values())
  # a rerun resumes: every stage is skipped
  capsys.readouterr()
  demo.run(demo_config.get_config("scale=tiny"), str(tmp_path))
  assert "train the target: done earlier" in capsys.readouterr().out


def test_demo_config_errors(tmp_path):
  from specjax.jobs import demo
  from specjax.errors import SpecjaxError

  with pytest.raises(SpecjaxError, match="scale='huge'"):
    demo_config.get_config("scale=huge")
  c = demo_config.get_config("scale=tiny,langs=de+xx")
  with pytest.raises(SpecjaxError, match="`langs`"):
    demo.run(c, str(tmp_path))
  c = demo_config.get_config(f"scale=tiny,data_dir={tmp_path}/none")
  with pytest.raises(SpecjaxError, match="missing"):
    demo.run(c, str(tmp_path))


CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_tiny_demo_on_a_checkpoint_with_a_chat_template(tmp_path):
  """The real-target path (make demo's default) on a tiny random checkpoint with its own chat
  template: import, distillation in that template, reduced vocabularies, drafters made of the
  target's embeddings and first layer, evaluation, summary.json."""
  from specjax.jobs import demo
  from specjax.jobs.local_assets import corpus_texts
  from specjax.models.draft_vocab import load_draft_vocab
  from specjax.models.tokenizer_utils import make_random_checkpoint, train_tokenizer

  tokenizer = train_tokenizer(corpus_texts(), 1024)
  tokenizer.chat_template = CHATML
  make_random_checkpoint(str(tmp_path / "ckpt"), "tiny", tokenizer=tokenizer)
  config = demo_config.get_config("scale=tiny")
  config.unlock()
  config.update(
    target=str(tmp_path / "ckpt"),
    template="auto",
    drafter_layers=(1,),
    draft_vocab_coverage=0.99,
    sampled_prompts_per_language=2,
  )
  out = demo.run(config, str(tmp_path / "run"))
  record = json.loads(
    open(
      tmp_path
      / "run"
      / "selfdistill"
      / "de"
      / "data"
      / os.listdir(tmp_path / "run" / "selfdistill" / "de" / "data")[0],
      encoding="utf-8",
    ).readline()
  )
  assert record["chat_prompt"].startswith("<|im_start|>user\n")  # the checkpoint's own template
  vocab = load_draft_vocab(str(tmp_path / "run" / "drafters" / "de" / "drafter"))
  assert vocab is not None and len(vocab) < 1024
  summary = json.load(open(tmp_path / "run" / "report" / "summary.json"))
  assert summary == out["summary"]
  for key in ("T0", "T1"):
    for method in ("plain", "pld", "general", "routed") + (("specialized",) if key == "T0" else ()):
      assert set(summary[key][method]) == set(config.langs), (key, method)
  assert summary["drafters"]["de"]["layers"] == 1 and summary["drafters"]["de"]["draft_vocab_size"] == len(vocab)
  report_text = open(out["report"], encoding="utf-8").read()
  assert "the embedded corpus (specjax/assets/corpus)" in report_text
  assert REPO not in report_text and str(tmp_path) not in report_text  # no machine's absolute paths
