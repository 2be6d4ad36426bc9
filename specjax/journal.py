"""A journal of finished work units, so a killed job resumes after the last one it finished.

The generate and eval_specbench jobs write their answers as they go: each finished unit (a
batch of prompts; one (run, category, temperature, seed) of the evaluation) goes to the job's
output files at once, and then, as one JSON line, to WORKDIR/answers.progress.jsonl, which makes
it done. Line 1 is a header: the settings a resume must share (`config`) and what else the job
pins (the question ids). A rerun of the same command opens the journal, which

- reads what an earlier run finished, dropping a half-written last line (a kill during a write),
- refuses a header of other settings, naming each one that changed (never mixes runs),
- rewrites the journal and the job's output files from the finished units (to PATH.tmp, then
  renamed), so an unwritable workdir fails here, before any model loads or anything decodes.

Values in a unit may hold dataclasses and numpy arrays (a DecodeResult): `to_json` writes them
exactly and `from_json` rebuilds them. Paths may be local or URLs (specjax.fileio).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Callable, Iterable

import numpy as np

from specjax import console, fileio
from specjax.errors import SpecjaxError

NAME = "answers.progress.jsonl"


def to_json(x):
  """Dataclasses of numpy arrays and numbers, lists and dicts of them, as JSON-able data, exactly."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {
      "__dataclass__": f"{type(x).__module__}:{type(x).__qualname__}",
      **{f.name: to_json(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init},
    }
  if isinstance(x, (np.ndarray, np.generic)) or type(x).__module__.startswith("jax"):
    a = np.asarray(x)
    return {"__array__": a.tolist(), "dtype": str(a.dtype), "shape": list(a.shape)}
  if isinstance(x, (list, tuple)):
    return [to_json(v) for v in x]
  if isinstance(x, dict):
    return {k: to_json(v) for k, v in x.items()}
  return x


def from_json(x):
  if isinstance(x, dict) and "__dataclass__" in x:
    module, name = x["__dataclass__"].split(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: from_json(v) for k, v in x.items() if k != "__dataclass__"})
  if isinstance(x, dict) and "__array__" in x:
    return np.asarray(x["__array__"], dtype=x["dtype"]).reshape(x["shape"])
  if isinstance(x, list):
    return [from_json(v) for v in x]
  if isinstance(x, dict):
    return {k: from_json(v) for k, v in x.items()}
  return x


def rewrite(path: str, records: Iterable[dict]) -> None:
  """One JSON line per record, to PATH.tmp and then renamed: readers see the old file or the new."""
  tmp = path + ".tmp"
  with fileio.open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  fileio.replace(tmp, path)


def append(path: str, records: Iterable[dict]) -> None:
  """JSON lines appended and flushed to disk (fsync) before this returns."""
  with fileio.open(path, "a", encoding="utf-8") as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    if not fileio.is_remote(path):
      os.fsync(f.fileno())


def _reason(e: OSError) -> str:
  return e.strerror or str(e)


class Journal:
  """WORKDIR/answers.progress.jsonl of one job: `units` holds the finished ones, in order.

  header: {"config": the settings a resume must share, other key: value it must share too};
  explain: other key -> what a change of it means ("answered other questions (the prompt files
  changed)"). kind: the units' "kind" tag. required: the keys a unit line must have.
  outputs(units) -> {path: records}: the job's output files as the finished units make them,
  rewritten when the journal opens. what: what the job writes, for messages ("answers")."""

  def __init__(
    self,
    workdir: str,
    header: dict,
    *,
    job: str,
    kind: str,
    required: tuple[str, ...] = (),
    explain: dict[str, str] | None = None,
    outputs: Callable[[list[dict]], dict] | None = None,
    writer: bool = True,
    what: str = "answers",
  ):
    self.workdir, self.writer, self.job, self.what = workdir, writer, job, what
    self.kind, self.required = kind, required
    self.path = fileio.join(workdir, NAME)
    self.header = {"kind": "header", **header}
    self.units: list[dict] = []
    lines = self._read()
    if lines:
      self._check_header(lines[0], header, explain or {})
      self.units = [from_json({k: v for k, v in line.items() if k != "kind"}) for line in lines[1:]]
    if writer:
      try:
        fileio.makedirs(workdir, exist_ok=True)
        rewrite(self.path, [self.header] + [self._line(u) for u in self.units])
        for path, records in (outputs(self.units) if outputs else {}).items():
          fileio.makedirs(os.path.dirname(path) or ".", exist_ok=True)
          rewrite(path, records)
      except OSError as e:
        raise SpecjaxError(
          f"{workdir}: cannot write the {what} there ({_reason(e)}); give a workdir you can write"
        ) from None

  def check_processes_agree(self, units: str = "units") -> None:
    """Every process must resume the same finished `units`, or the collectives would hang."""
    import jax

    if jax.process_count() <= 1:
      return
    from jax.experimental import multihost_utils

    try:
      multihost_utils.assert_equal(np.int64(len(self.units)), f"finished {units}")
    except AssertionError:
      raise SpecjaxError(
        f"{self.path}: the processes see different finished {units}; the workdir must be one "
        "directory that every process reads (e.g. gs://...)"
      ) from None

  def _read(self) -> list[dict]:
    if not fileio.exists(self.path):
      return []
    try:
      with fileio.open(self.path, "r", encoding="utf-8") as f:
        raw = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise SpecjaxError(
        f"{self.path}: cannot read the journal of an earlier run ({e}); remove it to start over"
      ) from None
    lines = []
    for k, text in enumerate(raw, 1):
      if not text.strip():
        continue
      try:
        line = json.loads(text)
        if not isinstance(line, dict) or line.get("kind") != ("header" if not lines else self.kind):
          raise ValueError("unexpected record")
        if lines:
          from_json(line)
          missing = [key for key in self.required if key not in line]
          if missing:
            raise KeyError(", ".join(missing))
      except (ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        if k == len(raw):  # no newline after it: the write was cut
          console.warning("%s: %s: dropping a half-written last line (an interrupted write)", self.job, self.path)
          break
        raise SpecjaxError(f"{self.path}:{k}: not a line this job wrote ({e}); remove the file to start over") from None
      lines.append(line)
    return lines

  def _check_header(self, before: dict, now: dict, explain: dict[str, str]) -> None:
    old, new = before.get("config", {}), now.get("config", {})
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      raise SpecjaxError(
        f"{self.path}: an earlier run in this workdir used other values of "
        + ", ".join(f"{k} ({old.get(k)!r}, now {new.get(k)!r})" for k in changed)
        + "; use a new workdir, the earlier values to resume it, or remove the file to start over"
      )
    for key in now:
      if key != "config" and before.get(key) != now[key]:
        raise SpecjaxError(
          f"{self.path}: an earlier run in this workdir "
          f"{explain.get(key, f'had another {key}')}; use a new workdir, or remove the file to "
          "start over"
        )

  def _line(self, unit: dict) -> dict:
    return {"kind": self.kind, **to_json(unit)}

  def append(self, unit: dict, outputs: dict[str, list[dict]] | None = None) -> None:
    """A finished unit: `outputs` ({path: records}) appended to the job's files, then the unit to
    the journal (which makes it done). A failed write is one SpecjaxError naming the path."""
    self.units.append(unit)
    if not self.writer:
      return
    path = self.path
    try:
      for path, records in (outputs or {}).items():
        append(path, records)
      path = self.path
      append(self.path, [self._line(unit)])
    except OSError as e:
      raise SpecjaxError(
        f"{path}: writing the {self.what} failed ({_reason(e)}); the finished work is in "
        f"{self.path}: free space or fix the workdir and rerun the same command to "
        "resume"
      ) from None
