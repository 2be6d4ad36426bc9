"""Decoding's few-row products and cache attention on XLA:CPU: specjax's own kernels, through `jax.ffi`.

Decoding multiplies a handful of rows (one for a plain step, γ+1 for a verification, times
the batch) by every weight matrix. XLA:CPU (jax 0.10) sends one row to Eigen's matrix-vector
path and more to a GEMM: on the real 135M target that reads the weights at 20 GB/s for one row
and 14 GB/s for four, so verifying 4 tokens cost 1.5 plain steps. The kernels in
`kernels/cpu_kernels.cc` stream each matrix once per 8 rows, contiguously and prefetched ahead,
into register accumulators for all of them (AVX-512), so a 4-row product costs about 1.15
one-row products and a one-row product reads faster than XLA's. They sum each output element
in an order that depends only on the weight's shape, never on the number of rows, so a
verification's logits are bit for bit a plain step's. Attention over the KV cache goes through
a kernel too: XLA runs each of its two small dots per layer for ~60 µs of overhead (3.7 ms of
a 28 ms step of the real target); the kernel reads only the slots a query sees, computes each
query row alone, and takes a few µs.

They apply only where they win: XLA:CPU, one device (no mesh: a custom call is not
partitioned), float32, at most `MAX_ROWS` rows for the products (`MAX_ROWS_TIED` for a tied
output layer). The decoding engine turns them on while it traces its loop (`enabled(True)`);
training never uses them. TPUs and GPUs
multiply a few rows as fast as one, so they keep XLA's dot. The source is compiled once per
machine with the system's C++ compiler (`$CXX`, else g++) into `$SPECJAX_KERNEL_CACHE` (default
~/.cache/specjax/kernels); without a compiler or AVX-512, `available()` is False,
`unavailable_reason()` says why, and XLA's dot is used: same results to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

# Rows up to which a kernel beats XLA:CPU's GEMM (measured on the 135M target's shapes, 2 cores).
# The products take rows in blocks of 8, each block one more pass over the weights: over the
# target's 210 layer products 16 rows took 33 ms against XLA's 53, 32 rows 53 against 67, 48
# rows 74 against 83, 64 rows 91 against 77. The tied output layer sums along its rows (16
# products per 16-float vector), which is compute-bound past 8 rows: 38 ms against 32 at 16.
MAX_ROWS = 48  # `dense`, a [in, out] kernel
MAX_ROWS_TIED = 8  # `attend`, a [vocab, hidden] embedding
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "cpu_kernels.cc")
_TARGETS = ("specjax_rows_matmul", "specjax_rows_matmul_t", "specjax_attend")
_state = threading.local()
_reason: list[str] = []


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return ""


def _cache_dir() -> str:
  return os.environ.get("SPECJAX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specjax", "kernels")


def _build() -> str:
  """Path of the compiled library for this machine, compiling it if needed (atomic rename, so
  concurrent processes may race safely). Raises RuntimeError with the reason when it cannot."""
  if platform.machine() not in ("x86_64", "AMD64") or "avx512f" not in _cpu_flags():
    raise RuntimeError("this CPU has no AVX-512")
  cxx = os.environ.get("CXX") or "g++"
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(source + jax.__version__.encode() + cxx.encode() + _cpu_flags().encode()).hexdigest()[:16]
  out = os.path.join(_cache_dir(), f"cpu_kernels-{key}.so")
  if os.path.exists(out):
    return out
  os.makedirs(_cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
  os.close(fd)
  cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(), SOURCE]
  try:
    done = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
      first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
      raise RuntimeError(f"compiling {SOURCE} failed: {first}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered with XLA:CPU (compiles them on first call)."""
  if os.environ.get("SPECJAX_CPU_KERNELS", "1") == "0":
    _reason.append("SPECJAX_CPU_KERNELS=0")
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(_build())
    for name in _TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  except (RuntimeError, OSError, subprocess.SubprocessError) as e:
    _reason.append(str(e))
    return False
  return True


def unavailable_reason() -> str | None:
  return _reason[-1] if _reason else None


@contextlib.contextmanager
def enabled(on: bool = True):
  """Within this block (while tracing), `dense` and `attend` use the kernels where they apply."""
  before = getattr(_state, "on", False)
  _state.on = bool(on) and available()
  try:
    yield
  finally:
    _state.on = before


def applies(x_ZI, w, max_rows: int = MAX_ROWS) -> bool:
  """Whether `dense` (or, with max_rows=MAX_ROWS_TIED, `attend`) of these operands runs the
  kernel: inside `enabled`, float32, at most max_rows rows (all leading dimensions together)."""
  rows = 1
  for n in x_ZI.shape[:-1]:
    rows *= n
  return getattr(_state, "on", False) and rows <= max_rows and x_ZI.dtype == w.dtype == jnp.float32


def dense(x_ZI, w_IJ):
  """x @ w for a [in, out] kernel (callers check `applies` first)."""
  lead, i = x_ZI.shape[:-1], x_ZI.shape[-1]
  x_UI = x_ZI.reshape(-1, i)
  out = jax.ffi.ffi_call(_TARGETS[0], jax.ShapeDtypeStruct((x_UI.shape[0], w_IJ.shape[1]), jnp.float32))
  return out(x_UI, w_IJ).reshape(*lead, w_IJ.shape[1])


def attend(x_ZD, w_VD):
  """x @ w.T for a [vocab, hidden] embedding, a tied output layer (callers check `applies`)."""
  lead, d = x_ZD.shape[:-1], x_ZD.shape[-1]
  x_UD = x_ZD.reshape(-1, d)
  out = jax.ffi.ffi_call(_TARGETS[1], jax.ShapeDtypeStruct((x_UD.shape[0], w_VD.shape[0]), jnp.float32))
  return out(x_UD, w_VD).reshape(*lead, w_VD.shape[0])


def applies_to_attention(q_RME, k_RSE, v_RES) -> bool:
  """Whether `attend_cache` runs the kernel: inside `enabled`, everything float32."""
  return getattr(_state, "on", False) and q_RME.dtype == k_RSE.dtype == v_RES.dtype == jnp.float32


def attend_cache(q_RME, k_RSE, v_RES, visible_RM, divisor: float):
  """softmax(q · k[:visible] / divisor) @ v[:visible] per query row: keys [R, S, E], values
  [R, E, S], visible_RM int32 (a query at position p sees slots 0..p, visible = p + 1)."""
  out = jax.ffi.ffi_call(_TARGETS[2], jax.ShapeDtypeStruct(q_RME.shape, jnp.float32))
  return out(q_RME, k_RSE, v_RES, visible_RM.astype(jnp.int32), divisor=np.float32(divisor))
