"""Training checkpoints with orbax: asynchronous saves, the last K kept, exact resume.

A checkpoint holds the train state (drafter params, optimizer state, step, RNG key) and a small
JSON record (the data position and the config that made it). The target model is never saved:
it is an input, reloaded from its own checkpoint. Paths may be local or gs://.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from specjax.errors import SpecjaxError


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


class Checkpointer:
  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1:
      raise SpecjaxError(f"config field `checkpoint_every`={save_every}: must be >= 1")
    if keep < 1:
      raise SpecjaxError(f"config field `checkpoints_to_keep`={keep}: must be >= 1")
    # orbax's OCDBT writer rejects relative paths, and only at the first save (minutes in).
    directory = _absolute(directory)
    self.directory = directory
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                        create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save of `state` at `step` (returns before the write finishes)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)

  def restore(self, state_like, step: int | None = None, shardings=None) -> tuple[dict, dict]:
    """(state, meta) of `step` (default: the latest), placed like `shardings` (or state_like's)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise SpecjaxError(f"{self.directory}: no checkpoint to restore")
    abstract = _abstract(state_like, shardings)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise SpecjaxError(f"{self.directory}/{step}: the checkpoint does not match this config's model and "
                         f"optimizer ({str(e).splitlines()[0][:300]})") from None
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(path: str, params_like, shardings=None):
  """Only the drafter's params from a training run's checkpoints (a finetune starting from a
  pretraining run): `path` is the run's workdir or its checkpoints folder."""
  directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else checkpoint_dir(path)
  if not os.path.isdir(directory) and "://" not in directory:
    raise SpecjaxError(f"init={path!r}: no checkpoints folder at {directory}")
  manager = ocp.CheckpointManager(_absolute(directory))
  step = manager.latest_step()
  if step is None:
    raise SpecjaxError(f"init={path!r}: {directory} holds no checkpoint")
  abstract = _abstract(params_like, shardings)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract}, restore_args=jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, "sharding", None)), {"params": abstract}),
            partial_restore=True)))
  except (ValueError, KeyError) as e:
    raise SpecjaxError(f"init={path!r}: its checkpoint at step {step} does not match the drafter config "
                       f"({str(e).splitlines()[0][:300]})") from None
  finally:
    manager.close()
  return restored["state"]["params"], step
