"""Entry point: `python -m specjax.main --config configs/JOB.py[:ARGS] --workdir DIR`.

Dispatches on `config.job`. A SpecjaxError (a mistake in a file, field or value the user gave)
ends the run with its message and exit code 2; a traceback would only bury the message. The
libraries log warnings and errors only, unless --verbose or SPECJAX_VERBOSE=1 (specjax.console).
"""

from __future__ import annotations

import errno
import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

from specjax import console, validate  # validate: no JAX behind it, so bad configs fail in a second
from specjax.errors import SpecjaxError

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/generate.py:runlocal.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Let the libraries (absl, jax, orbax, seqio, TensorFlow) log at INFO; also SPECJAX_VERBOSE=1."
)
flags.mark_flags_as_required(["config", "workdir"])

# job name -> "module:function" taking (config, workdir).
JOBS = {
  "generate": "specjax.jobs.generate:run",
  "distill_data": "specjax.jobs.distill_data:run",
  "pretrain": "specjax.jobs.train:run",
  "finetune": "specjax.jobs.train:run",
  "eval_specbench": "specjax.jobs.eval_specbench:run",
  "demo": "specjax.jobs.demo:run",
}


# The storage's refusals (full disk or quota, read-only file system, permission): a user's
# environment to fix, not a bug, so one line rather than a traceback.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _fail(message: str) -> None:
  tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
  if tqdm is not None and getattr(tqdm, "_instances", None):  # a progress bar left mid-line: start a new one
    print(file=sys.stderr)
  print(f"specjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _specjax_error(e: BaseException) -> SpecjaxError | None:
  """The innermost SpecjaxError behind an exception (config_flags wraps get_config's errors)."""
  found = None
  while e is not None:
    if isinstance(e, SpecjaxError):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _config_arg(argv) -> str | None:
  """The value of --config in argv ("configs/generate.py:runlocal"), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str):
  """configs/X.py[:ARG] -> get_config(ARG), as config_flags loads it (for reporting overrides)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("specjax_config_under_check", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _bad_override(argv) -> SpecjaxError | None:
  """The SpecjaxError for a `--config.FIELD` in argv that names no field of the config (with a
  did-you-mean), or None when every override names one (or the config itself did not load)."""

  spec = _config_arg(argv)
  if not spec:
    return None
  try:
    config = _load_config(spec)
  except Exception:  # noqa: BLE001 (the config did not load: the caller reports the original error)
    return None
  try:
    validate.check_overrides(config, argv, source=spec.partition(":")[0])
  except SpecjaxError as e:
    return e
  return None


def _parse_flags(argv):
  """absl's parsing, with mistakes reported like every other SpecjaxError (exit code 2).

  ml_collections raises AttributeError / KeyError / TypeError (not flags.Error) for an override
  that names no field (`--config.gamm=3`); that becomes one line naming the field and the
  closest fields the config has."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    cause = _specjax_error(e) or _bad_override(argv)
    _fail(str(cause) if cause is not None else f"{e} (--helpfull lists the flags)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    cause = _specjax_error(e) or _bad_override(argv)
    _fail(str(cause) if cause is not None else f"cannot apply the --config overrides ({str(e).splitlines()[0]})")
  _check_aliases(argv)
  return rest


def _check_aliases(argv) -> None:
  """A nested field and its old flat name (config.acceptance.gamma, acceptance_gamma) given
  different values on one command line: refused (specjax.validate.check_aliases)."""

  try:
    config = _CONFIG.value
    config.get("job")
  except Exception:  # noqa: BLE001 (a config that did not load: main reports it)
    return
  try:
    validate.check_aliases(config, argv)
  except SpecjaxError as e:
    _fail(str(e))


def run_job(config, workdir: str):
  """Validates the config and the workdir (specjax.validate), then runs `config.job`; raises
  SpecjaxError for a job that does not exist (yet) or a config or workdir that is wrong."""
  job = config.get("job")
  if job not in JOBS:
    raise SpecjaxError(f"config field `job`={job!r}: unknown job; available: {', '.join(JOBS)}")

  validate.check_job(config, workdir)
  module, function = JOBS[job].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)


def main(argv):
  console.setup(_VERBOSE.value)  # before anything imports jax or TensorFlow (the jobs import them lazily)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config and --workdir")
  try:
    config = _CONFIG.value
    config.get("job")  # a config file that failed to load raises here
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    _fail(f"{config_flags.get_config_filename(flags.FLAGS['config'])}: cannot load the config file ({reason})")
  try:
    from specjax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    run_job(config, _WORKDIR.value)
  except SpecjaxError as e:
    _fail(str(e))
  except OSError as e:
    if e.errno not in _STORAGE_ERRORS:
      raise
    # The storage refused a write the jobs do not wrap (a full disk before the first checkpoint,
    # say): what is done so far is kept (every job resumes), so say which file and why.
    _fail(
      f"{e.filename or 'a file'}: {e.strerror}; free space or fix the permissions and rerun the same command to resume"
    )


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
