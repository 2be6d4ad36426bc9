"""What a run prints: specjax's own short lines, and the libraries' logging kept to warnings.

`make demo` printed hundreds of lines, mostly absl INFO lines from orbax and seqio and TensorFlow
probing CUDA at import. `setup()` (specjax.main calls it before anything imports jax or
TensorFlow) keeps the libraries to warnings and errors; `info(msg)` prints specjax's own lines as
`[specjax] msg` on stderr. Verbose (--verbose or SPECJAX_VERBOSE=1) changes nothing of the
libraries' logging, and `info` logs through absl as before.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging as py_logging
import os
import sys

from absl import logging

QUIET_LOGGERS = ("orbax", "absl", "seqio", "tensorflow", "jax")
# Warnings that tell a specjax user nothing: specjax.data.tasks shuffles its FunctionDataSources
# and resumes them by step itself.
_NOISE = ("Using an uncached FunctionDataset",)

_state = {"verbose": None}


def env_verbose() -> bool:
  return os.environ.get("SPECJAX_VERBOSE", "").strip().lower() in ("1", "true", "yes")


def verbose() -> bool:
  return env_verbose() if _state["verbose"] is None else _state["verbose"]


def info(msg: str, *args) -> None:
  """One of specjax's own progress lines (printf-style args, as absl's logging.info)."""
  text = msg % args if args else msg
  if verbose():
    logging.info("%s", text)
  else:
    print(f"[specjax] {text}", file=sys.stderr, flush=True)


def warning(msg: str, *args) -> None:
  text = msg % args if args else msg
  if verbose():
    logging.warning("%s", text)
  else:
    print(f"[specjax] warning: {text}", file=sys.stderr, flush=True)


logging.ABSLLogger.register_frame_to_skip(__file__, "info")  # verbose lines name the caller's file
logging.ABSLLogger.register_frame_to_skip(__file__, "warning")


class _NoiseFilter(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE)


@contextlib.contextmanager
def _stderr_discarded():
  """TensorFlow's libraries write absl lines ("Could not find cuda drivers ...") straight to file
  descriptor 2 while they load, before any log level applies: only a redirect silences them."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the first `import tensorflow` (direct, or through seqio) with stderr discarded. A failed
  import still raises, with its Python traceback intact."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    real = spec.loader

    class Loader(importlib.abc.Loader):
      def create_module(self, spec):
        return real.create_module(spec)

      def exec_module(self, module):
        with _stderr_discarded():
          real.exec_module(module)

    spec.loader = Loader()
    return spec


def setup(verbose_flag: bool = False) -> None:
  """Quiet by default; verbose with `verbose_flag` or SPECJAX_VERBOSE=1. Call before jax or
  TensorFlow is imported (their C++ logging reads TF_CPP_MIN_LOG_LEVEL once, when they load)."""
  _state["verbose"] = bool(verbose_flag) or env_verbose()
  if _state["verbose"]:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF/XLA C++: errors such as cuInit's on a GPU-less host
  if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
  logging.set_verbosity(logging.WARNING)
  for name in QUIET_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.WARNING)
  for target in (logging.get_absl_handler(), py_logging.getLogger("absl")):
    if not any(isinstance(f, _NoiseFilter) for f in target.filters):
      target.addFilter(_NoiseFilter())


def hide_gpus_from_tensorflow(tf) -> None:
  """TensorFlow only feeds data here; left alone on a GPU host it would claim the GPU memory that
  JAX needs. Call right after importing it, before its first op (jax keeps its GPUs)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow's devices were initialised before (by the caller): leave them
    pass
