"""Config validation before any work starts, for every job (`specjax.main.run_job` calls
`check_job`), so a mistake costs a second, not a model load or a decode.

The checks are data: `FIELDS` maps a config field to one rule, applied to every job whose config
has that field (a rule names its range, and the message says what the field held); `PATHS`
names the fields that are paths which must exist. The workdir must be a directory this process
can write (a probe file is created and removed). `check_overrides` turns a `--config.FIELD=...`
that names no field into one line with a did-you-mean (difflib over the config's keys);
`check_aliases` refuses a command line that gives a nested field (`acceptance.gamma`) and its
old flat name (`acceptance_gamma`, an alias kept for one release) different values.

Nothing here imports JAX: a bad config fails before the slow imports.
"""

from __future__ import annotations

import difflib
import numbers
import os
import uuid
from typing import Any, Callable

from specjax.config_utils import workdir_path
from specjax.errors import SpecjaxError

DTYPES = ("float32", "bfloat16", "float16")


# --- rules: each returns None (fine) or what the value should have been ---------------------


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def at_least(lo, integer: bool = True, optional: bool = False) -> Callable[[Any], str | None]:
  kind = "an integer" if integer else "a number"
  want = f"{kind} >= {lo}" + (" (or unset)" if optional else "")

  def rule(v):
    if v is None and optional:
      return None
    if not (_is_int(v) if integer else _is_number(v)) or v < lo:
      return f"must be {want}"
    return None

  return rule


def between(lo, hi, *, lo_open=False, hi_open=False) -> Callable[[Any], str | None]:
  want = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

  def rule(v):
    if not _is_number(v) or (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
      return f"must be {want}"
    return None

  return rule


def positive(v):
  return None if _is_number(v) and v > 0 else "must be a number > 0"


def boolean(v):
  return None if isinstance(v, bool) else "must be True or False"


def one_of(*choices) -> Callable[[Any], str | None]:
  def rule(v):
    return None if v in choices else f"expected one of {', '.join(map(str, choices))}"

  return rule


def each(inner: Callable[[Any], str | None], *, nonempty: bool = True) -> Callable[[Any], str | None]:
  def rule(v):
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
      return "must be a list (e.g. '(0, 1)')"
    items = list(v)
    if nonempty and not items:
      return "needs at least one value"
    for item in items:
      problem = inner(item)
      if problem:
        return f"every value {problem} (got {item!r})"
    if len(set(items)) != len(items):
      return "repeats a value"
    return None

  return rule


def mesh_shape(v):
  if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
    return "must be three integers (data, fsdp, tensor), e.g. '(1, -1, 1)'"
  dims = list(v)
  if len(dims) != 3 or not all(_is_int(d) and (d == -1 or d >= 1) for d in dims) or dims.count(-1) > 1:
    return "must be three integers (data, fsdp, tensor), each >= 1 or one of them -1 (the rest of the devices)"
  return None


def _templates(v):
  from specjax.decoding.prompts import TEMPLATES  # no JAX behind it

  return None if v in TEMPLATES else f"templates are {', '.join(TEMPLATES)}"


# field -> rule. A field that a job's config does not have is skipped.
POSITIVE_INT = at_least(1)
COUNT = at_least(0)  # 0 = all / off, as each config documents
FIELDS: dict[str, Callable[[Any], str | None]] = {
  # decoding
  "gamma": POSITIVE_INT,  # drafts per round (the dynamic schedule's ceiling)
  "gamma_start": POSITIVE_INT,  # the dynamic schedule's start (above gamma it starts at gamma)
  "max_new_tokens": POSITIVE_INT,
  "batch_size": POSITIVE_INT,
  "prompt_bucket": POSITIVE_INT,
  "max_cache_len": at_least(1, optional=True),
  "temperature": at_least(0, integer=False),
  "temperatures": each(at_least(0, integer=False)),
  "top_k": COUNT,
  "top_p": between(0, 1, lo_open=True),
  "max_prompts": COUNT,
  "max_prompts_per_language": COUNT,
  "seed": COUNT,
  "seeds": each(COUNT),
  "greedy_seeds": each(COUNT),
  "method": one_of("ar", "sps", "pld"),
  "lookup_drafts": boolean,
  "dtype": one_of(*DTYPES),
  "target_dtype": one_of(*DTYPES),
  "template": _templates,
  "drafter_sharding": one_of("replicated", "sharded"),
  "mesh_shape": mesh_shape,
  # self-distillation
  "num_sources": COUNT,
  "num_shards": POSITIVE_INT,
  "max_shards_this_run": COUNT,
  # training
  "sequence_length": POSITIVE_INT,
  "grad_accumulation": POSITIVE_INT,
  "log_every": POSITIVE_INT,
  "checkpoint_every": POSITIVE_INT,
  "checkpoints_to_keep": POSITIVE_INT,
  "num_train_steps": COUNT,  # >= 1 unless train_tokens is set (the trainer checks the pair)
  "train_tokens": COUNT,
  "max_steps_this_run": COUNT,
  "allow_resume_with_changes": boolean,  # a resume with other data settings (refused by default)
  "data_limit": COUNT,
  "data_shards": COUNT,
  "shuffle_buffer_size": POSITIVE_INT,
  "eval_every": COUNT,
  "eval_batches": COUNT,
  "learning_rate": positive,
  "warmup_fraction": between(0, 1),
  "final_lr_fraction": between(0, 1),
  "weight_decay": at_least(0, integer=False),
  "adam_b1": between(0, 1, hi_open=True),
  "adam_b2": between(0, 1, hi_open=True),
  "adam_eps": positive,
  "grad_clip_norm": at_least(0, integer=False),
  "draft_vocab_coverage": between(0, 1),  # 0 = the full vocabulary (demo)
  "loss": one_of("cross_entropy", "forward_kl", "total_variation"),
  "pretrain_source": one_of("local", "tfds"),
  "translate_source": one_of("local", "tfds"),
  # the trainer's acceptance evaluation: config.acceptance.* (a config with only the flat
  # acceptance_* names, the aliases kept for one release, is checked under those)
  "acceptance.prompts_per_language": COUNT,
  "acceptance.temperatures": each(at_least(0, integer=False), nonempty=False),
  "acceptance.gamma": POSITIVE_INT,
  "acceptance.max_new_tokens": POSITIVE_INT,
  "acceptance.batch_size": POSITIVE_INT,
  "acceptance.prompt_bucket": POSITIVE_INT,
  # the demo's stages
  "distill_batch_size": POSITIVE_INT,
  "distill_sources": COUNT,
  "distill_max_new_tokens": COUNT,  # 0 = max_new_tokens
  "distill_temperatures": each(at_least(0, integer=False)),
  "eval_prompts_per_language": POSITIVE_INT,
  "sampled_prompts_per_language": COUNT,
  "sampling_seeds": each(COUNT),
  "target_steps": POSITIVE_INT,
  "pretrain_steps": POSITIVE_INT,
  "finetune_steps": POSITIVE_INT,
  "drafter_lr": positive,
  "target_lr": positive,
  "finetune_lr": positive,
  "ablation_steps": each(POSITIVE_INT),
  "ablation_gammas": each(POSITIVE_INT),
  "ablation_prompts": POSITIVE_INT,
  "ablation_acceptance_gamma": POSITIVE_INT,
}

# Fields per job that name local directories which must exist (None or "" = unset; URLs skipped).
# distill_data's runlocal falls back to local_assets' sentences when its default data folder,
# ../shared/data, is absent; any other data_dir must exist.
DISTILL_DEFAULT_DATA_DIR = "../shared/data"
PATHS: dict[str, tuple[str, ...]] = {
  "distill_data": ("data_dir",),
  "pretrain": ("data_dir", "selfdistill_dir"),
  "finetune": ("data_dir", "selfdistill_dir"),
  "demo": ("data_dir",),
}


# --- the checks ------------------------------------------------------------------------------


_ABSENT = object()


def _field(config, field: str):
  """(name, value) of `field` in config: "group.name" is config.group.name, or in a config
  without that group, its flat alias config.group_name; (field, _ABSENT) when it has neither."""
  group, dot, name = field.partition(".")
  if not dot:
    return field, config[field] if field in config else _ABSENT
  if group in config and hasattr(config[group], "keys"):
    return field, config[group][name] if name in config[group] else _ABSENT
  flat = f"{group}_{name}"
  return flat, config[flat] if flat in config else _ABSENT


def check_fields(config) -> None:
  """Every field in FIELDS that `config` has: one SpecjaxError for the first that breaks its rule."""
  for field, rule in FIELDS.items():
    name, value = _field(config, field)
    if value is _ABSENT:
      continue
    problem = rule(value)
    if problem:
      shown = tuple(value) if isinstance(value, list) else value
      raise SpecjaxError(f"config field `{name}`={shown!r}: {problem}")


def _remote(path: str) -> bool:
  return "://" in path


def check_paths(config, workdir: str) -> None:

  for field in PATHS.get(config.get("job"), ()):
    if field not in config or not config[field]:
      continue
    if (
      field == "data_dir"
      and config.get("job") in ("pretrain", "finetune")
      and config.get("pretrain_source") == "tfds"
      and config.get("translate_source") == "tfds"
    ):
      continue  # nothing is read from data_dir
    if field == "data_dir" and config.get("job") == "demo" and config.get("data") not in (None, "local"):
      continue
    raw = config[field]
    path = workdir_path(config, field, workdir)
    if _remote(path):
      continue
    if config.get("local_assets") and "{workdir}" in raw:
      continue  # built there by local_assets
    if config.get("job") == "distill_data" and config.get("local_assets") and raw == DISTILL_DEFAULT_DATA_DIR:
      continue  # runlocal's documented fallback (a warning says so)
    if not os.path.exists(path):
      raise SpecjaxError(f"config field `{field}`={raw!r}: {os.path.abspath(path)} does not exist")
    if not os.path.isdir(path):
      raise SpecjaxError(f"config field `{field}`={raw!r}: {os.path.abspath(path)} is not a directory")


def check_workdir(workdir: str | None) -> None:
  """The workdir is a directory we can write, or can be made one: found now, not after decoding."""
  if not workdir:
    raise SpecjaxError("--workdir is empty: give a directory for this run's outputs")
  if _remote(workdir):
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise SpecjaxError(f"--workdir {workdir}: is a file, not a directory; give a directory for this run's outputs")
  parent = path
  while not os.path.exists(parent):  # the nearest existing ancestor must be a directory
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise SpecjaxError(f"--workdir {workdir}: {parent} is a file, so the directory cannot be created")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise SpecjaxError(f"--workdir {workdir}: cannot create the directory ({e.strerror})") from None
  probe = os.path.join(path, f".specjax-write-probe-{uuid.uuid4().hex[:8]}")
  try:
    with open(probe, "w") as f:
      f.write("probe\n")
  except OSError as e:
    raise SpecjaxError(
      f"--workdir {workdir}: cannot write there ({e.strerror}); give a directory you can write"
    ) from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)


def check_job(config, workdir: str | None) -> None:
  """Fields, paths and the workdir, in that order (a typo in a field is the likelier mistake)."""
  check_fields(config)
  check_paths(config, workdir or "")
  check_workdir(workdir)


# --- --config.FIELD overrides ---------------------------------------------------------------


def _suggest(key: str, keys) -> str:
  close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
  if close:
    return "; did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
  return "; its fields: " + ", ".join(sorted(keys))


def check_overrides(config, argv, source: str = "the config") -> None:
  """Raises SpecjaxError for the first `--config.A.B[=V]` in argv whose path `config` lacks."""
  for arg in argv:
    if not arg.startswith("--config.") and not arg.startswith("--noconfig."):
      continue
    path = arg.split("=", 1)[0].split(".", 1)[1]
    node, walked = config, []
    for key in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else None
      if keys is None:
        raise SpecjaxError(
          f"{arg}: config field `{'.'.join(walked)}` is a {type(node).__name__}, it has no field `{key}`"
        )
      if key not in keys:
        where = f"`{'.'.join(walked)}`" if walked else source
        raise SpecjaxError(f"{arg}: {where} has no field `{key}`{_suggest(key, keys)}")
      node, walked = node[key], walked + [key]


def _given_overrides(argv) -> dict[str, str]:
  """`--config.PATH=VALUE` (or `--config.PATH VALUE`) in argv: PATH -> VALUE as written."""
  given = {}
  for i, arg in enumerate(argv):
    if not arg.startswith("--config."):
      continue
    path, eq, value = arg[len("--config.") :].partition("=")
    if not eq:
      if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        continue  # a boolean flag, or absl's error to report
      value = argv[i + 1]
    given[path] = value
  return given


def _as_value(text: str):
  import ast

  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text.strip()


def check_aliases(config, argv) -> None:
  """Raises SpecjaxError when argv sets a nested field (`--config.acceptance.gamma=5`) and its
  flat alias (`--config.acceptance_gamma=4`, the old name, kept for one release) to different
  values: in the config they are one field, so the later flag would win without a word."""
  given = _given_overrides(argv)
  for path, value in given.items():
    group, dot, name = path.partition(".")
    flat = f"{group}_{name}"
    if not dot or "." in name or flat not in given or flat not in config or group not in config:
      continue
    if not hasattr(config[group], "keys") or name not in config[group]:
      continue
    a, b = _as_value(value), _as_value(given[flat])
    if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
      raise SpecjaxError(
        f"--config.{path}={value} and --config.{flat}={given[flat]}: `{flat}` is the old name "
        f"of `{path}` (kept for one release) and they differ; give one of them"
      )
