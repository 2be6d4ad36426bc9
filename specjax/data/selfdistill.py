"""Self-distillation records: the target's own translations of training sentences, as the
`distill_data` job (specjax/jobs/distill_data.py) writes them and training reads them.

A record is one (source sentence, temperature); its id is `source_id * len(temperatures) +
temperature_index`. A job's WORKDIR/data/ holds `selfdistill-{src}{tgt}-{shard:05d}-of-{n:05d}.jsonl`
shards (`shard_name`), records in id order; `read_records` reads them back, checking every line.
A record's `truncated` is true when the response reached max_new_tokens (or the cache) before
any stop id; training then appends no EOS to it.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from specjax.errors import SpecjaxError

FIELDS = (
  "record_id",
  "source_id",
  "source",
  "prompt",
  "chat_prompt",
  "response",
  "response_token_ids",
  "temperature",
  "src_lang",
  "tgt_lang",
)
# Written after FIELDS. Shards from before it lack it: specjax.data.tasks then takes a response
# without a final EOS as cut off, which is what those runs (one stop id, the tokenizer's) meant.
OPTIONAL_FIELDS = ("truncated",)


def shard_name(src: str, tgt: str, shard: int, num_shards: int) -> str:
  return f"selfdistill-{src}{tgt}-{shard:05d}-of-{num_shards:05d}.jsonl"


def read_shard(path: str) -> Iterator[dict]:
  """The records of one shard file; a malformed line raises SpecjaxError naming file and line."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise SpecjaxError(f"{path}: cannot read ({e.strerror})") from None
  with f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise SpecjaxError(f"{path}:{line_no}: invalid UTF-8 ({e.reason})") from None
      yield _parse_record(line, path, line_no)


def _parse_record(line: str, path: str, line_no: int) -> dict:
  where = f"{path}:{line_no}"
  try:
    record = json.loads(line)
  except ValueError as e:
    raise SpecjaxError(
      f"{where}: malformed JSON ({e}); the shard is damaged (cut short by an interrupted copy?): "
      "copy it again, or remove it and rerun distill_data in its workdir to regenerate it"
    ) from None
  if not isinstance(record, dict):
    raise SpecjaxError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [f for f in FIELDS if f not in record]
  if missing:
    raise SpecjaxError(f"{where}: field(s) {', '.join(missing)} missing")
  for field in ("source", "prompt", "chat_prompt", "response", "src_lang", "tgt_lang"):
    if not isinstance(record[field], str):
      raise SpecjaxError(f"{where}: field {field!r} must be a string")
  for field in ("record_id", "source_id"):
    if not isinstance(record[field], int) or isinstance(record[field], bool) or record[field] < 0:
      raise SpecjaxError(f"{where}: field {field!r} must be an integer >= 0")
  ids = record["response_token_ids"]
  if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
    raise SpecjaxError(f"{where}: field 'response_token_ids' must be a list of token ids (integers >= 0)")
  if not isinstance(record["temperature"], (int, float)) or isinstance(record["temperature"], bool):
    raise SpecjaxError(f"{where}: field 'temperature' must be a number")
  if not isinstance(record.get("truncated", False), bool):
    raise SpecjaxError(f"{where}: field 'truncated' must be true or false")
  return record


def read_records(path_or_dir: str) -> Iterator[dict]:
  """Records of one shard file, or of every `selfdistill-*.jsonl` shard of a job's workdir (or its
  data/ folder) in shard order; a malformed line raises SpecjaxError naming file and line."""
  if os.path.isdir(path_or_dir):
    folder = os.path.join(path_or_dir, "data") if os.path.isdir(os.path.join(path_or_dir, "data")) else path_or_dir
    paths = sorted(glob.glob(os.path.join(folder, "selfdistill-*.jsonl")))
    if not paths:
      raise SpecjaxError(f"{path_or_dir}: no selfdistill-*.jsonl shards (is it a distill_data workdir?)")
  elif os.path.exists(path_or_dir):
    paths = [path_or_dir]
  else:
    raise SpecjaxError(f"{path_or_dir}: no such file or directory")
  for path in paths:
    yield from read_shard(path)
