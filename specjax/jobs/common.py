"""What several jobs do the same way: the mesh they decode on, loading a target with its drafters,
and reading name=path lists of drafters."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from specjax.config_utils import workdir_path
from specjax.errors import SpecjaxError
from specjax.models.hf import load_model, target_tokenizer
from specjax.sharding import make_mesh, replicate_model


def job_mesh(config):
  """The mesh of config field `mesh_shape` on more than one device; None on one (no sharding)."""
  return make_mesh(tuple(config.mesh_shape)) if jax.device_count() > 1 else None


def load_target_and_drafters(
  config,
  target_path: str,
  drafter_paths: Mapping[str, str],
  mesh,
  *,
  tokenizer_path: str | None = None,
  with_tokenizer: bool = True,
  check_drafter: Callable | None = None,
):
  """(tokenizer, target, target's LlamaConfig, drafters by name) in config field `dtype`.

  The tokenizer (config field `tokenizer`'s, else the target's; None when with_tokenizer is
  false) loads first, the target on `mesh` with config.seed, then drafter k with config.seed + 1 + k:
  sharded on the mesh when config.drafter_sharding is "sharded", else loaded whole and
  replicated on it. check_drafter(name, path, drafter, target) runs on each drafter as it loads."""
  tokenizer = target_tokenizer(tokenizer_path, target_path) if with_tokenizer else None
  target, target_config = load_model(target_path, config.dtype, mesh, seed=config.seed)
  drafters = {}
  for k, (name, path) in enumerate(drafter_paths.items()):
    sharded = mesh is not None and config.drafter_sharding == "sharded"
    drafter, _ = load_model(path, config.dtype, mesh if sharded else None, seed=config.seed + 1 + k)
    if check_drafter is not None:
      check_drafter(name, path, drafter, target)
    if mesh is not None and not sharded:
      replicate_model(drafter, mesh)
    drafters[name] = drafter
  return tokenizer, target, target_config, drafters


def named_paths(value, field: str, workdir: str) -> dict[str, str]:
  """Parses "name=path,name=path" or a ConfigDict/dict as {name: path}, with {workdir} replaced."""
  if not value:
    return {}
  if isinstance(value, str):
    pairs = []
    for item in (p.strip() for p in value.split(",")):
      if not item:
        continue
      name, has_path, path = item.partition("=")
      if not has_path or not name.strip() or not path.strip():
        raise SpecjaxError(f"config field `{field}`: {item!r}: expected name=path (e.g. de=/ckpt/drafter-de)")
      pairs.append((name.strip(), path.strip()))
  else:
    pairs = [(str(k), str(v)) for k, v in dict(value).items()]
  out = {}
  for name, path in pairs:
    if name in out:
      raise SpecjaxError(f"config field `{field}`: {name!r} is given twice")
    out[name] = workdir_path({"path": path}, "path", workdir)
  return out
