"""A config file's `sweep()` expanded into named runs: the protocol launch/sweep.py's docstring
states (entries, how values render as `--config.KEY=VALUE`, how runs are named), in the library
so that the runner (launch/sweep.py) and the ablation tables (specjax.eval.ablations) name every
run the same way without one importing the other by its path. No JAX behind it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys

from specjax.errors import SpecjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NAME = 80
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SweepError(SpecjaxError):
  """A mistake in the sweep or the command line; the message names the file and entry."""


def render(value, where: str) -> str:
  """A config value as `--config.KEY=` text that ml_collections parses back to it."""
  if isinstance(value, bool):  # before int: bool is an int; absl reads true/false
    return "true" if value else "false"
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, (tuple, list, dict)):
    # Tuple and dict overrides are read with ast.literal_eval. Lists have no parser in
    # ml_collections, so they go as tuples.
    return _literal(value, where)
  if value is None:
    raise SweepError(f"{where}: None cannot be set with --config.KEY=VALUE; leave the key out")
  raise SweepError(
    f"{where}: unsupported value {value!r} of type {type(value).__name__} "
    "(use str, int, float, bool, tuple, list or dict)"
  )


def _literal(value, where: str) -> str:
  """Python syntax without spaces between items, e.g. (1,-1,1) or ('a',True)."""
  if isinstance(value, (tuple, list)):
    items = [_literal(v, where) for v in value]
    return "(" + ",".join(items) + ("," if len(items) == 1 else "") + ")"
  if isinstance(value, dict):
    return "{" + ",".join(f"{_literal(k, where)}:{_literal(v, where)}" for k, v in value.items()) + "}"
  if isinstance(value, (bool, int, float, str)) or value is None:
    return repr(value)
  raise SweepError(f"{where}: unsupported element {value!r} of type {type(value).__name__}")


def load_sweep(config_file: str) -> list[dict]:
  """Imports the config file and returns its validated sweep() entries."""
  if not os.path.isfile(config_file):
    raise SweepError(f"{config_file}: no such config file")
  if REPO not in sys.path:  # configs/ is imported as the repository's (configs import each other)
    sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location("_specjax_sweep_config", config_file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # any failure to import is the config file's
    raise SweepError(f"{config_file}: cannot load the config file ({type(e).__name__}: {e})") from e
  if not callable(getattr(module, "sweep", None)):
    raise SweepError(
      f"{config_file}: no sweep() function; define sweep() returning a list of dicts (see launch/sweep.py)"
    )
  entries = module.sweep()
  if not isinstance(entries, (list, tuple)):
    raise SweepError(f"{config_file}: sweep() returned {type(entries).__name__}, expected a list of dicts")
  if not entries:
    raise SweepError(f"{config_file}: sweep() returned no runs")
  for i, entry in enumerate(entries):
    where = f"{config_file}: sweep() entry {i}"
    if not isinstance(entry, dict):
      raise SweepError(f"{where}: expected a dict, got {type(entry).__name__} {entry!r}")
    for key, value in entry.items():
      if not isinstance(key, str):
        raise SweepError(f"{where}: key {key!r} is not a string")
      if key == "config_arg":
        if not isinstance(value, str):
          raise SweepError(f"{where}: config_arg must be a string, got {value!r}")
      elif not _KEY_RE.match(key):
        raise SweepError(f"{where}: key {key!r} is not a config field name")
  return list(entries)


def _sanitise(text: str) -> str:
  text = re.sub(r"[^A-Za-z0-9.-]+", "-", text.replace("=", "-"))
  return re.sub(r"-+", "-", text).strip("-.") or "x"


def expand(config_file: str, entries: list[dict]) -> list[dict]:
  """One run per entry: name, config string and --config flags."""
  runs = []
  for i, entry in enumerate(entries):
    where = f"{config_file}: sweep() entry {i}"
    arg = entry.get("config_arg", "")
    fields = [(k, render(v, f"{where}, key {k!r}")) for k, v in entry.items() if k != "config_arg"]
    flags = [f"--config.{k}={v}" for k, v in fields]
    parts = [p for p in arg.split(",") if p.strip()] + [f"{k}={v}" for k, v in fields]
    name = "_".join(_sanitise(p) for p in parts) or "default"
    canonical = repr((arg, flags))
    runs.append(
      {
        "index": i,
        "name": name,
        "digest": hashlib.sha1(canonical.encode()).hexdigest()[:8],
        "canonical": canonical,
        "config": f"{config_file}:{arg}" if arg else config_file,
        "flags": flags,
      }
    )
  # Deterministic and unique: the digest depends only on the entry, not on its position.
  by_name: dict[str, list[dict]] = {}
  for run in runs:
    by_name.setdefault(run["name"], []).append(run)
  for same in by_name.values():
    seen: dict[str, int] = {}
    for run in same:
      if run["canonical"] in seen:
        raise SweepError(f"{config_file}: sweep() entries {seen[run['canonical']]} and {run['index']} are the same run")
      seen[run["canonical"]] = run["index"]
  for run in runs:
    if len(run["name"]) > MAX_NAME or len(by_name[run["name"]]) > 1:
      run["name"] = f"{run['name'][:MAX_NAME]}-{run['digest']}"
  return runs


def join(base: str, name: str) -> str:
  """BASE/NAME, for a local path or a URL (gs://...)."""
  return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def done_path(workdir: str) -> str:
  """The file a run that exited 0 leaves in its workdir: a sweep run again skips that run."""
  return join(workdir, "DONE")
