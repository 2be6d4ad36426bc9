"""Files on local disk or behind a URL (gs://, s3://, ram://, ...), one interface for both.

Local paths go to the builtin/os functions and never import TensorFlow (model and decoding
code stays importable without it); a path with a URL scheme goes to `tf.io.gfile`, imported on
first use. Text modes are UTF-8 on both. Missing files raise FileNotFoundError on both, so
callers catch one exception. `ram://` is TensorFlow's in-memory filesystem (tests use it for
gs://): object stores have no atomic rename (`replace` copies, then deletes there) and append
rewrites the object, so append-only logs should stay small.
"""

from __future__ import annotations

import builtins
import contextlib
import glob as _glob
import os
import posixpath
import re
import shutil

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_gfile_class = None


def is_remote(path) -> bool:
  """True for a path with a URL scheme (gs://bucket/x), which goes through tf.io.gfile."""
  return bool(_URL.match(os.fspath(path)))


def _gfile():
  import tensorflow as tf  # only for URLs: local paths never pay for (or need) TensorFlow

  return tf.io.gfile


@contextlib.contextmanager
def _tf_errors(path):
  """tf.errors.* as the builtin exceptions the local functions raise."""
  import tensorflow as tf

  try:
    yield
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(f"{path}: {e.message}") from None
  except tf.errors.AlreadyExistsError as e:
    raise FileExistsError(f"{path}: {e.message}") from None
  except tf.errors.PermissionDeniedError as e:
    raise PermissionError(f"{path}: {e.message}") from None
  except tf.errors.OpError as e:
    raise OSError(f"{path}: {e.message}") from None


def _GFile():
  global _gfile_class
  if _gfile_class is None:

    class GFile(_gfile().GFile):
      def writelines(self, lines):
        for line in lines:
          self.write(line)

    _gfile_class = GFile
  return _gfile_class


def _truncate_ram(path: str) -> None:
  """TensorFlow's ram:// appends to an existing file where it should replace it (in "w" mode and
  copy(overwrite=True)); deleting it first gives the semantics of every other filesystem."""
  if path.startswith("ram://") and _gfile().exists(path) and not _gfile().isdir(path):
    _gfile().remove(path)


def open(path, mode: str = "r", encoding: str | None = None):  # mirrors builtins.open
  """A file object; text modes read and write UTF-8 (`encoding` may only say so for URLs)."""
  path = os.fspath(path)
  text = "b" not in mode
  if not is_remote(path):
    return builtins.open(path, mode, encoding=(encoding or "utf-8") if text else encoding)
  if encoding is not None and text and encoding.lower().replace("-", "").replace("_", "") != "utf8":
    raise ValueError(f"{path}: files behind a URL are read and written as UTF-8, not {encoding}")
  if mode.replace("b", "").replace("t", "") not in ("r", "w", "a"):
    raise ValueError(f"{path}: mode {mode!r} is not supported for files behind a URL (use r, w or a)")
  with _tf_errors(path):
    if "r" in mode and not _gfile().exists(path):  # gfile would fail only at the first read
      raise FileNotFoundError(f"{path}: no such file")
    if "w" in mode:
      _truncate_ram(path)
    return _GFile()(path, mode.replace("t", ""))


def exists(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  with _tf_errors(path):
    return _gfile().exists(path)


def isdir(path) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  with _tf_errors(path):
    return _gfile().isdir(path)


def makedirs(path, exist_ok: bool = True) -> None:
  """Creates a directory and its parents (object stores: a no-op or a marker object)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=exist_ok)
    return
  with _tf_errors(path):
    if not exist_ok and _gfile().exists(path):
      raise FileExistsError(f"{path}: already exists")
    _gfile().makedirs(path)


def replace(src, dst) -> None:
  """Moves src over dst: atomic locally (os.replace); on object stores a copy then a delete."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  with _tf_errors(src):
    if is_remote(src) and is_remote(dst) and src.split("://", 1)[0] == dst.split("://", 1)[0]:
      _gfile().rename(src, dst, overwrite=True)
    else:  # across filesystems: no rename there
      _truncate_ram(dst)
      _gfile().copy(src, dst, overwrite=True)
      _gfile().remove(src)


def copy(src, dst) -> None:
  """Copies a file (overwriting dst); either side may be local or a URL."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src) and not is_remote(dst):
    shutil.copy(src, dst)
    return
  with _tf_errors(src):
    _truncate_ram(dst)
    _gfile().copy(src, dst, overwrite=True)


def remove(path) -> None:
  path = os.fspath(path)
  if not is_remote(path):
    os.remove(path)
    return
  with _tf_errors(path):
    _gfile().remove(path)


def glob(pattern) -> list[str]:
  """Paths matching a glob pattern (* ? [..]); none (not an error) when the directory is missing."""
  pattern = os.fspath(pattern)
  if not is_remote(pattern):
    return _glob.glob(pattern)
  import tensorflow as tf

  try:
    return list(_gfile().glob(pattern))
  except tf.errors.NotFoundError:
    return []


def join(path, *paths) -> str:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.join(path, *paths)
  return posixpath.join(path, *map(os.fspath, paths))
