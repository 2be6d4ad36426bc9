"""Importing the model code must not import TensorFlow (only specjax.data may, for seqio)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_after_import(modules):
  code = ("import json, sys\n"
          + "".join(f"import {m}\n" for m in modules)
          + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets', 'seqio', 'torch', 'specjax'))))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_models_do_not_import_tensorflow():
  loaded = _modules_after_import(["specjax", "specjax.models", "specjax.sharding", "specjax.models.hf"])
  assert {"specjax.models.llama", "specjax.models.hf", "specjax.sharding"} <= loaded  # the probe works
  assert "tensorflow" not in loaded, sorted(m for m in loaded if m.startswith("tensorflow"))
  assert not {m for m in loaded if m.split(".")[0] in ("tensorflow_datasets", "seqio")}
  assert "torch" not in loaded  # transformers (and so torch) is imported only when a tokenizer is loaded


def test_decoding_does_not_import_tensorflow():
  if importlib.util.find_spec("specjax.decoding") is None:
    pytest.skip("specjax.decoding does not exist yet")
  loaded = _modules_after_import(["specjax.decoding"])
  assert "specjax.decoding" in loaded
  assert "tensorflow" not in loaded, sorted(m for m in loaded if m.startswith("tensorflow"))
