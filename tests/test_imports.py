"""Importing the model code must not import TensorFlow (only specjax.data may, for seqio)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_after_import(modules):
  code = (
    "import json, sys\n"
    + "".join(f"import {m}\n" for m in modules)
    + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
    "('tensorflow', 'tensorflow_datasets', 'seqio', 'torch', 'specjax'))))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
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


# --- the layers: models < decoding < data < train < eval < jobs ---------------------------------

LAYERS = ("models", "decoding", "data", "train", "eval", "jobs")
# Known imports against the layer order, (importer, imported module): each one a debt to pay by
# moving code down. Empty: keep it so.
ALLOWED_UPWARD_IMPORTS: set[tuple[str, str]] = set()


def _specjax_modules():
  """(module name, path) of every module under specjax/."""
  root = os.path.join(REPO, "specjax")
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path[:-3], REPO).replace(os.sep, ".")
        yield module.removesuffix(".__init__"), path


def _imports(module: str, path: str) -> set[str]:
  """Every specjax module `module` imports, at the top or inside a function (`from a import b`
  counts as a and a.b, since b may be a module; relative imports resolved)."""
  import ast

  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)
  return {name for name in out if name == "specjax" or name.startswith("specjax.")}


def _layer(module: str) -> int | None:
  """The index in LAYERS of a module's package; None for top-level modules (specjax.sharding,
  specjax.validate, ...: utilities any layer may use) and specjax.main (the dispatcher)."""
  parts = module.split(".")
  return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_probe_sees_in_function_imports():
  imports = dict(_specjax_modules())
  imports = {m: _imports(m, p) for m, p in imports.items()}
  assert {"specjax.models", "specjax.jobs", "specjax.jobs.train", "specjax.eval.specbench"} <= set(imports)
  assert "specjax.jobs.local_assets" in imports["specjax.jobs.train"]  # inside run()
  assert "specjax.data.tasks" in imports["specjax.train.trainer"]  # inside a method


def test_no_library_imports_a_job():
  offenders = []
  for module, path in _specjax_modules():
    if module == "specjax.main" or module == "specjax.jobs" or module.startswith("specjax.jobs."):
      continue
    offenders += [
      (module, name)
      for name in _imports(module, path)
      if (name == "specjax.jobs" or name.startswith("specjax.jobs.")) and (module, name) not in ALLOWED_UPWARD_IMPORTS
    ]
  assert not offenders, f"libraries must not import specjax.jobs (move the code down): {offenders}"


def test_layers_import_only_downward():
  offenders = []
  for module, path in _specjax_modules():
    low = _layer(module)
    if low is None:
      continue
    for name in _imports(module, path):
      high = _layer(name)
      if high is not None and high > low and (module, name) not in ALLOWED_UPWARD_IMPORTS:
        offenders.append(f"{module} ({LAYERS[low]}) imports {name} ({LAYERS[high]})")
  assert not offenders, "the layer order is " + " < ".join(LAYERS) + ":\n" + "\n".join(sorted(offenders))
