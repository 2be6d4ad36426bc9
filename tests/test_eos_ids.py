"""Several EOS ids (Llama-3 lists three): read from config.json and generation_config.json, written
back, and generation (plain, drafter, prompt lookup) stops at whichever comes first."""

import json
import os

import numpy as np
import pytest

from specjax.decoding import Decoder
from specjax.decoding.decoder import stop_ids
from specjax.errors import SpecjaxError
from specjax.models import load_hf_checkpoint, save_hf_checkpoint
from specjax.models.config import LlamaConfig
from tests.helpers import random_model, tiny_config

MAX_NEW = 20
NO_EOS = -1


def _prompts():
  rng = np.random.RandomState(3)
  out = []
  for i in range(12):
    p = rng.randint(3, 256, size=rng.randint(2, 20)).tolist()
    out.append(p + p[: len(p) // 2] if i % 2 else p)
  return out


def _pick_stop_ids(reference, count=3):
  """Ids the model emits greedily, chosen so that each one is the first stop of some row."""
  chosen, rows = [], []
  for r, tokens in enumerate(reference):
    for t in tokens[2:]:
      if t in chosen:
        continue
      trial = chosen + [t]
      ends = [_truncate(reference[k], trial)[-1] for k in rows + [r]]
      if set(ends) == set(trial):
        chosen, rows = trial, rows + [r]
        break
    if len(chosen) == count:
      return chosen
  raise AssertionError(f"no {count} usable stop ids in {reference}")


def _truncate(tokens, stops):
  for i, t in enumerate(tokens):
    if t in stops:
      return tokens[: i + 1]
  return tokens


def test_config_reads_and_writes_a_list_of_eos_ids():
  hf = tiny_config().to_hf_dict() | {"eos_token_id": [128001, 128008, 128009, 128001]}
  config = LlamaConfig.from_hf_dict(hf)
  assert config.eos_token_id == 128001 and config.stop_token_ids == (128001, 128008, 128009)
  assert config.to_hf_dict()["eos_token_id"] == [128001, 128008, 128009]
  single = LlamaConfig.from_hf_dict(tiny_config().to_hf_dict() | {"eos_token_id": 7})
  assert single.stop_token_ids == (7,) and single.eos_token_ids == () and single.to_hf_dict()["eos_token_id"] == 7
  with pytest.raises(SpecjaxError, match="config.json: field 'eos_token_id'"):
    LlamaConfig.from_hf_dict(tiny_config().to_hf_dict() | {"eos_token_id": ["</s>"]})


class _Tokenizer:
  eos_token_id = 9


def test_stop_ids_adds_the_tokenizer_eos():
  config = tiny_config(eos_token_id=4, eos_token_ids=(4, 5))
  assert stop_ids(config, _Tokenizer()) == (4, 5, 9)
  assert stop_ids(config.replace(eos_token_ids=(4, 9)), _Tokenizer()) == (4, 9)
  assert stop_ids(config, None) == (4, 5)


def test_generation_config_wins_and_malformed_is_a_clear_error(tmp_path):
  config = tiny_config(eos_token_id=4)
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(random_model(config, seed=1), config, path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [6, 7]}, f)
  _, loaded = load_hf_checkpoint(path)
  assert loaded.stop_token_ids == (6, 7)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    f.write('{\n  "eos_token_id": [6,\n}')
  with pytest.raises(SpecjaxError, match=r"generation_config.json: line 3"):
    load_hf_checkpoint(path)


def test_generation_stops_at_every_listed_eos_id(tmp_path):
  model = random_model(tiny_config(), seed=2)
  prompts = _prompts()
  reference = (
    Decoder(model, method="ar", max_new_tokens=MAX_NEW, batch_size=4).generate(prompts, eos_id=NO_EOS).new_tokens
  )
  stops = _pick_stop_ids(reference)
  config = tiny_config(eos_token_id=stops[0], eos_token_ids=tuple(stops))
  path = str(tmp_path / "ckpt")
  save_hf_checkpoint(model, config, path)
  with open(os.path.join(path, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == stops
  loaded, loaded_config = load_hf_checkpoint(path)
  assert loaded_config.stop_token_ids == tuple(stops)

  expected = [_truncate(t, stops) for t in reference]
  assert {t[-1] for t in expected} >= set(stops)  # each id really ends some row
  drafter = random_model(tiny_config(), seed=3)
  for method, draft in [("ar", None), ("sps", loaded), ("sps", drafter), ("pld", None)]:
    decoder = Decoder(loaded, draft, method=method, gamma=4, max_new_tokens=MAX_NEW, batch_size=4)
    result = decoder.generate(prompts)  # default: the checkpoint's stop ids
    assert result.new_tokens == expected, method
  explicit = Decoder(loaded, method="ar", max_new_tokens=MAX_NEW, batch_size=4).generate(prompts, eos_id=stops[1:])
  assert explicit.new_tokens == [_truncate(t, stops[1:]) for t in reference]
  with pytest.raises(SpecjaxError, match="at most 8"):
    Decoder(loaded, method="ar", max_new_tokens=4).generate(prompts[:1], eos_id=list(range(10, 19)))
