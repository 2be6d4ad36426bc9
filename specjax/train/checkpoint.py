"""Training checkpoints with orbax: asynchronous saves, the last K kept, exact resume.

A checkpoint holds the train state (drafter params, optimizer state, step, RNG key) and a small
JSON record (the data position and the config that made it). The target model is never saved:
it is an input, reloaded from its own checkpoint. Paths may be local or gs://.

A damaged checkpoint (a data file cut short, metadata removed or garbled: a full disk, a copy
that stopped) does not strand a run: `restore` tries the newest step first and, when it is
damaged, says which step and which file in one line, moves it aside to `checkpoints.damaged/`
and resumes from the newest intact one. Each finished step records its files' sizes
(`specjax_files.json`), so a truncated file is named exactly; a checkpoint that is intact but
does not fit this config's model is still an error, never skipped.

The JSON record also holds the run's data settings (batch shape, mixture, data folders, seed:
`settings` in meta). The data position is counted in steps, so a resume with another batch
size or sequence length would re-read or skip data: `check_settings` refuses it, naming each
difference, unless the user asks for it (the trainer's `allow_resume_with_changes`).

A save that cannot write (a full disk, a quota, a read-only directory) ends in one SpecjaxError
naming the step's directory and the reason; orbax's background threads log the same failure at
ERROR with a traceback each (a dozen and more per save), which are kept off the console.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import sys

import jax
import orbax.checkpoint as ocp

from specjax import console
from specjax.errors import SpecjaxError

SIZES_FILE = "specjax_files.json"  # {relative path: bytes} of a finished step's files
# JSON files of a step: those that must be there, and those checked when present.
_JSON_REQUIRED = ("meta/metadata",)
_JSON_OPTIONAL = ("_CHECKPOINT_METADATA", "state/_METADATA")
# TensorStore / OCDBT errors of a damaged file (as opposed to a restore target that does not fit).
_DAMAGE = re.compile(
  r"OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|Error reading|Error opening|corrupt|"
  r"checksum|No such file|does not exist|Unexpected end|truncated",
  re.IGNORECASE,
)


# A save that failed to write (as opposed to a bug): TensorStore's and the OS's words for it.
_WRITE_FAILURE = re.compile(
  r"RESOURCE_EXHAUSTED|No space left|Disk quota|Read-only file system|Permission denied|"
  r"os_error_code|Failed writing|Failed to write|Errno 28|ENOSPC",
  re.IGNORECASE,
)


def _chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _write_failure(e: BaseException) -> str | None:
  """The reason behind a failed save, in a few words, or None when it is not a failed write."""
  for x in _chain(e):
    text = str(x)
    if isinstance(x, OSError) and x.errno is not None:
      return x.strerror or text
    match = re.search(r"\[os_error_code='?(\d+)'?\]", text)
    if match:
      return os.strerror(int(match.group(1)))
    if _WRITE_FAILURE.search(text):
      return (text.strip().splitlines() or [type(x).__name__])[0].split(" [tensorstore_spec=")[0][:300]
  return None


class _OrbaxWriteFailureFilter(logging.Filter):
  """Drops orbax's ERROR records (with their tracebacks) of a failed write: save() reports it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    if (
      console.verbose()
      or record.levelno < logging.ERROR
      or ("orbax" not in (record.pathname or "") and record.name != "asyncio")
    ):  # asyncio: a task never awaited
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
    return not _WRITE_FAILURE.search(text)


def _install_write_failure_filter() -> None:
  for name in ("absl", "orbax", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxWriteFailureFilter) for f in logger.filters):
      logger.addFilter(_OrbaxWriteFailureFilter())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _abstract(tree, shardings=None):
  """Shapes and dtypes of `tree` to restore into, placed like `shardings` when given."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _absolute(directory: str) -> str:
  return directory if "://" in directory else os.path.abspath(directory)


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def _files(step_dir: str) -> dict[str, int]:
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != SIZES_FILE:
        out[rel] = os.path.getsize(path)
  return out


def record_sizes(directory: str, step: int) -> None:
  """Writes a finished step's file sizes beside its files (local directories, process 0)."""
  step_dir = _step_dir(directory, step)
  if (
    "://" in directory
    or jax.process_index() != 0
    or not os.path.isdir(step_dir)
    or os.path.exists(os.path.join(step_dir, SIZES_FILE))
  ):
    return
  sizes = _files(step_dir)
  tmp = os.path.join(step_dir, SIZES_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(sizes, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, SIZES_FILE))


def damage(directory: str, step: int) -> str | None:
  """What is wrong with step's files, naming the file ("state/d/ab12: 1287 bytes, 2537 when
  saved"), or None when the files look whole (the restore itself may still find damage)."""
  step_dir = _step_dir(directory, step)
  if "://" in directory:
    return None
  sizes_path = os.path.join(step_dir, SIZES_FILE)
  if os.path.exists(sizes_path):
    try:
      with open(sizes_path, encoding="utf-8") as f:
        saved = json.load(f)
      saved = {str(k): int(v) for k, v in saved.items()}
    except (OSError, ValueError, TypeError, AttributeError):
      saved = {}  # the record itself is damaged: fall through to the other checks
    for rel, size in sorted(saved.items()):
      path = os.path.join(step_dir, rel)
      if not os.path.exists(path):
        return f"{path}: missing"
      if os.path.getsize(path) != size:
        return f"{path}: {os.path.getsize(path)} bytes, {size} when saved"
  for rel in _JSON_REQUIRED + _JSON_OPTIONAL:
    path = os.path.join(step_dir, rel)
    if not os.path.exists(path):
      if rel in _JSON_REQUIRED:
        return f"{path}: missing"
      continue
    try:
      with open(path, encoding="utf-8") as f:
        json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
      return f"{path}: not valid JSON ({str(e).splitlines()[0]})"
  return None


def newest_meta(directory: str) -> tuple[int, dict] | None:
  """(step, JSON record) of the newest step whose record reads back (local directories; None when
  there is none): read straight from the file, so a resume can be checked before anything loads."""
  if "://" in directory or not os.path.isdir(directory):
    return None
  steps = sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)
  for step in steps:
    try:
      with open(os.path.join(_step_dir(directory, step), "meta", "metadata"), encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
      continue  # damaged: restore reports it and falls back
    if isinstance(meta, dict):
      return step, meta
  return None


def check_settings(
  where: str, saved: dict | None, now: dict, *, allow: bool, field: str = "allow_resume_with_changes"
) -> None:
  """Refuses a resume whose data settings differ from the checkpoint's (`saved`, None for a
  checkpoint that predates the record: nothing to compare), naming each difference; with
  `allow`, says so in one warning and goes on."""
  if saved is None:
    return
  changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if not changed:
    return
  diff = ", ".join(f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
  if allow:
    console.warning(
      "resume: %s was made with other data settings: %s; resuming anyway (%s=True): the data "
      "position is counted in steps, so data may be re-read or skipped",
      where,
      diff,
      field,
    )
    return
  raise SpecjaxError(
    f"{where}: the checkpoint was made with other data settings: {diff}; the data position is "
    "counted in steps, so resuming would re-read or skip data. Rerun with the checkpoint's values, "
    f"use a new workdir, or set --config.{field}=True to resume anyway"
  )


def _restore_damage(e: BaseException) -> str | None:
  """The damage behind a failed restore (one line), or None when it is a mismatch with the
  restore target (shapes, tree structure): then no other checkpoint would do better."""
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for x in chain:
    first = (str(x).strip().splitlines() or [type(x).__name__])[0].split(" [tensorstore_spec=")[0]
    if isinstance(x, (OSError, json.JSONDecodeError, UnicodeDecodeError)) or _DAMAGE.search(first):
      return first[:400]
  if any(isinstance(x, (ValueError, KeyError, TypeError)) for x in chain):
    return None
  return (str(chain[0]).strip().splitlines() or [type(chain[0]).__name__])[0][:400]


def _orbax_unraisable(unraisable) -> bool:
  """An exception left in one of orbax's read coroutines when a failed restore drops it (Python
  prints each as "Exception ignored in: <coroutine ...>" with a traceback, at garbage collection)."""
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  # TensorStore completing a write (or its failure) after orbax closed the asyncio loop that waited on it
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (
    isinstance(unraisable.exc_value, RuntimeError)
    and str(unraisable.exc_value) == "Event loop is closed"
    and tb is not None
    and "asyncio" in tb.tb_frame.f_code.co_filename
  )


def _install_unraisable_filter() -> None:
  """Keeps those tracebacks off the console (once per process; --verbose shows them)."""
  if getattr(sys.unraisablehook, "_specjax", False) or console.verbose():
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _orbax_unraisable(unraisable):
      previous(unraisable)

  hook._specjax = True
  sys.unraisablehook = hook


class _QuietOrbax:
  """Orbax and absl log every failed read (with tracebacks from its asyncio tasks) at ERROR;
  while trying a checkpoint that may be damaged, our one line is the report."""

  _NAMES = ("absl", "orbax", "orbax.checkpoint", "asyncio", "jax")

  def __enter__(self):
    _install_unraisable_filter()
    self.saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in self._NAMES]
    if not console.verbose():
      for logger, _ in self.saved:
        logger.setLevel(logging.CRITICAL)
    return self

  def __exit__(self, *exc):
    gc.collect()  # the failed read's coroutines go now, while the filter and the levels hold
    for logger, level in self.saved:
      logger.setLevel(level)


def _newest_intact(directory: str, steps, restore_one, *, move_damaged: bool, what: str):
  """(step, restored) of the newest step that restores, trying `steps` newest first; damaged
  ones are reported in one line (and moved aside when move_damaged). A mismatch is raised."""
  damaged = []
  for step in sorted(steps, reverse=True):
    problem = damage(directory, step)
    if problem is None:
      try:
        with _QuietOrbax():
          out = restore_one(step)
      except SpecjaxError:
        raise
      except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise bare Exceptions for bad files)
        problem = _restore_damage(e)
        if problem is None:
          raise
        problem = f"{_step_dir(directory, step)}: {problem}"
    if problem is None:
      if damaged:
        moved = [_move_aside(directory, s) for s, _ in damaged] if move_damaged else []
        console.warning(
          "%s: checkpoint %s damaged (%s)%s; resuming from step %d, the newest intact one",
          what,
          ", ".join(f"step {s}" for s, _ in damaged) + (" is" if len(damaged) == 1 else " are"),
          "; ".join(p for _, p in damaged),
          f"; moved to {os.path.dirname(moved[0])}" if moved else "",
          step,
        )
      return step, out
    damaged.append((step, problem))
  raise SpecjaxError(
    f"{what}: every checkpoint in {directory} is damaged: "
    + "; ".join(f"step {s} ({p})" for s, p in damaged)
    + "; remove the checkpoints folder to start over"
  )


def _move_aside(directory: str, step: int) -> str:
  """checkpoints/N -> checkpoints.damaged/N (process 0; local): a damaged step is kept for a look,
  out of orbax's way (its step number would otherwise block the next save of that step)."""
  src = _step_dir(directory, step)
  aside = os.path.join(
    os.path.dirname(os.path.normpath(directory)), os.path.basename(os.path.normpath(directory)) + ".damaged"
  )
  dst = os.path.join(aside, str(step))
  if "://" in directory or jax.process_index() != 0 or not os.path.exists(src):
    return dst
  os.makedirs(aside, exist_ok=True)
  k = 1
  while os.path.exists(dst):
    k += 1
    dst = os.path.join(aside, f"{step}.{k}")
  os.replace(src, dst)
  return dst


class Checkpointer:
  def __init__(
    self, directory: str, *, save_every: int, keep: int, async_save: bool = True, settings: dict | None = None
  ):
    """settings: the run's data settings, recorded in every step's JSON record (meta["settings"])."""
    if save_every < 1:
      raise SpecjaxError(f"config field `checkpoint_every`={save_every}: must be >= 1")
    if keep < 1:
      raise SpecjaxError(f"config field `checkpoints_to_keep`={keep}: must be >= 1")
    # orbax's OCDBT writer rejects relative paths, and only at the first save (minutes in).
    directory = _absolute(directory)
    self.directory = directory
    self.save_every = save_every
    self.settings = settings
    self._saving: int | None = None  # the step of the save in flight
    _install_write_failure_filter()
    _install_unraisable_filter()
    self.manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save of `state` at `step` (returns before the write finishes)."""
    if step in self.manager.all_steps():
      return
    if self.settings is not None:
      meta = {**meta, "settings": self.settings}
    with self._reporting(step):  # a failure of the previous save may surface here
      self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
      )
    self._saving = step
    self._record_finished(but=step)

  @contextlib.contextmanager
  def _reporting(self, step: int):
    """A save that could not write, as one SpecjaxError naming the directory and the reason."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 (orbax re-raises its threads' errors as bare ValueErrors)
      reason = _write_failure(e)
      if reason is None:
        raise
      step = self._saving if self._saving is not None else step
      raise SpecjaxError(
        f"{self.directory}/{step}: saving the checkpoint failed ({reason}); free space (or make the "
        "directory writable) and rerun the same command: it resumes from the newest intact "
        "checkpoint"
      ) from None

  def _record_finished(self, but: int | None = None) -> None:
    """File sizes of the finished steps that have none yet (orbax finishes one save before the next)."""
    for s in self.manager.all_steps():
      if s != but:
        record_sizes(self.directory, s)

  def restore(self, state_like, step: int | None = None, shardings=None) -> tuple[dict, dict]:
    """(state, meta) of `step` (default: the newest intact one; damaged newer ones are reported
    and moved aside), placed like `shardings` (or state_like's)."""
    steps = self.manager.all_steps() if step is None else [step]
    if not steps:
      raise SpecjaxError(f"{self.directory}: no checkpoint to restore")
    abstract = _abstract(state_like, shardings)

    def restore_one(s):
      try:
        return self.manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
      except Exception as e:  # noqa: BLE001 (orbax wraps a mismatch in a bare Exception at times)
        if _restore_damage(e) is not None:
          raise
        raise SpecjaxError(
          f"{self.directory}/{s}: the checkpoint does not match this config's model and "
          f"optimizer ({str(e).splitlines()[0][:300]})"
        ) from None

    _, out = _newest_intact(self.directory, steps, restore_one, move_damaged=step is None, what="resume")
    if step is None:
      self.manager.reload()  # the steps moved aside are gone from its list
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    with self._reporting(self._saving or 0):
      self.manager.wait_until_finished()
    self._record_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # noqa: BLE001 (closing after a failed save re-raises its error)
        if _write_failure(e) is None:
          raise


def restore_params(path: str, params_like, shardings=None):
  """Only the drafter's params from a training run's checkpoints (a finetune starting from a
  pretraining run): `path` is the run's workdir or its checkpoints folder."""
  directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else checkpoint_dir(path)
  if not os.path.isdir(directory) and "://" not in directory:
    raise SpecjaxError(f"init={path!r}: no checkpoints folder at {directory}")
  manager = ocp.CheckpointManager(_absolute(directory))
  if not manager.all_steps():
    manager.close()
    raise SpecjaxError(f"init={path!r}: {directory} holds no checkpoint")
  abstract = _abstract(params_like, shardings)

  def restore_one(step):
    try:
      return manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item={"params": abstract},
            restore_args=jax.tree.map(
              lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, "sharding", None)), {"params": abstract}
            ),
            partial_restore=True,
          )
        ),
      )
    except Exception as e:  # noqa: BLE001 (orbax wraps a mismatch in a bare Exception at times)
      if _restore_damage(e) is not None:
        raise
      raise SpecjaxError(
        f"init={path!r}: its checkpoint at step {step} does not match the drafter config "
        f"({str(e).splitlines()[0][:300]})"
      ) from None

  try:  # another run's checkpoints: damaged ones are reported and skipped, never moved
    step, restored = _newest_intact(
      _absolute(directory), manager.all_steps(), restore_one, move_damaged=False, what=f"init={path!r}"
    )
  finally:
    manager.close()
  return restored["state"]["params"], step
