"""Spec-Bench question files, FastChat chat templates, and prompt encoding.

The paper's numbers come from Spec-Bench's `question.jsonl` files rendered with FastChat's
Vicuna v1.1 template, so both are reproduced to the character: a different system prompt or a
missing space changes the target's outputs and so every acceptance number.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

from specjax.errors import SpecjaxError

VICUNA_SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
  "helpful, detailed, and polite answers to the user's questions."
)


# --- question files --------------------------------------------------------------------


def read_questions(path: str) -> list[dict]:
  """Reads a Spec-Bench question.jsonl: one JSON object per line with `question_id` (string or
  integer), `category` (string) and `turns` (non-empty list of strings). Blank lines are skipped.

  Returns the objects in file order, each with `source` ("file:line") added for messages.
  Every problem raises SpecjaxError naming the file and the 1-based line.
  """
  if not os.path.isfile(path):
    raise SpecjaxError(
      f"{path}: prompt file not found"
      if not os.path.exists(path)
      else f"{path}: not a file (expected a Spec-Bench question.jsonl)"
    )
  with open(path, "rb") as f:
    raw_lines = f.read().split(b"\n")
  out, seen = [], {}
  for lineno, raw in enumerate(raw_lines, start=1):
    where = f"{path}: line {lineno}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise SpecjaxError(f"{where}: invalid UTF-8 (byte {e.start + 1} of the line: {e.reason})") from None
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise SpecjaxError(f"{where}: malformed JSON at column {e.colno} ({e.msg})") from None
    if not isinstance(record, dict):
      raise SpecjaxError(
        f"{where}: expected a JSON object with question_id, category and turns, got {type(record).__name__}"
      )
    for field in ("question_id", "category", "turns"):
      if field not in record:
        raise SpecjaxError(f"{where}: field {field!r} is missing")
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
      raise SpecjaxError(f"{where}: field 'question_id' must be a string or an integer, got {qid!r}")
    if not isinstance(record["category"], str):
      raise SpecjaxError(f"{where}: field 'category' must be a string, got {record['category']!r}")
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
      raise SpecjaxError(f"{where}: field 'turns' must be a non-empty list of strings, got {turns!r}")
    empty = [k for k, t in enumerate(turns, 1) if not t.strip()]
    if empty:
      raise SpecjaxError(f"{where}: turn {empty[0]} of field 'turns' is empty: every turn needs a prompt")
    if qid in seen:
      raise SpecjaxError(f"{where}: question_id {qid!r} repeats line {seen[qid]}")
    seen[qid] = lineno
    out.append(dict(record, source=f"{path}:{lineno}"))
  if not out:
    raise SpecjaxError(f"{path}: no prompts (the file is empty)")
  return out


def read_prompt_files(spec: str) -> list[dict]:
  """Questions from a comma-separated list of files or glob patterns, in the order given (each
  pattern's matches sorted). Question ids must be unique across all files."""
  paths = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if glob.has_magic(part):
      matches = sorted(glob.glob(part))
      if not matches:
        raise SpecjaxError(f"prompts pattern {part!r}: no file matches")
      paths.extend(matches)
    else:
      paths.append(part)
  if not paths:
    raise SpecjaxError("prompts: no file given (expected a question.jsonl path, a glob, or a comma-separated list)")
  out, seen = [], {}
  for path in paths:
    for q in read_questions(path):
      if q["question_id"] in seen:
        raise SpecjaxError(f"{q['source']}: question_id {q['question_id']!r} repeats {seen[q['question_id']]}")
      seen[q["question_id"]] = q["source"]
      out.append(q)
  return out


# --- chat templates ----------------------------------------------------------------------


def _vicuna_v11(messages: list[tuple[str, str | None]], system: str | None) -> str:
  """FastChat's `vicuna_v1.1` (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>")."""
  seps = (" ", "</s>")
  out = (VICUNA_SYSTEM if system is None else system) + seps[0]
  for i, (role, message) in enumerate(messages):
    out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
  return out


def _llama2(messages: list[tuple[str, str | None]], system: str | None) -> str:
  """FastChat's `llama-2` (SeparatorStyle.LLAMA2, sep " ", sep2 " </s><s>"); its system prompt is
  empty by default, which drops the <<SYS>> block."""
  seps = (" ", " </s><s>")
  out = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n" if system else "[INST] "
  for i, (role, message) in enumerate(messages):
    if not message:
      out += role
    elif i == 0:
      out += message + " "
    else:
      out += f"{role} {message}{seps[i % 2]}"
  return out


def _plain(messages: list[tuple[str, str | None]], system: str | None) -> str:
  """The messages as they are, earlier turns and answers joined by newlines."""
  return "\n".join(m for _, m in messages if m)


def _vicuna_compact(messages: list[tuple[str, str | None]], system: str | None) -> str:
  """vicuna_v1.1's turns without its 30-word system prompt (unless one is given): for small models
  trained from scratch (the demo), where that prompt would fill most of every training row."""
  return _vicuna_v11(messages, system or "").lstrip()


_TEMPLATES = {
  "vicuna_v1.1": (("USER", "ASSISTANT"), _vicuna_v11),
  "vicuna_compact": (("USER", "ASSISTANT"), _vicuna_compact),
  "llama-2": (("[INST]", "[/INST]"), _llama2),
  "plain": (("", ""), _plain),
}
# hf: the tokenizer's own chat template (tokenizer_config.json / chat_template.jinja / GGUF);
# auto: hf when the tokenizer has one, vicuna_v1.1 otherwise (the paper's Vicuna setting).
TEMPLATES = tuple(_TEMPLATES) + ("hf", "auto")


def check_template(name: str, field: str = "template") -> str:
  """Raises the SpecjaxError a job reports for an unknown template name; returns the name."""
  if name not in TEMPLATES:
    raise SpecjaxError(f"config field `{field}`={name!r}: templates are {', '.join(TEMPLATES)}")
  return name


def resolve_template(name: str, tokenizer=None) -> str:
  """`auto` -> `hf` when the tokenizer carries a chat template, else `vicuna_v1.1`; `hf` needs one."""
  check_template(name)
  has_template = bool(getattr(tokenizer, "chat_template", None))
  if name == "auto":
    return "hf" if has_template else "vicuna_v1.1"
  if name == "hf" and not has_template:
    where = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
    raise SpecjaxError(
      f"template 'hf': {where} has no chat template (tokenizer_config.json `chat_template` or "
      "chat_template.jinja); pick one of " + ", ".join(_TEMPLATES) + " or template=auto"
    )
  return name


def _hf_chat(tokenizer, messages: list[tuple[str, str | None]], system: str | None) -> str:
  """The tokenizer's own template over role/content messages, ending in the assistant's turn."""
  chat = [{"role": "system", "content": system}] if system else []
  chat += [{"role": role, "content": content} for role, content in messages if content is not None]
  try:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  except Exception as e:  # jinja errors: the template refuses these messages (e.g. no system role)
    raise SpecjaxError(f"template 'hf': the tokenizer's chat template failed on these messages ({e})") from None


def apply_template(
  name: str, user_message: str, history: Sequence[tuple[str, str]] = (), system: str | None = None, tokenizer=None
) -> str:
  """The prompt text for `user_message` after the earlier (user, assistant) turns in `history`,
  as FastChat's template `name` renders it, or the tokenizer's own (`hf`; `auto` picks).
  system: replaces the template's system prompt."""
  name = resolve_template(name, tokenizer) if name in ("hf", "auto") else check_template(name)
  if name == "hf":
    messages = []
    for question, answer in history:
      messages += [("user", question), ("assistant", answer)]
    return _hf_chat(tokenizer, messages + [("user", user_message)], system)
  (user, assistant), render = _TEMPLATES[name]
  messages: list[tuple[str, str | None]] = []
  for question, answer in history:
    messages += [(user, question), (assistant, answer)]
  messages += [(user, user_message), (assistant, None)]
  return render(messages, system)


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Token ids of `text` with the special tokens the tokenizer itself adds (Llama's: a leading
  BOS), as Spec-Bench's `tokenizer([prompt]).input_ids`; a BOS already written in the text is
  not doubled."""
  ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
  bos = tokenizer.bos_token_id
  if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
    ids = ids[1:]
  return ids
