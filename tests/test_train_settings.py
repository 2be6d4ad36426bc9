"""TrainerSettings and AcceptanceSettings (specjax.train.settings): built once from the config,
one default per setting; the nested `acceptance` group and its flat `acceptance_*` aliases."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from specjax import validate
from specjax.decoding.decoder import DecodingSettings
from specjax.errors import SpecjaxError
from specjax.train.defaults import trainer_config
from specjax.train.settings import AcceptanceSettings, TrainerSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import finetune as finetune_config  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402

ALIASES = [f"acceptance_{f.name}" for f in dataclasses.fields(AcceptanceSettings)]


def test_the_config_is_the_settings_defaults():
  """trainer_config lays out TrainerSettings' defaults: one default per setting, defined once."""
  c = trainer_config("pretrain")
  fields = {f.name for f in dataclasses.fields(TrainerSettings)}
  assert set(c.keys()) == fields | set(ALIASES)
  assert set(c.acceptance.keys()) == {f.name for f in dataclasses.fields(AcceptanceSettings)}
  assert TrainerSettings.from_config(c) == TrainerSettings(job="pretrain")
  assert TrainerSettings.from_config(trainer_config("finetune")).job == "finetune"
  for name in ("target", "tokenizer", "selfdistill_dir", "tfds_data_dir"):  # optional paths: unset, typed str
    assert c[name] is None and c.get_type(name) is str
  for alias in ALIASES:  # the flat names read the nested group
    assert c[alias] == c.acceptance[alias[len("acceptance_") :]]


def test_overridden_fields():
  c = trainer_config("pretrain")
  c.batch_size, c.grad_accumulation, c.mesh_shape = 16, 2, [-1, 1, 1]
  c.acceptance.gamma = 3
  c.acceptance.temperatures = [0.0]
  s = TrainerSettings.from_config(c)
  assert (s.batch_size, s.grad_accumulation, s.mesh_shape) == (16, 2, (-1, 1, 1))
  assert s.acceptance == AcceptanceSettings(gamma=3, temperatures=(0.0,))
  assert TrainerSettings.from_config(c, seed=7).seed == 7
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.batch_size = 1


def test_runlocal_variants():
  s = TrainerSettings.from_config(pretrain_config.get_config("runlocal"))
  assert s.acceptance == AcceptanceSettings(
    prompts_per_language=2, max_new_tokens=16, gamma=4, batch_size=10, prompt_bucket=128
  )
  assert (s.batch_size, s.sequence_length, s.drafter) == (8, 128, "preset:tiny-drafter")
  s = TrainerSettings.from_config(finetune_config.get_config("runlocal,lang=fr"))
  assert (s.acceptance.prompts, s.acceptance.prompts_per_language, s.acceptance.gamma) == ("heldout:fr", 4, 4)
  assert s.selfdistill_dir is None and s.mixture == "finetune_fr_en"


def test_the_flat_names_are_aliases_of_the_nested_group():
  c = trainer_config("finetune")
  c.acceptance_gamma = 4  # the old name: the same field
  c.update(acceptance_prompts="", acceptance_temperatures=(0.0,))  # as specjax/jobs/demo.py sets them
  assert (c.acceptance.gamma, c.acceptance.prompts, c.acceptance.temperatures) == (4, "", (0.0,))
  c.acceptance.batch_size = 2
  assert c.acceptance_batch_size == 2
  assert AcceptanceSettings.from_config(c) == AcceptanceSettings(prompts="", temperatures=(0.0,), gamma=4, batch_size=2)


def test_the_demo_trainer_configs_keep_their_acceptance_settings():
  from specjax.jobs import demo

  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  c = demo._finetune_config(
    config, lambda *parts: "/w/" + "/".join(parts), "/w/target", "de", 5, "run:/w/general", 3, 2
  )
  s = TrainerSettings.from_config(c)
  assert s.acceptance == AcceptanceSettings(
    prompts="heldout:de",
    prompts_per_language=3,
    temperatures=(0.0,),
    gamma=2,
    max_new_tokens=config.max_new_tokens,
    batch_size=4,
  )
  assert s.job == "finetune" and s.mixture == "finetune_de_en" and s.num_train_steps == 5


def test_a_config_with_only_the_flat_names():
  c = ml_collections.ConfigDict({"acceptance_gamma": 3, "acceptance_prompts": "", "acceptance_batch_size": 2})
  assert AcceptanceSettings.from_config(c) == AcceptanceSettings(gamma=3, prompts="", batch_size=2)
  with pytest.raises(SpecjaxError, match=r"config field `acceptance_gamma`=0: must be an integer >= 1"):
    validate.check_fields(ml_collections.ConfigDict({"acceptance_gamma": 0}))


def test_nested_and_flat_values_that_differ_are_refused():
  c = ml_collections.ConfigDict({"acceptance": {"gamma": 5}, "acceptance_gamma": 4})  # not linked: two fields
  with pytest.raises(SpecjaxError, match=r"`acceptance.gamma`=5 and `acceptance_gamma`=4 differ"):
    AcceptanceSettings.from_config(c)
  c.acceptance_gamma = 5
  assert AcceptanceSettings.from_config(c).gamma == 5


def test_a_command_line_giving_both_names_different_values_is_refused():
  c = pretrain_config.get_config("runlocal")
  validate.check_aliases(c, ["prog", "--config.acceptance.gamma=4", "--config.acceptance_gamma=4"])
  validate.check_aliases(
    c, ["prog", "--config.acceptance.temperatures=(0.0,)", "--config.acceptance_temperatures", "[0.0]"]
  )
  with pytest.raises(
    SpecjaxError,
    match=r"--config.acceptance.gamma=5 and --config.acceptance_gamma=4: "
    r"`acceptance_gamma` is the old name of `acceptance.gamma`",
  ):
    validate.check_aliases(c, ["prog", "--config.acceptance.gamma=5", "--config.acceptance_gamma=4"])


def test_the_command_line_aliases(tmp_path):
  """End to end through specjax.main: refused before anything loads (exit 2); a flat name sets
  the nested field (the validation error names it)."""

  def main(*overrides):
    args = [
      sys.executable,
      "-m",
      "specjax.main",
      "--config",
      "configs/pretrain.py:runlocal",
      "--workdir",
      str(tmp_path),
      *overrides,
    ]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)

  out = main("--config.acceptance.gamma=5", "--config.acceptance_gamma=4")
  assert out.returncode == 2 and "`acceptance_gamma` is the old name of `acceptance.gamma`" in out.stderr
  out = main("--config.acceptance_gamma=0")
  assert out.returncode == 2 and "config field `acceptance.gamma`=0: must be an integer >= 1" in out.stderr


def test_the_acceptance_decoder_settings_are_unchanged():
  """What the acceptance evaluation decodes with equals what it read before (prefixed fields)."""
  for c in (trainer_config("pretrain"), pretrain_config.get_config("runlocal")):
    assert AcceptanceSettings.from_config(c).decoding() == DecodingSettings.from_config(
      c, prefix="acceptance_", method="sps"
    )


def test_checked_names_the_field():
  c = trainer_config("pretrain")
  with pytest.raises(SpecjaxError, match="`loss`='kl'"):
    TrainerSettings.from_config(c, loss="kl")
  with pytest.raises(SpecjaxError, match="distils from the target"):
    TrainerSettings.from_config(c, loss="forward_kl")
  with pytest.raises(SpecjaxError, match="must split into equal micro-batches"):
    TrainerSettings.from_config(c, grad_accumulation=3)
  with pytest.raises(SpecjaxError, match="`dtype`='float16'"):
    TrainerSettings(job="pretrain").replace(dtype="float16")
