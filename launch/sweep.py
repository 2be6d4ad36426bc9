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
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # works from a checkout without pip install
  sys.path.insert(0, REPO)

from specjax.sweeps import MAX_NAME, SweepError, done_path, expand, join, load_sweep, render  # noqa: E402, F401 (the tests use them here)

TPU_SH = os.path.join(REPO, "launch", "tpu.sh")


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
    workdir = join(args.workdir, run["name"])
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
        done = _exists(done_path(workdir))
      except Exception as e:  # noqa: BLE001 (gs:// without credentials or network)
        print(f"sweep.py: error: cannot check {done_path(workdir)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if dry_run:
      print(("# done: " if done else "") + shlex.join(command))
      continue
    label = f"run {run['index']} ({run['name']})"
    if done:
      print(f"sweep.py: {label}: {done_path(workdir)} exists, skipping", file=sys.stderr)
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
      _touch(done_path(workdir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
