"""Metric writers: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events.

Only process 0 writes. Names carry their kind: `train/...` (this interval's training numbers),
`eval/...` (teacher-forced loss and accuracy on held-out data) and `accept/...` (acceptance of
the real speculative loop against the target), so teacher-forced accuracy is never mistaken
for acceptance. A resumed run first drops lines past its checkpoint, so the file holds each
step once.
"""

from __future__ import annotations

import json
import math
import os

import jax

from specjax import fileio
from specjax.errors import SpecjaxError


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
  """Flattens nested numbers to 'a/b' keys (lists index as a/0, a/1, ...); skips None."""
  out = {}
  items = record.items() if isinstance(record, dict) else enumerate(record)
  for k, v in items:
    key = f"{prefix}{k}"
    if isinstance(v, (dict, list, tuple)):
      out.update(_scalars(v, key + "/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[key] = float(v)
  return out


def _json_number(x):
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # JSON has no NaN/Infinity; "nan" keeps the line parseable by any reader
  return x


def _count_lines(path: str) -> int:
  with fileio.open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


class MetricWriter:
  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = fileio.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    fileio.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    if tensorboard:
      from flax.metrics import tensorboard as flax_tb  # TensorFlow's event writer

      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    """Keeps lines up to `step` (those the resumed checkpoint already covers)."""
    if not fileio.exists(self.path):
      return
    kept = []
    with fileio.open(self.path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          if n == _count_lines(self.path):
            break  # a half-written last line from a killed run
          raise SpecjaxError(f"{self.path}:{n}: not a JSON line") from None
        if record.get("step", 0) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with fileio.open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    fileio.replace(tmp, self.path)

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    line = {"step": int(step), **{k: _json_number(v) for k, v in record.items()}}
    with fileio.open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
    if self._tb is not None:
      for key, value in _scalars(record).items():
        self._tb.scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  return read_jsonl(fileio.join(workdir, "metrics.jsonl"))


def read_jsonl(path: str) -> list[dict]:
  """JSON objects, one per line; a half-written last line (a run still going, or killed) is skipped."""
  with fileio.open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines):
        break  # a half-written last line of a run still going (or killed)
      raise SpecjaxError(f"{path}:{n}: not a JSON line") from None
    if not isinstance(record, dict):
      raise SpecjaxError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
    out.append(record)
  return out
