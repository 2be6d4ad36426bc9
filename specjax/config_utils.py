"""Config-string parsing for `configs/*.py:get_config(arg)` (big_vision's `parse_arg`).

`configs/generate.py:runlocal,method=pld,gamma=4` passes "runlocal,method=pld,gamma=4" to
get_config; this turns it into a ConfigDict typed by the defaults the config file declares, and
names the config file in every error, so a typo fails before anything loads.
"""

from __future__ import annotations

import os

import ml_collections

from specjax.errors import SpecjaxError


class Unset:
  """A config-string argument without a default value: None unless given, then of type `kind`.

  Configs write `unset(int)` where a number's default depends on the variant (runlocal's are
  small), so that an explicit value, 0 included, is the user's and is validated as such, never
  read as "use the default" (`gamma=0` used to become 10)."""

  def __init__(self, kind: type):
    self.kind = kind

  def __repr__(self):
    return f"unset({self.kind.__name__})"


def unset(kind: type) -> Unset:
  return Unset(kind)


def given(value, default):
  """`value` unless it is None (an `unset` argument not given), else `default`."""
  return default if value is None else value


def _convert(key: str, value: str, default, source: str):
  kind = default.kind if isinstance(default, Unset) else type(default)
  if kind is bool:
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise SpecjaxError(f"{source}: {key}={value!r}: expected true or false")
  if kind in (int, float):
    try:
      return kind(value)
    except ValueError:
      raise SpecjaxError(f"{source}: {key}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None
  return value


def parse_arg(arg: str | None, source: str = "config", **defaults) -> ml_collections.ConfigDict:
  """Parses "key=value,flag,..." against `defaults`; a bare key sets a boolean to True.

  Values take the type of their default (bool, int, float, str), or `unset(kind)`'s kind (None
  when not given). Unknown keys raise SpecjaxError listing the known ones.
  """
  out = ml_collections.ConfigDict({k: None if isinstance(v, Unset) else v for k, v in defaults.items()})
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise SpecjaxError(f"{source}: unknown argument {key!r} in {arg!r}; known: {', '.join(sorted(defaults))}")
    if not has_value and type(defaults[key]) is not bool:  # an unset(...) always needs a value
      raise SpecjaxError(f"{source}: argument {key!r} needs a value ({key}=...)")
    out[key] = _convert(key, value.strip(), defaults[key], source)
  return out


def workdir_path(config, field: str, workdir: str) -> str | None:
  """Config field `field` as a path, with `{workdir}` replaced (runlocal builds its inputs there)."""
  value = config.get(field)
  if not value:
    return None
  if "{workdir}" not in value:
    return value
  value = value.replace("{workdir}", workdir)
  # "{workdir}/../x" must not need {workdir} to exist yet; URLs (gs://) are left as they are.
  prefix, sep, path = value.rpartition(":") if value.startswith(("run:", "preset:")) else ("", "", value)
  return prefix + sep + (path if "://" in path else os.path.normpath(path))
