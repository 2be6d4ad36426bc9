"""Expand a config file's `sweep()` into runs, and print, run or launch them.

Protocol (for config authors). A config module may define, next to `get_config(arg)`:

    def sweep():
      return [
          {"config_arg": "method=sps,gamma=4", "temperature": 0.0},
          {"config_arg": "method=sps,gamma=4", "temperature": 0.7, "mesh_shape": (1, -1, 1)},
          {"config_arg": "method=ar"},
      ]

- `sweep()` takes no arguments and returns a list (or tuple) of dicts, one per run, in run order.
- Key "config_arg" (optional, a string): the config-string argument, what follows
  `configs/x.py:`. Absent or "" means the bare config file.
- Every other key is a config field, set with `--config.KEY=VALUE`; dotted keys reach nested
  fields (`"model.dtype"`). Values are rendered so ml_collections parses them: strings as they
  are, bools as true/false, ints and floats as Python writes them, tuples and lists as
  `(1,-1,1)` (elements in Python syntax, so strings in tuples are quoted), dicts as Python
  literals. None is refused (an override cannot set None).
- Each run is named after its items, in order: the config_arg's comma-separated parts, then
  KEY=VALUE per field, joined by "_", with "=" -> "-" and every character outside
  [A-Za-z0-9.-] -> "-" (e.g. `method-sps_gamma-4_temperature-0.7`; an empty entry is
  `default`). Names longer than 80 characters, and names two different entries would share,
  get "-" and 8 hex digits of the entry's SHA-1 appended. The run's workdir is BASE/NAME.
- A run that exits 0 leaves BASE/NAME/DONE (written by this runner for --local, by
  `launch/tpu.sh run` on the workers for --tpu); a re-run of the sweep skips those runs, so a
  sweep that stopped resumes where it stopped.

Usage:

  python launch/sweep.py configs/x.py --workdir BASE --dry-run               # print the commands
  python launch/sweep.py configs/x.py --workdir BASE --local                 # run them here, one by one
  python launch/sweep.py configs/x.py --workdir gs://bucket/x --tpu NAME     # one by one on a TPU VM / pod
  python launch/sweep.py configs/x.py --workdir BASE --local --only 0,2 -- --config.target=/ckpt/t

--dry-run, the default without --local or --tpu, prints one command per run (finished local
runs as `# done: ...`). Flags after `--` go to every run, after the sweep's own, so they win.
--local stops at the first run that fails, with its exit status, and writes no DONE for it.
--tpu runs `launch/tpu.sh run NAME --wait --skip-done --workdir BASE/RUN -- CONFIG FLAGS...`
per run (zone and project from SPECJAX_TPU_ZONE / SPECJAX_TPU_PROJECT); the config file must be
inside the repository, which `launch/tpu.sh copy` ships. The local command is
`<this python> -m specjax.main`, or --runner CMD / $SPECJAX_SWEEP_RUNNER (split like a shell
line; the tests use it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(REPO, "launch", "tpu.sh")
MAX_NAME = 80
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SweepError(Exception):
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
  if REPO not in sys.path:  # configs import specjax; works from a checkout without pip install
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


def _join(base: str, name: str) -> str:
  return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def _done_path(workdir: str) -> str:
  return _join(workdir, "DONE")


def _exists(path: str) -> bool:
  if "://" in path:  # gs://: through etils (orbax's dependency), as orbax reads such paths
    from etils import epath

    return epath.Path(path).exists()
  return os.path.exists(path)


def _touch(path: str) -> None:
  if "://" in path:
    from etils import epath

    epath.Path(path).write_text("")
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w"):
    pass


def _parse_only(text: str | None, count: int) -> list[int]:
  if text is None:
    return list(range(count))
  try:
    indices = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise SweepError(f"--only {text!r}: expected comma-separated run indices, e.g. 0,2") from None
  bad = [i for i in indices if not 0 <= i < count]
  if bad or not indices:
    raise SweepError(f"--only {text!r}: the sweep has runs 0 to {count - 1}")
  return sorted(set(indices))


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra: list[str] = []
  if "--" in argv:  # flags for every run
    extra = argv[argv.index("--") + 1 :]
    argv = argv[: argv.index("--")]
  parser = argparse.ArgumentParser(
    prog="launch/sweep.py",
    description="Expand a config's sweep() into runs (protocol: launch/sweep.py docstring).",
    usage="%(prog)s CONFIG_FILE --workdir BASE [--local | --tpu NAME] [--dry-run] [--only I,J] [-- FLAGS...]",
  )
  parser.add_argument("config_file", help="a config file with sweep(), e.g. configs/finetune.py")
  parser.add_argument("--workdir", required=True, help="base directory (or gs:// path); run NAME writes BASE/NAME")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--local", action="store_true", help="run here, one after the other")
  mode.add_argument("--tpu", metavar="NAME", help="run on TPU VM / pod slice NAME, one after the other")
  parser.add_argument("--dry-run", action="store_true", help="print the commands (the default without --local/--tpu)")
  parser.add_argument("--only", metavar="I,J", help="run only these entries (0-based indices)")
  parser.add_argument(
    "--runner",
    default=os.environ.get("SPECJAX_SWEEP_RUNNER"),
    help="command for --local instead of `python -m specjax.main` (also $SPECJAX_SWEEP_RUNNER)",
  )
  args = parser.parse_args(argv)  # exits 2 with usage on a bad command line

  try:
    runs = expand(args.config_file, load_sweep(args.config_file))
    selected = [runs[i] for i in _parse_only(args.only, len(runs))]
    config_file = args.config_file
    if args.tpu:
      # The workers run from ~/specjax, so the config path must be the repository-relative one.
      rel = os.path.relpath(os.path.abspath(config_file), REPO)
      if rel.startswith(".."):
        raise SweepError(
          f"{config_file}: --tpu needs a config file inside the repository ({REPO}), "
          "which launch/tpu.sh copy ships to the workers"
        )
      for run in selected:
        run["config"] = rel + run["config"][len(config_file) :]
  except SweepError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2

  runner = shlex.split(args.runner) if args.runner else [sys.executable, "-m", "specjax.main"]
  dry_run = args.dry_run or not (args.local or args.tpu)
  for run in selected:
    workdir = _join(args.workdir, run["name"])
    if args.tpu:
      command = [
        TPU_SH,
        "run",
        args.tpu,
        "--wait",
        "--skip-done",
        "--workdir",
        workdir,
        "--",
        run["config"],
        *run["flags"],
        *extra,
      ]
    else:
      command = [*runner, "--config", run["config"], "--workdir", workdir, *run["flags"], *extra]
    # For --tpu the workdir is on the workers (tpu.sh checks DONE there); a dry run does not
    # reach out to gs://.
    done = False
    if not args.tpu and not (dry_run and "://" in workdir):
      try:
        done = _exists(_done_path(workdir))
      except Exception as e:  # noqa: BLE001 (gs:// without credentials or network)
        print(f"sweep.py: error: cannot check {_done_path(workdir)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if dry_run:
      print(("# done: " if done else "") + shlex.join(command))
      continue
    label = f"run {run['index']} ({run['name']})"
    if done:
      print(f"sweep.py: {label}: {_done_path(workdir)} exists, skipping", file=sys.stderr)
      continue
    print(f"sweep.py: {label}: {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
      rc = subprocess.call(command)
    except KeyboardInterrupt:
      print(f"sweep.py: {label} interrupted", file=sys.stderr)
      return 130
    except OSError as e:  # the runner itself is missing
      print(f"sweep.py: error: cannot start {command[0]!r}: {e}", file=sys.stderr)
      return 2
    rc = rc if rc >= 0 else 128 - rc  # killed by signal N: 128 + N, as a shell reports it
    if rc != 0:
      print(
        f"sweep.py: {label} failed with exit status {rc}; stopping (finished runs have DONE, "
        "so the same command resumes)",
        file=sys.stderr,
      )
      return rc
    if not args.tpu:
      _touch(_done_path(workdir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
