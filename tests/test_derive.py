"""Drafters made of their target's embeddings and layers (specjax.models.derive)."""

import numpy as np
import pytest

from specjax.models import get_preset, init_model, load_hf_checkpoint, save_hf_checkpoint
from specjax.models.derive import drafter_from_target, main
from specjax.models.tokenizer_utils import train_tokenizer


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("target"))
  tokenizer = train_tokenizer(["ein kleiner Satz", "a small sentence"], 300)
  config = get_preset("tiny").replace(vocab_size=len(tokenizer))
  save_hf_checkpoint(init_model(config, 5), config, path, tokenizer=tokenizer)
  return path


def test_all_layers_reproduce_the_target_and_one_layer_keeps_its_embeddings(target_dir, tmp_path):
  target, config = load_hf_checkpoint(target_dir)
  tokens = np.array([[1, 5, 9, 30, 2]])
  drafter_from_target(target_dir, tuple(range(config.num_layers)), str(tmp_path / "all"))
  same, _ = load_hf_checkpoint(str(tmp_path / "all"))
  np.testing.assert_allclose(np.asarray(same(tokens)), np.asarray(target(tokens)), atol=1e-6)
  assert main([target_dir, str(tmp_path / "one"), "--layers", "1"]) == 0
  one, one_config = load_hf_checkpoint(str(tmp_path / "one"))
  assert one_config.num_layers == 1
  np.testing.assert_array_equal(
    np.asarray(one.embed_tokens.embedding[...]), np.asarray(target.embed_tokens.embedding[...])
  )
  np.testing.assert_array_equal(
    np.asarray(one.layers[0].mlp.up_proj.kernel[...]), np.asarray(target.layers[1].mlp.up_proj.kernel[...])
  )


def test_bad_layers_exit_2(target_dir, tmp_path, capsys):
  assert main([target_dir, str(tmp_path / "x"), "--layers", "7"]) == 2
  assert "[0, 2)" in capsys.readouterr().err
  assert main([target_dir, str(tmp_path / "x"), "--layers", "a"]) == 2
