"""Will it fit? Compiles the train step and the decoding loops ahead of time for a device
topology and reports what each program needs per chip, before anyone books the hardware.

  python -m specjax.aot --target vicuna-7b --drafter vicuna-68m --topology v4-8 --mesh 1,-1,1

TPU topologies get compile-only devices from libtpu's compiler
(`jax.experimental.topologies`), which runs on any x86 Linux host without a TPU; `cpu:N`
compiles for N local CPU devices, so the whole path runs (and is tested) anywhere. Weights,
optimizer state and batches are ShapeDtypeStructs carrying the shardings the trainer and the
generate job use, so nothing is allocated: a 7B target costs compile time only.

Memory is XLA's buffer assignment for one device (`compiled.memory_analysis()`): arguments,
outputs and temporaries, less what donation aliases. The verdict compares it with the chip's
HBM from a table. The TPU compiler itself refuses a program beyond the usable HBM (on v4,
30.75 of the 32 GiB), which is reported as DOES NOT FIT with its numbers; a program within a
GiB of the table's capacity is marginal. CPU numbers check the path, not a TPU's needs: XLA's
CPU backend fuses less and upcasts bfloat16, so its temporaries are larger. Exit status: 0 when
everything fits (or the capacity is unknown, CPU), 1 when a program does not fit, 2 for a
mistake in the flags or no TPU compiler.

`--roofline` compiles one round of each decoding loop alone (the state donated, with the
decode program's shardings) and compares XLA's "bytes accessed" per device with what the
round must read: the target's weights once, the drafter's γ times, each with its whole KV
cache (`bytes_ratio`), and turns the bytes into tokens/s at each TPU generation's HBM bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from specjax import sharding as shd
from specjax.decoding import engine
from specjax.decoding import sampling as smp
from specjax.decoding.decoder import Decoder, DecodingSettings
from specjax.decoding.engine import METHODS
from specjax.decoding.sampling import SamplingMode
from specjax.errors import SpecjaxError
from specjax.models.config import DTYPES, PRESETS, LlamaConfig, get_preset
from specjax.models.llama import abstract_model
from specjax.train import step as train_step
from specjax.train.defaults import trainer_config
from specjax.train.losses import LOSSES
from specjax.train.optimizer import make_optimizer

GIB = 1024**3

# Chips -> libtpu's chip grid. 3D tori: v4 and v5p (a name counts TensorCores, two per chip);
# 2D: v5e and v6e (a name counts chips). The same layouts as MaxText's AOT compile table.
_GRID_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class _Generation:
  prefix: str  # libtpu's topology prefix
  grid: dict[int, str]
  cores_per_chip: int  # the type name counts cores: v4-8 is 4 chips
  hbm_gib: float


# Per-chip HBM as Cloud TPU documents it (v4 and v5p: one megacore device per chip).
_GENERATIONS = {
  "v4": _Generation("v4", _GRID_3D, 2, 32),
  "v5p": _Generation("v5", _GRID_3D, 2, 95),
  "v5e": _Generation("v5e", _GRID_2D, 1, 16),
  "v5litepod": _Generation("v5e", _GRID_2D, 1, 16),
  "v6e": _Generation("v6e", _GRID_2D, 1, 32),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """Where the programs are compiled for: a TPU slice (compile-only devices) or local CPUs."""

  name: str  # as given: v4-8, v5litepod-8, cpu:8
  platform: str  # "tpu" or "cpu"
  num_devices: int
  capacity_bytes: int | None = None  # per device; None when unknown (CPU)
  topology_name: str | None = None  # libtpu's, e.g. v4:2x2x1
  chip_config_name: str | None = None
  chips_per_host_bounds: tuple[int, int, int] | None = None
  wrap: tuple[bool, bool, bool] | None = None


def parse_topology(name: str) -> Topology:
  """`cpu:N` or a Cloud TPU type (v4-8, v4-16, v5e-8 / v5litepod-8, v5p-8, v6e-8, ...)."""
  m = re.fullmatch(r"cpu:(\d+)", name)
  if m:
    if int(m.group(1)) < 1:
      raise SpecjaxError(f"--topology={name!r}: cpu:N needs N >= 1")
    return Topology(name, "cpu", int(m.group(1)))
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  known = ", ".join(
    f"{g}-{n * _GENERATIONS[g].cores_per_chip}"
    for g in ("v4", "v5e", "v5p", "v6e")
    for n in list(_GENERATIONS[g].grid)[:3]
  )
  if not m:
    raise SpecjaxError(
      f"--topology={name!r}: expected cpu:N or a Cloud TPU type such as {known}, ... (v5litepod-N is v5e-N)"
    )
  gen = _GENERATIONS[m.group(1)]
  count = int(m.group(2))
  chips = count // gen.cores_per_chip
  if count % gen.cores_per_chip or chips not in gen.grid:
    sizes = ", ".join(f"{m.group(1)}-{c * gen.cores_per_chip}" for c in gen.grid)
    raise SpecjaxError(f"--topology={name!r}: not a slice size this check knows; known: {sizes}")
  grid = gen.grid[chips]
  dims = len(grid.split("x"))
  if dims == 3:
    wrap = (chips >= 64,) * 3  # full 4x4x4 cubes and up are tori
  else:
    wrap = {128: (False, True, False), 256: (True, True, False)}.get(chips, (False, False, False))
  return Topology(
    name,
    "tpu",
    chips,
    capacity_bytes=int(gen.hbm_gib * GIB),
    topology_name=f"{gen.prefix}:{grid}",
    chip_config_name="megacore" if gen.cores_per_chip == 2 else "default",
    chips_per_host_bounds=(1, 1, 1) if chips == 1 else (2, 2, 1),
    wrap=wrap,
  )


class TpuCompilerMissing(SpecjaxError):
  """libtpu is not installed: the TPU check cannot run on this host."""


@contextlib.contextmanager
def _quiet_stderr():
  """Drops what native code writes to stderr meanwhile: off a TPU VM, libtpu's start-up warns
  that it found no TPU metadata (accelerator type, worker hostnames), which is expected here."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def topology_devices(topo: Topology) -> list:
  """The devices to compile for: libtpu's compile-only devices, or the first N local CPUs."""
  if topo.platform == "cpu":
    try:  # before JAX starts its CPU backend, ask for N devices; afterwards this is refused
      jax.config.update("jax_num_cpu_devices", topo.num_devices)
    except RuntimeError:
      pass
    devices = jax.devices("cpu")
    if len(devices) < topo.num_devices:
      raise SpecjaxError(
        f"--topology={topo.name}: this process has {len(devices)} CPU devices (JAX was started "
        f"before the count could be set; set jax_num_cpu_devices={topo.num_devices} or "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.num_devices})"
      )
    return devices[: topo.num_devices]
  from jax.experimental import topologies

  try:
    with _quiet_stderr():
      desc = topologies.get_topology_desc(
        topology_name=topo.topology_name,
        platform="tpu",
        chip_config_name=topo.chip_config_name,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=1,
        wrap=topo.wrap,
      )
  except Exception as e:  # noqa: BLE001  (libtpu's errors have no common type)
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "not installed" in message or ("libtpu" in message.lower() and "not found" in message.lower()):
      raise TpuCompilerMissing(
        f"the TPU compiler (libtpu: pip install 'jax[tpu]=={jax.__version__}') is not installed, so the "
        f"{topo.name} check cannot run here; it needs no TPU, only libtpu on an x86 Linux host "
        "(--topology cpu:N checks the same programs on CPU)"
      ) from None
    if "lockfile" in message:
      raise SpecjaxError(
        f"--topology={topo.name}: another process on this host holds libtpu (a TPU job or another "
        "check); run the check when it ends, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile "
        "alongside it"
      ) from None
    raise SpecjaxError(f"--topology={topo.name}: libtpu could not describe {topo.topology_name} ({message})") from None
  devices = list(desc.devices)
  if len(devices) != topo.num_devices:
    raise SpecjaxError(
      f"--topology={topo.name}: libtpu gave {len(devices)} devices for {topo.topology_name}, "
      f"expected {topo.num_devices}"
    )
  return devices


# --- models ------------------------------------------------------------------------------


def resolve_model(flag: str, value: str) -> LlamaConfig:
  """A preset name (or preset:NAME), or a Hugging Face checkpoint directory (its config.json only)."""
  name = value.removeprefix("preset:")
  if name in PRESETS:
    return get_preset(name)
  if os.path.isfile(os.path.join(value, "config.json")):
    return LlamaConfig.from_hf_json(os.path.join(value, "config.json"))
  raise SpecjaxError(
    f"{flag}={value!r}: not a model preset ({', '.join(sorted(PRESETS))}) nor a Hugging Face "
    "checkpoint directory with a config.json"
  )


def _abstract_params(config: LlamaConfig):
  """(graphdef, params as ShapeDtypeStructs): the model's structure, no memory."""

  graphdef, params, rest = nnx.split(abstract_model(config), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise SpecjaxError("the model holds state besides parameters; the check does not support it")
  return graphdef, params


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


# --- programs ----------------------------------------------------------------------------


@dataclasses.dataclass
class ProgramReport:
  """One compiled program's needs on one device."""

  program: str
  argument_bytes: int | None = None
  output_bytes: int | None = None
  temp_bytes: int | None = None
  generated_code_bytes: int | None = None
  alias_bytes: int | None = None
  total_bytes: int | None = None  # arguments + outputs + temporaries - aliased
  capacity_bytes: int | None = None
  headroom_bytes: int | None = None
  fits: bool | None = None  # None: capacity unknown
  compile_s: float = 0.0
  flops: float | None = None  # XLA's estimate; a loop's body may be counted once
  note: str = ""

  @property
  def verdict(self) -> str:
    return {True: "FITS", False: "DOES NOT FIT", None: "capacity unknown"}[self.fits]


def _compile(name: str, lowered_fn, capacity: int | None) -> ProgramReport:
  """Lowers and compiles; a compiler that runs out of memory (TPU) is a DOES NOT FIT verdict."""
  report = ProgramReport(name, capacity_bytes=capacity)
  start = time.perf_counter()
  try:
    compiled = lowered_fn().compile()
  except Exception as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.compile_s = time.perf_counter() - start
    report.fits = False
    report.note = "the compiler ran out of memory: " + " ".join(str(e).split())[:400]
    return report
  report.compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  if stats is not None:
    report.argument_bytes = int(stats.argument_size_in_bytes)
    report.output_bytes = int(stats.output_size_in_bytes)
    report.temp_bytes = int(stats.temp_size_in_bytes)
    report.generated_code_bytes = int(stats.generated_code_size_in_bytes)
    report.alias_bytes = int(stats.alias_size_in_bytes)
    report.total_bytes = report.argument_bytes + report.output_bytes + report.temp_bytes - report.alias_bytes
    if capacity is not None:
      report.headroom_bytes = capacity - report.total_bytes
      report.fits = report.headroom_bytes >= 0
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.flops = float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # noqa: BLE001, S110  (optional; some backends do not implement it)
    pass
  return report


def train_program(args, mesh, target_cfg: LlamaConfig, drafter_cfg: LlamaConfig) -> ProgramReport:
  """The trainer's jitted step: float32 drafter and Adam state by the rules table, state donated."""

  graphdef, params = _abstract_params(drafter_cfg.replace(dtype=args.dtype, param_dtype="float32"))
  tx, schedule = make_optimizer(trainer_config("pretrain"), total_steps=1000)
  state = jax.eval_shape(lambda p: train_step.init_state(p, tx, seed=0), params)  # the trainer's state, abstract
  spec = train_step.StepSpec(loss=args.train_loss, with_target=args.train_loss != "cross_entropy")
  target_graphdef = target_params = None
  if spec.with_target:
    target_graphdef, target_params = _abstract_params(target_cfg.replace(dtype=args.dtype, param_dtype=args.dtype))
  A = args.grad_accumulation
  shape = (A, args.train_batch // A, args.seq_len)
  batch_shapes = {k: shape for k in train_step.BATCH_FEATURES}
  batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in batch_shapes.items()}
  fn = train_step.make_train_step(graphdef, target_graphdef, tx, schedule, spec)
  jitted, _ = train_step.jit_train_step(fn, state, target_params, batch_shapes, mesh)
  name = "train" + ("" if args.train_loss == "cross_entropy" else f" ({args.train_loss}, with target)")
  return _compile(name, lambda: jitted.lower(state, target_params, batch), args.capacity)


@dataclasses.dataclass
class _DecodeSetup:
  """What the decode program is compiled over: the generate job's `Decoder` (over abstract,
  placed model states), its LoopSpec, inputs and cache shardings."""

  name: str
  decoder: Any
  spec: Any
  mode: Any
  target_cfg: LlamaConfig
  drafter_cfg: LlamaConfig | None
  cache_sharding: tuple
  inputs: Any

  target_graph = property(lambda self: self.decoder.target_graph)
  target_params = property(lambda self: self.decoder.target_state)
  drafter_graph = property(lambda self: self.decoder.drafter_graph)
  drafter_params = property(lambda self: self.decoder.drafter_state)


def _decode_setup(args, mesh, method: str, target_cfg: LlamaConfig, drafter_cfg: LlamaConfig) -> _DecodeSetup:
  """The Decoder the generate job builds, over abstract models placed as the job places them
  (target by the rules table, drafter replicated or sharded), for one call of `batch` prompts
  of `prompt_len` tokens: its `lower` is exactly the program such a call runs."""

  mode = SamplingMode(greedy=True) if args.sampling == "greedy" else SamplingMode(False, True, True)
  target_cfg = target_cfg.replace(dtype=args.dtype, param_dtype=args.dtype)
  drafter_cfg = drafter_cfg.replace(dtype=args.dtype, param_dtype=args.dtype) if method == "sps" else None
  # max_new_tokens as large as the cache: the buffer is then the cache (--max_len), as in aot's report.
  settings = DecodingSettings(
    method=method, gamma=args.gamma, batch_size=args.batch, max_cache_len=args.max_len, max_new_tokens=args.max_len
  )
  decoder = Decoder(
    abstract_model(target_cfg), abstract_model(drafter_cfg) if drafter_cfg else None, settings, mesh=mesh
  )
  for role in ("target", "drafter"):
    state = getattr(decoder, f"{role}_state")
    if state is None:
      continue
    placed = (
      shd.state_shardings(state, mesh)
      if role == "target" or args.drafter_sharding == "sharded"
      else jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    )
    setattr(decoder, f"{role}_state", _with_shardings(state, placed))
  spec = decoder.loop_spec(args.prompt_len, mode)
  name = f"decode {method}" + (f" (gamma {decoder.gamma})" if method != "ar" else "")
  cache_sharding = decoder.cache_shardings(spec)
  return _DecodeSetup(
    name,
    decoder,
    spec,
    mode,
    target_cfg,
    drafter_cfg,
    cache_sharding + (None,) * (2 - len(cache_sharding)),
    decoder.abstract_inputs(args.prompt_len, mode),
  )


def decode_program(args, mesh, method: str, target_cfg: LlamaConfig, drafter_cfg: LlamaConfig) -> ProgramReport:
  """The whole decoding loop (prefill and every round), compiled as the generate job's Decoder compiles it."""
  d = _decode_setup(args, mesh, method, target_cfg, drafter_cfg)
  return _compile(d.name, lambda: d.decoder.lower(args.prompt_len, d.mode), args.capacity)


# --- roofline ----------------------------------------------------------------------------

# Per-chip HBM bandwidth, GB/s (10^9 bytes/s), as Google Cloud's TPU system-architecture pages
# publish it (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 1200, v5e 819, v5p 2765,
# v6e 1640. A v4 / v5p device here is one megacore chip, so a device's bytes meet a chip's bandwidth.
HBM_GBPS = {"v4": 1200.0, "v5e": 819.0, "v5p": 2765.0, "v6e": 1640.0}


def _cost(compiled) -> tuple[dict | None, str]:
  """XLA's cost analysis as one dict (some jax versions return a list of one per program), or
  (None, why) when the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # noqa: BLE001  (some backends do not implement it)
    return None, f"XLA's cost analysis failed on this backend ({type(e).__name__}: {e})"
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None, "XLA's cost analysis returned nothing on this backend"
  return dict(cost), ""


def _bytes_accessed(compiled) -> tuple[float | None, str]:
  cost, why = _cost(compiled)
  if cost is None:
    return None, why
  if "bytes accessed" not in cost:
    keys = ", ".join(sorted(k for k in cost if not k.startswith(("bytes accessed", "utilization"))))[:200]
    return None, f"XLA's cost analysis has no 'bytes accessed' on this backend (it gives: {keys})"
  return float(cost["bytes accessed"]), ""


def _device_bytes(leaf) -> int:
  """Bytes of one device's shard of an abstract array (its sharding, or the whole array)."""
  shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
  size = 1
  for n in shape:
    size *= n
  return size * jnp.dtype(leaf.dtype).itemsize


def weight_bytes_read(params, config: LlamaConfig, rows: int, head_tokens: int | None = None) -> int:
  """Per-device bytes one forward must read of a model's weights: every kernel and norm once,
  the output layer over the tokens it scores (head_tokens of the vocabulary, a reduced-
  vocabulary drafter; None: all of it), and of the input embedding only the `rows` looked up
  (one row per token of the forward), unless it is tied to the output layer and read as it."""
  total = 0
  V = config.vocab_size
  head_fraction = 1.0 if head_tokens is None else min(head_tokens, V) / V
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = shd.path_str([getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path])
    nbytes = _device_bytes(leaf)
    if "embed_tokens" in name:
      shard_rows = (leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape)[0]
      looked_up = min(rows, shard_rows) * nbytes // shard_rows
      total += int(nbytes * head_fraction) + looked_up if config.tie_word_embeddings else looked_up
    elif "lm_head" in name:
      total += int(nbytes * head_fraction)
    else:
      total += nbytes
  return total


def cache_bytes_read(cache_abstract, cache_sharding) -> int:
  """Per-device bytes of a KV cache's keys and values (attention reads the whole buffer: the
  loop's caches are static-shape and masked, so this is the cache at the maximum length)."""
  leaves = list(cache_abstract.k_RSE) + list(cache_abstract.v_RES)
  shardings = (
    list(cache_sharding.k_RSE) + list(cache_sharding.v_RES) if cache_sharding is not None else [None] * len(leaves)
  )
  return sum(_device_bytes(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)) for a, sh in zip(leaves, shardings))


def _state_shardings(state, cache_sharding, mesh, batch: int):
  """The loop carry's placement: caches as the decode program constrains them, every per-row
  array split by batch like the inputs, scalars replicated."""

  def by_batch(a):
    return shd.batch_sharding(a.shape, mesh) if a.ndim and a.shape[0] == batch else NamedSharding(mesh, P())

  placed = jax.tree.map(by_batch, state)
  placed = placed.replace(target_cache=cache_sharding[0])
  if state.drafter_cache is not None:
    placed = placed.replace(drafter_cache=cache_sharding[1])
  return placed


_COPY_RE = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+(copy|copy-start|transpose)\("
)


def hlo_copies(hlo_text: str, min_bytes: int = 0) -> list[dict]:
  """Top-level copies and transposes in a compiled module's text (those inside fused
  computations move no memory of their own), largest first: what to look at when a round
  reads more than its weights and caches."""
  sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
  found, fused = [], False
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():  # a computation's header
      fused = "fused" in line.split("(")[0] or "wrapped" in line.split("(")[0]
      continue
    m = _COPY_RE.match(line)
    if m and not fused:
      dims = [int(n) for n in m.group(3).split(",") if n]
      n = sizes.get(m.group(2), 4)
      for d in dims:
        n *= d
      if n >= min_bytes:
        found.append({"name": m.group(1), "op": m.group(4), "shape": f"{m.group(2)}[{m.group(3)}]", "bytes": n})
  return sorted(found, key=lambda c: -c["bytes"])


def roofline(args, mesh, method: str, target_cfg: LlamaConfig, drafter_cfg: LlamaConfig) -> dict[str, Any]:
  """One round of the decoding loop compiled alone (state donated, as the loop's carry is
  updated in place), with the decode program's shardings: XLA's bytes accessed per device
  against the bytes its weights and KV caches need, and the tokens/s that implies per chip."""

  d = _decode_setup(args, mesh, method, target_cfg, drafter_cfg)
  spec, G = d.spec, d.spec.gamma

  def models(ts, ds):
    return (nnx.merge(d.target_graph, ts), None if d.drafter_graph is None else nnx.merge(d.drafter_graph, ds))

  def init(ts, ds, x):
    target, drafter = models(ts, ds)
    return engine._init_state(x, spec, target, drafter)

  state = jax.eval_shape(init, d.target_params, d.drafter_params, d.inputs)
  placed = _state_shardings(state, d.cache_sharding, mesh, args.batch)
  state = _with_shardings(state, placed)

  def one_round(ts, ds, s, x):
    target, drafter = models(ts, ds)
    if method == "ar":
      return engine._ar_round(s, x, spec, target)
    return engine._spec_round(s, x, spec, target, None if drafter is None else engine.DraftModel.of(drafter))

  out = {"program": f"round {d.name.removeprefix('decode ')}", "note": ""}
  start = time.perf_counter()
  compiled = (
    jax.jit(one_round, out_shardings=placed, donate_argnums=2)
    .lower(d.target_params, d.drafter_params, state, d.inputs)
    .compile()
  )
  out["compile_s"] = round(time.perf_counter() - start, 2)
  accessed_xla, why = _bytes_accessed(compiled)
  accessed = accessed_xla
  copies = hlo_copies(compiled.as_text(), min_bytes=1 << 16)
  out["hlo_copies"] = copies[:8]
  out["hlo_copy_bytes"] = sum(c["bytes"] for c in copies)

  # XLA counts a while loop's body once: the drafting loop runs γ-1 single-token steps after
  # the two-token chunk, so one draft step compiled alone is added γ-2 more times.
  step_bytes = None
  if accessed_xla is not None and method == "sps":

    def draft_step(ds, cache, prev_B, pos_B, x):
      drafter = engine.DraftModel.of(nnx.merge(d.drafter_graph, ds))
      logits_B1W, cache = drafter.forward(prev_B[:, None], cache, pos_B[:, None])
      keys_B = smp.row_keys(x.seed, x.row_ids_B, pos_B, smp.TAG_DRAFT)
      index_B, q_BW = smp.choose_tokens(logits_B1W[:, 0], keys_B, x.temperature_B, x.top_k_B, x.top_p_B, spec.mode)
      return drafter.tokens(index_B), drafter.full_probs(q_BW), cache

    row = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=shd.batch_sharding((args.batch,), mesh))
    step = (
      jax.jit(draft_step, donate_argnums=1).lower(d.drafter_params, state.drafter_cache, row, row, d.inputs).compile()
    )
    step_bytes, why = _bytes_accessed(step)
    accessed = None if step_bytes is None else accessed_xla + (G - 2) * step_bytes

  # What the round must read at least, per device: the target once over γ+1 tokens (one for
  # plain decoding), the drafter γ times (a two-token chunk, then γ-1 steps), each with its cache.
  verify_tokens = 1 if method == "ar" else G + 1
  need = {
    "target_weights": weight_bytes_read(d.target_params, d.target_cfg, rows=args.batch * verify_tokens),
    "target_cache": cache_bytes_read(state.target_cache, d.cache_sharding[0]),
  }
  if method == "sps":
    draft_vocab = getattr(args, "draft_vocab_size", None)
    one = lambda rows: weight_bytes_read(d.drafter_params, d.drafter_cfg, rows=rows, head_tokens=draft_vocab)
    need["drafter_weights"] = one(args.batch * 2) + (G - 1) * one(args.batch)
    need["drafter_cache"] = G * cache_bytes_read(state.drafter_cache, d.cache_sharding[1])
  needed = sum(need.values())
  if method == "ar":
    tau, tau_source = 1.0, "one token per round"
  elif args.tau:
    tau, tau_source = float(args.tau), "--tau"
  else:
    tau, tau_source = (
      float(G + 1),
      f"upper bound gamma+1 = {G + 1} (every draft accepted; pass --tau for a measured one)",
    )
  tokens = tau * args.batch
  out.update(
    {
      "bytes_accessed": accessed,
      "bytes_accessed_xla": accessed_xla,
      "draft_step_bytes": step_bytes,
      "bytes_needed": needed,
      "bytes_needed_parts": need,
      "bytes_ratio": None if accessed is None else accessed / needed,
      "tokens_per_round": tau,
      "tokens_per_round_source": tau_source,
      "batch": args.batch,
      "tokens_per_s": {
        chip: None if accessed is None else tokens * gbps * 1e9 / accessed for chip, gbps in HBM_GBPS.items()
      },
      "tokens_per_s_at_needed": {chip: tokens * gbps * 1e9 / needed for chip, gbps in HBM_GBPS.items()},
      "hbm_gbps": dict(HBM_GBPS),
    }
  )
  if accessed is None:
    out["note"] = why
  return out


# --- command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # reported like every other mistake (exit code 2, one line)
    raise SpecjaxError(f"{message} (--help lists the flags)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m specjax.aot",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--target", default="vicuna-7b", help="preset name or Hugging Face checkpoint directory")
  p.add_argument("--drafter", default="vicuna-68m", help="preset name or Hugging Face checkpoint directory")
  p.add_argument(
    "--topology", required=True, help="cpu:N, or a TPU type: v4-8, v4-16, v5e-8 (v5litepod-8), v5p-8, v6e-8, ..."
  )
  p.add_argument(
    "--mesh",
    default="1,-1,1",
    help="data,fsdp,tensor sizes; one -1 takes the rest (use --mesh=-1,1,1 when the first is -1)",
  )
  p.add_argument(
    "--dtype",
    default="bfloat16",
    help="weights and compute of decoding; the drafter's compute dtype in training (its weights stay float32)",
  )
  p.add_argument(
    "--what", default="train,decode", help="programs: train, decode, roofline (see --roofline), comma-separated"
  )
  p.add_argument("--json", default=None, help="also write the report to this file")
  g = p.add_argument_group("decoding (the generate job)")
  g.add_argument("--methods", default="sps,ar", help="decoding loops to compile: sps, ar, pld")
  g.add_argument("--batch", type=int, default=1, help="prompts per call (the generate job's batch_size)")
  g.add_argument(
    "--max_len",
    type=int,
    default=0,
    help="cache positions (prompt + new tokens); default: the target's max_position_embeddings",
  )
  g.add_argument(
    "--prompt_len",
    type=int,
    default=0,
    help="prompt bucket; default: the longest the cache admits (the most prefill memory)",
  )
  g.add_argument("--gamma", type=int, default=5, help="drafts per round")
  g.add_argument(
    "--sampling",
    default="sample",
    choices=("sample", "greedy"),
    help="sample: temperature with top-k and top-p (the larger program); greedy: argmax",
  )
  g.add_argument("--drafter_sharding", default="replicated", choices=("replicated", "sharded"))
  g.add_argument(
    "--roofline",
    action="store_true",
    help="also compile one round of each method's loop alone and compare XLA's bytes accessed per "
    "device with what its weights and KV caches need (bytes_ratio), with the tokens/s that "
    "implies at v4, v5e, v5p and v6e HBM bandwidth (--what roofline: only this)",
  )
  g.add_argument(
    "--tau",
    type=float,
    default=0.0,
    help="expected tokens per speculative round for --roofline's tokens/s (default: gamma+1, the upper bound)",
  )
  g = p.add_argument_group("training (the trainer's step)")
  g.add_argument("--train_batch", type=int, default=128, help="global rows per step")
  g.add_argument("--seq_len", type=int, default=2048, help="packed row length")
  g.add_argument("--grad_accumulation", type=int, default=1, help="micro-batches per step")
  g.add_argument(
    "--train_loss",
    default="cross_entropy",
    help="cross_entropy, or forward_kl / total_variation (the target runs in the step too)",
  )
  return p


def _parse_mesh(value: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(s) for s in value.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or any(s == 0 or s < -1 for s in shape):
    raise SpecjaxError(f"--mesh={value!r}: expected three sizes data,fsdp,tensor such as 1,-1,1 (one may be -1)")
  return shape


def _check_args(args) -> None:

  args.what = [w.strip() for w in args.what.split(",") if w.strip()]
  if getattr(args, "roofline", False) and "roofline" not in args.what:
    args.what.append("roofline")
  if not args.what or set(args.what) - {"train", "decode", "roofline"}:
    raise SpecjaxError(f"--what={','.join(args.what)!r}: expected some of train, decode, roofline")
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not args.methods or set(args.methods) - set(METHODS):
    raise SpecjaxError(f"--methods={','.join(args.methods)!r}: expected some of {', '.join(METHODS)}")
  if args.dtype not in DTYPES:
    raise SpecjaxError(f"--dtype={args.dtype!r}: expected one of {', '.join(DTYPES)}")
  if args.train_loss not in LOSSES:
    raise SpecjaxError(f"--train_loss={args.train_loss!r}: expected one of {', '.join(LOSSES)}")
  for flag in ("batch", "gamma", "train_batch", "seq_len", "grad_accumulation"):
    if getattr(args, flag) < 1:
      raise SpecjaxError(f"--{flag}={getattr(args, flag)}: must be >= 1")
  if args.train_batch % args.grad_accumulation:
    raise SpecjaxError(
      f"--train_batch={args.train_batch}: not divisible by --grad_accumulation={args.grad_accumulation}"
    )
  if args.tau and not 1 <= args.tau <= args.gamma + 1:
    raise SpecjaxError(f"--tau={args.tau}: expected tokens per round in [1, gamma+1 = {args.gamma + 1}]")
  for flag in ("max_len", "prompt_len"):
    if getattr(args, flag) < 0:
      raise SpecjaxError(f"--{flag}={getattr(args, flag)}: must be >= 0 (0 = the default)")


def check(args) -> dict[str, Any]:
  """Compiles the chosen programs; returns the report (also what --json writes)."""
  _check_args(args)
  target_cfg = resolve_model("--target", args.target)
  drafter_cfg = resolve_model("--drafter", args.drafter)
  notes = []
  if drafter_cfg.vocab_size != target_cfg.vocab_size:
    if args.drafter.removeprefix("preset:") not in PRESETS:
      raise SpecjaxError(
        f"--drafter={args.drafter!r}: its vocabulary ({drafter_cfg.vocab_size} tokens) differs "
        f"from the target's ({target_cfg.vocab_size}); a drafter must share the target's tokenizer"
      )
    drafter_cfg = drafter_cfg.replace(vocab_size=target_cfg.vocab_size)  # as the trainer builds a preset drafter
    notes.append(f"drafter preset built with the target's vocabulary ({target_cfg.vocab_size} tokens)")
  args.max_len = args.max_len or target_cfg.max_position_embeddings  # a shorter drafter caps drafting only
  longest = args.max_len - args.gamma - 2
  args.prompt_len = args.prompt_len or longest
  if {"decode", "roofline"} & set(args.what) and not 1 <= args.prompt_len <= longest:
    raise SpecjaxError(
      f"--prompt_len={args.prompt_len}: must be in [1, {longest}] (--max_len={args.max_len} "
      f"positions, {args.gamma + 2} kept for drafting)"
    )

  topo = parse_topology(args.topology)
  shape = _parse_mesh(args.mesh)
  devices = topology_devices(topo)
  try:
    mesh = shd.make_mesh(shape, devices)
  except SpecjaxError as e:
    raise SpecjaxError(f"--mesh={args.mesh}: {e} (--topology={topo.name} has {len(devices)} devices)") from None
  args.capacity = topo.capacity_bytes

  programs = []
  if "train" in args.what:
    programs.append(train_program(args, mesh, target_cfg, drafter_cfg))
  if "decode" in args.what:
    for method in args.methods:
      programs.append(decode_program(args, mesh, method, target_cfg, drafter_cfg))
  rooflines = {}
  if "roofline" in args.what:
    for method in args.methods:
      rooflines[method] = roofline(args, mesh, method, target_cfg, drafter_cfg)
  report = {
    "topology": {
      "name": topo.name,
      "platform": topo.platform,
      "devices": len(devices),
      "device_kind": getattr(devices[0], "device_kind", None),
      "topology_name": topo.topology_name,
      "capacity_bytes_per_device": topo.capacity_bytes,
    },
    "mesh": dict(zip(shd.MESH_AXES, (int(n) for n in mesh.devices.shape))),
    "target": {"model": args.target, "params": target_cfg.num_params},
    "drafter": {"model": args.drafter, "params": drafter_cfg.num_params},
    "settings": {
      k: getattr(args, k)
      for k in (
        "what",
        "methods",
        "dtype",
        "batch",
        "max_len",
        "prompt_len",
        "gamma",
        "sampling",
        "drafter_sharding",
        "train_batch",
        "seq_len",
        "grad_accumulation",
        "train_loss",
        "tau",
      )
    },
    "notes": notes,
    "programs": [dataclasses.asdict(p) | {"verdict": p.verdict} for p in programs],
  }
  if rooflines:
    report["roofline"] = rooflines
  return report


def _size(n: int | None) -> str:
  if n is None:
    return "-"
  for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def _count(n: int) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return str(n)


def format_report(report: dict[str, Any]) -> str:
  t, s = report["topology"], report["settings"]
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
  capacity = _size(t["capacity_bytes_per_device"]) if t["capacity_bytes_per_device"] else "unknown"
  lines = [
    (
      f"target {report['target']['model']} ({_count(report['target']['params'])} parameters), "
      f"drafter {report['drafter']['model']} ({_count(report['drafter']['params'])}), {s['dtype']}"
    ),
    f"topology {t['name']}: {t['devices']} x {t['device_kind']}, {capacity} per device; mesh {mesh}",
  ]
  if "train" in s["what"]:
    lines.append(
      f"train: batch {s['train_batch']} x {s['seq_len']} tokens, accumulation {s['grad_accumulation']}, "
      f"loss {s['train_loss']}, drafter weights float32"
    )
  if {"decode", "roofline"} & set(s["what"]):
    lines.append(
      f"decode: batch {s['batch']}, prompt {s['prompt_len']}, cache {s['max_len']}, {s['sampling']}, "
      f"drafter {s['drafter_sharding']}"
    )
  lines += [f"note: {n}" for n in report["notes"]]
  if not report["programs"]:
    return "\n".join(lines + ["", format_roofline(report["roofline"])] if report.get("roofline") else lines)
  lines.append("")
  head = (
    "program",
    "arguments",
    "outputs",
    "temp",
    "code",
    "aliased",
    "total",
    "headroom",
    "verdict",
    "compile",
    "GFLOP",
  )
  rows = [head]
  for p in report["programs"]:
    rows.append(
      (
        p["program"],
        _size(p["argument_bytes"]),
        _size(p["output_bytes"]),
        _size(p["temp_bytes"]),
        _size(p["generated_code_bytes"]),
        _size(p["alias_bytes"]),
        _size(p["total_bytes"]),
        _size(p["headroom_bytes"]),
        p["verdict"],
        f"{p['compile_s']:.1f} s",
        "-" if p["flops"] is None else f"{p['flops'] / 1e9:,.1f}",
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  for r in rows:
    lines.append("  ".join(c.ljust(w) if i == 0 or i == 8 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
  lines += [f"{p['program']}: {p['note']}" for p in report["programs"] if p["note"]]
  if report["programs"]:
    lines.append(
      "per device: XLA's buffer assignment; total = arguments + outputs + temp - aliased (donated); "
      "GFLOP: XLA's estimate, which may count a loop's body once"
    )
  if report.get("roofline"):
    lines += ["", format_roofline(report["roofline"])]
  return "\n".join(lines)


def format_roofline(rooflines: dict[str, Any]) -> str:
  """The --roofline table: bytes per device and round, their ratio, and tokens/s per chip."""
  chips = list(HBM_GBPS)
  head = ("round", "accessed", "needed", "bytes_ratio", "tokens/round") + tuple(f"{c} tok/s" for c in chips)
  rows = [head]
  for r in rooflines.values():
    ratio = "-" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:.3f}"
    rows.append(
      (
        r["program"],
        _size(None if r["bytes_accessed"] is None else int(r["bytes_accessed"])),
        _size(r["bytes_needed"]),
        ratio,
        f"{r['tokens_per_round']:g}",
      )
      + tuple("-" if r["tokens_per_s"][c] is None else f"{r['tokens_per_s'][c]:,.1f}" for c in chips)
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
  for r in rooflines.values():
    parts = ", ".join(f"{k} {_size(v)}" for k, v in r["bytes_needed_parts"].items())
    lines.append(f"{r['program']}: needed = {parts}; tokens/round: {r['tokens_per_round_source']}")
    if r["hlo_copies"]:
      top = ", ".join(f"{c['op']} {c['shape']} ({_size(c['bytes'])})" for c in r["hlo_copies"][:3])
      lines.append(f"{r['program']}: copies in the compiled round: {_size(r['hlo_copy_bytes'])} in all; largest: {top}")
    if r["note"]:
      lines.append(f"{r['program']}: {r['note']}")
  lines.append(
    "roofline: one round compiled alone (state donated), per device; accessed = XLA's 'bytes accessed' "
    "(a draft step compiled alone added for the drafting loop's body, which XLA counts once); needed = "
    "weights (output layer in full, the looked-up embedding rows) and whole KV caches, read once per "
    "forward; tok/s = tokens/round x batch x HBM GB/s / accessed"
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the check; returns the exit status (0 fits, 1 does not fit, 2 a mistake in the flags)."""
  try:
    args = _parser().parse_args(argv)
    report = check(args)
    if args.json:
      try:
        with open(args.json, "w", encoding="utf-8") as f:
          json.dump(report, f, indent=2)
      except OSError as e:
        raise SpecjaxError(f"--json={args.json}: cannot write ({e.strerror})") from None
  except SpecjaxError as e:
    print(f"specjax: error: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  return 1 if any(p["fits"] is False for p in report["programs"]) else 0


if __name__ == "__main__":
  sys.exit(main())
