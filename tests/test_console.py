"""A quiet console: the libraries' INFO lines (absl, jax, orbax, seqio) and TensorFlow's CUDA probing
stay out of a run's output, specjax's own lines stay in; --verbose / SPECJAX_VERBOSE=1 lets them back."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's Python lines ("I1202 13:28:13.730321 1403 file.py:849] ...") and C++ ones ("I0000 00:00:...").
ABSL_LINE = re.compile(r"^([IWE])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+?):\d+\] ", re.M)


def _env(**extra):
  """The environment of a fresh shell: no JAX_PLATFORMS (jax probes its backends and logs about
  them) and no TF_CPP_MIN_LOG_LEVEL (conftest sets both for the tests' own process)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "SPECJAX_VERBOSE")}
  return {**env, **extra}


def _generate(tmp_path, name, *flags, **env):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "specjax.main",
      "--config",
      "configs/generate.py:runlocal",
      "--workdir",
      str(tmp_path / name),
      *flags,
    ],
    cwd=REPO,
    env=_env(**env),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout + result.stderr


def _library_lines(output):
  """absl-format lines, except jax's platform warnings (e.g. a GPU without a CUDA jaxlib), which matter."""
  return [m.group(0) for m in ABSL_LINE.finditer(output) if not (m.group(1) == "W" and m.group(2) == "xla_bridge.py")]


def test_generate_is_quiet_and_verbose_brings_info_back(tmp_path):
  quiet = _generate(tmp_path, "quiet")
  assert "[specjax] generate: 12 answers" in quiet
  assert _library_lines(quiet) == [] and "cuInit" not in quiet, quiet
  verbose = _generate(tmp_path, "verbose", "--verbose")
  info = [m.group(2) for m in ABSL_LINE.finditer(verbose) if m.group(1) == "I"]
  assert "generate.py" in info, verbose  # specjax's own line, through absl as before
  assert "[specjax]" not in verbose


def test_specjax_verbose_environment_variable():
  code = (
    "import os\nfrom specjax import console\nconsole.setup()\n"
    "print(console.verbose(), 'TF_CPP_MIN_LOG_LEVEL' in os.environ)\n"
  )
  for value, expected in (("1", "True False"), ("0", "False True")):
    result = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      env=_env(SPECJAX_VERBOSE=value),
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert result.stdout.split() == expected.split(), result.stderr


def test_tensorflow_import_is_quiet_and_sees_no_gpu():
  """The data pipeline's TensorFlow: its load-time lines ("Could not find cuda drivers", cuInit)
  are discarded, and it is kept off the GPUs that jax uses."""
  code = (
    "from specjax import console\n"
    "console.setup()\n"
    "from specjax.data import tasks\n"
    "import tensorflow as tf\n"
    "print('visible GPUs:', tf.config.get_visible_devices('GPU'))\n"
    "print('ready:', int(tf.constant(1)))\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert "visible GPUs: []" in result.stdout and "ready: 1" in result.stdout
  output = result.stdout + result.stderr
  assert _library_lines(output) == [] and "cuInit" not in output and "absl::InitializeLog" not in output, output
