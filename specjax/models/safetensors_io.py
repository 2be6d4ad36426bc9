"""safetensors files read through a memory map and written from numpy, bfloat16 included.

The safetensors package's numpy backend has no bfloat16; the format is simple (an 8-byte
header length, a JSON header, raw little-endian data), so we map it with numpy + ml_dtypes.
Mapping means a tensor's bytes are read only when (and where) a device asks for its shard.
"""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from specjax.errors import SpecjaxError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset where tensor data starts)."""
  try:
    with open(path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) != 8:
        raise SpecjaxError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
      (n,) = struct.unpack("<Q", raw_len)
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise SpecjaxError(f"{path}: weight file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
    raise SpecjaxError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
  header.pop("__metadata__", None)
  return header, 8 + n


def open_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a file as a read-only memory-mapped array (no bytes read yet)."""
  header, start = read_header(path)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise SpecjaxError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which specjax does not read")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dtype = _DTYPES[info["dtype"]]
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise SpecjaxError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
    out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
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
