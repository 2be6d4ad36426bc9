"""safetensors files read through a memory map and written from numpy, bfloat16 included.

The safetensors package's numpy backend has no bfloat16; the format is simple (an 8-byte
header length, a JSON header, raw little-endian data), so we map it with numpy + ml_dtypes.
Mapping means a tensor's bytes are read only when (and where) a device asks for its shard.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from specjax.errors import SpecjaxError

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # what a model weight may be stored as


def read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset where tensor data starts), checked against the
  file: every entry well-formed, and the file as long as its header's data offsets say (a file
  cut short, by an interrupted download or a full disk, is named as truncated here, before any
  memory map would fail with "mmap length is greater than file size")."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) != 8:
        raise SpecjaxError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
      (n,) = struct.unpack("<Q", raw_len)
      if 8 + n > size:
        raise SpecjaxError(
          f"{path}: truncated: its header says {n} header bytes, the file has {size} bytes in all "
          "(an interrupted download or copy?); fetch the file again"
        )
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise SpecjaxError(f"{path}: weight file not found") from None
  except IsADirectoryError:
    raise SpecjaxError(f"{path}: is a directory, not a safetensors file") from None
  except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
    raise SpecjaxError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
  if not isinstance(header, dict):
    raise SpecjaxError(f"{path}: not a safetensors file (its header is not a JSON object)")
  header.pop("__metadata__", None)
  end = 0
  for name, info in header.items():
    _check_entry(path, name, info)
    end = max(end, info["data_offsets"][1])
  if 8 + n + end > size:
    raise SpecjaxError(
      f"{path}: truncated: its header's tensors end at byte {8 + n + end}, the file has {size} "
      f"bytes (an interrupted download or copy?); fetch the file again"
    )
  return header, 8 + n


def _check_entry(path: str, name: str, info) -> None:
  """One header entry: {"dtype": ..., "shape": [...], "data_offsets": [begin, end]}, consistent."""

  def bad(why):
    return SpecjaxError(f"{path}: tensor {name!r}: malformed header entry ({why})")

  if not isinstance(info, dict):
    raise bad("not an object")
  dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  if not isinstance(dtype, str):
    raise bad(f"dtype {dtype!r}")
  if dtype not in _DTYPES:
    raise SpecjaxError(f"{path}: tensor {name!r} has dtype {dtype}, which specjax does not read")
  ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
  if not ints(shape):
    raise bad(f"shape {shape!r}")
  if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
    raise bad(f"data_offsets {offsets!r}")
  nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise SpecjaxError(
      f"{path}: tensor {name!r} has {offsets[1] - offsets[0]} bytes for shape {list(shape)} "
      f"of {dtype} ({nbytes} expected)"
    )


def open_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a file as a read-only memory-mapped array (no bytes read yet)."""
  header, start = read_header(path)
  out = {}
  for name, info in header.items():
    begin, _ = info["data_offsets"]
    out[name] = np.memmap(
      path, dtype=_DTYPES[info["dtype"]], mode="r", offset=start + begin, shape=tuple(info["shape"])
    )
  return out


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
  header, offset = {}, 0
  for name, array in tensors.items():
    if array.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be written to safetensors")
    nbytes = array.size * array.dtype.itemsize
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())
