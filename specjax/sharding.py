"""Device mesh over (data, fsdp, tensor), one table of logical-axis rules, and multi-host start.

Parameters, activations and KV caches name their dimensions with logical axes
(`batch, length, embed, mlp, heads, kv_heads, head_dim, vocab, ...`, as in t5x/maxtext);
`LOGICAL_RULES` maps them onto mesh axes. A mesh axis that does not divide a dimension is
dropped for that array (replicated) instead of failing, so tiny test models shard too.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specjax.errors import SpecjaxError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
  "batch": ("data", "fsdp"),
  # Batch x kv_heads merged (KV cache rows): batch-major, so splitting it over the batch axes
  # then tensor matches the activations' sharding whenever each batch shard holds one row
  # or tensor is 1; otherwise XLA reshards (correct, slower).
  "cache_rows": ("data", "fsdp", "tensor"),
  "embed": ("fsdp",),
  "heads": ("tensor",),
  "kv_heads": ("tensor",),
  "mlp": ("tensor",),
  "vocab": ("tensor",),
  "length": (),
  "cache_length": (),
  "head_dim": (),
  "norm": (),
  "layers": (),
}

# Parameter path (a regex over "a/b/c") -> logical axes of its dimensions. Kernels are [in, out].
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
  (r"embed_tokens/embedding$", ("vocab", "embed")),
  (r"self_attn/q_proj/kernel$", ("embed", "heads")),
  (r"self_attn/(k|v)_proj/kernel$", ("embed", "kv_heads")),
  (r"self_attn/o_proj/kernel$", ("heads", "embed")),
  (r"mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),
  (r"mlp/down_proj/kernel$", ("mlp", "embed")),
  (r"lm_head/kernel$", ("embed", "vocab")),
  (r"(layernorm|norm)/weight$", ("norm",)),
)

# Each layer's keys [R, S, E] and values [R, E, S], R = batch x kv_heads (row b*K + k).
K_CACHE_AXES = ("cache_rows", "cache_length", "head_dim")
V_CACHE_AXES = ("cache_rows", "head_dim", "cache_length")


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types; one -1 takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != 3:
    raise SpecjaxError(f"mesh shape {tuple(shape)}: expected 3 sizes for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise SpecjaxError(f"mesh shape {tuple(shape)}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise SpecjaxError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise SpecjaxError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, {len(devices)} are available")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh) -> P:
  """PartitionSpec for an array whose dimensions carry `logical_axes`."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims, logical axes {tuple(logical_axes)}")
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical_axes):
    chosen, size = [], 1
    for axis in LOGICAL_RULES.get(name, ()) if name else ():
      n = mesh.shape[axis]
      if axis in used or n == 1 or dim % (size * n):
        continue
      chosen.append(axis)
      size *= n
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def logical_sharding(shape, logical_axes, mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(shape, logical_axes, mesh))


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  for pattern, axes in PARAM_LOGICAL_AXES:
    if re.search(pattern, path):
      return axes
  return (None,) * ndim


def path_str(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def state_shardings(state, mesh: Mesh):
  """NamedShardings for every leaf of an nnx.State (or a pytree keyed like one)."""

  def one(key_path, leaf):
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in key_path]
    keys = [k for k in keys if k != "value"]
    return logical_sharding(leaf.shape, param_logical_axes(path_str(keys), leaf.ndim), mesh)

  return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model, mesh: Mesh):
  """Places a model's weights on `mesh` by the rules table (in place) and returns it."""
  from flax import nnx

  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
  return model


def replicate_model(model, mesh: Mesh):
  """Places a full copy of a model's weights on every device of `mesh` (in place) and returns it:
  for a small drafter, drafting without collectives beats sharding its few weights."""
  from flax import nnx

  nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
  return model


def cache_sharding(cache, mesh: Mesh):
  """Shardings for a KVCache: each layer's keys and values by batch and kv_heads; lengths by batch."""
  per_layer = lambda arrays, axes: tuple(logical_sharding(a.shape, axes, mesh) for a in arrays)
  return type(cache)(
    per_layer(cache.k_RSE, K_CACHE_AXES),
    per_layer(cache.v_RES, V_CACHE_AXES),
    logical_sharding(cache.lengths_B.shape, ("batch",), mesh),
  )


def batch_sharding(shape, mesh: Mesh) -> NamedSharding:
  """Arrays whose leading dimension is the batch."""
  return logical_sharding(shape, ("batch",) + (None,) * (len(shape) - 1), mesh)


def maybe_initialize_distributed() -> bool:
  """Joins a multi-host run when the environment asks for it (big_vision's habit).

  SPECJAX_DISTRIBUTED=1: `jax.distributed.initialize()` with auto-detection (Cloud TPU pods).
  SPECJAX_COORDINATOR=host:port with SPECJAX_NUM_PROCESSES and SPECJAX_PROCESS_ID: explicit values
  (any cluster; on CPU, collectives go through gloo). SPECJAX_HEARTBEAT_TIMEOUT (seconds, default
  100): how long the others wait for a process that stopped answering before they exit with an
  error instead of hanging. Returns whether it initialised. Call before anything uses a device.
  """
  coordinator = os.environ.get("SPECJAX_COORDINATOR")
  auto = os.environ.get("SPECJAX_DISTRIBUTED", "0") not in ("", "0", "false", "False")
  if not coordinator and not auto:
    return False
  timeouts = {}
  for var, arg in (
    ("SPECJAX_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds"),
    ("SPECJAX_INIT_TIMEOUT", "initialization_timeout"),
  ):
    if os.environ.get(var):
      try:
        timeouts[arg] = int(os.environ[var])
      except ValueError:
        raise SpecjaxError(f"{var}={os.environ[var]!r}: expected whole seconds") from None
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need a transport
  if coordinator:
    try:
      num_processes = int(os.environ["SPECJAX_NUM_PROCESSES"])
      process_id = int(os.environ["SPECJAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise SpecjaxError(
        f"SPECJAX_COORDINATOR is set, so SPECJAX_NUM_PROCESSES and SPECJAX_PROCESS_ID must be set to integers too ({e})"
      ) from None
    if not 0 <= process_id < num_processes:
      raise SpecjaxError(f"SPECJAX_PROCESS_ID={process_id}: must be in [0, SPECJAX_NUM_PROCESSES={num_processes})")
    jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id, **timeouts
    )
  else:
    jax.distributed.initialize(**timeouts)
  return True
