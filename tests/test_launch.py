"""launch/tpu.sh (through --dry-run: no gcloud, no network) and launch/sweep.py."""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(REPO, "launch", "tpu.sh")
SWEEP_PY = os.path.join(REPO, "launch", "sweep.py")


def tpu(*args, env=None, check=True):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECJAX_")}
  full_env.update(env or {})
  result = subprocess.run(
    ["bash", TPU_SH, *args], capture_output=True, text=True, check=False, env=full_env, timeout=60
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry(*args, env=None):
  """The commands `tpu.sh --dry-run ARGS` prints, each split into words as a shell would."""
  out = tpu("--dry-run", *args, env=env).stdout
  return [shlex.split(line) for line in _commands(out)]


def _commands(out):
  """Printed commands (a quoted script may span lines); comment lines dropped."""
  commands, current = [], ""
  for line in out.splitlines(keepends=True):
    current += line
    try:
      shlex.split(current)
    except ValueError:  # inside an open quote: the command goes on
      continue
    if current.strip() and not current.lstrip().startswith("#"):
      commands.append(current)
    current = ""
  assert not current, f"unterminated command in {out!r}"
  return commands


def remote_script(words):
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], words
  return words[words.index("--command") + 1]


def test_bash_syntax():
  subprocess.run(["bash", "-n", TPU_SH], check=True)


def test_create_spot_pod_slice():
  [cmd] = dry("create", "mypod", "--type", "v4-32", "--spot", "--zone", "us-central2-b", "--project", "p1")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mypod"]
  assert "--accelerator-type=v4-32" in cmd and "--spot" in cmd and "--preemptible" not in cmd
  assert "--zone=us-central2-b" in cmd and "--project=p1" in cmd
  assert "--version=tpu-ubuntu2204-base" in cmd


def test_create_defaults_from_environment():
  env = {"SPECJAX_TPU_ZONE": "us-west4-a", "SPECJAX_TPU_PROJECT": "proj"}
  [cmd] = dry("create", "v5", "--type=v5litepod-8", "--preemptible", "--", "--network=net", env=env)
  assert "--zone=us-west4-a" in cmd and "--project=proj" in cmd
  assert "--version=v2-alpha-tpuv5-lite" in cmd and "--preemptible" in cmd and "--network=net" in cmd
  [cmd] = dry("create", "v6", "--type", "v6e-8", "--version", "my-image", env=env)
  assert "--version=my-image" in cmd and "--spot" not in cmd
  # SPECJAX_DRY_RUN=1 is the same as --dry-run.
  out = tpu("list", env={**env, "SPECJAX_DRY_RUN": "1"}).stdout
  assert shlex.split(out) == ["gcloud", "compute", "tpus", "tpu-vm", "list", "--zone=us-west4-a", "--project=proj"]


def test_list_and_delete():
  assert dry("list", "--zone", "z1") == [["gcloud", "compute", "tpus", "tpu-vm", "list", "--zone=z1"]]
  [cmd] = dry("delete", "mytpu", "--zone", "z1")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "mytpu"] and "--quiet" not in cmd
  [cmd] = dry("delete", "mytpu", "--yes")
  assert "--quiet" in cmd


def test_copy_packs_the_working_tree_and_unpacks_on_every_worker():
  out = tpu("--dry-run", "copy", "mytpu").stdout
  assert "# pack" in out and "(git ls-files)" in out
  scp, unpack = [shlex.split(c) for c in _commands(out)]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith(".tar.gz") and scp[6] == "mytpu:specjax.tar.gz" and "--worker=all" in scp
  assert "--worker=all" in unpack and "tar -xzf ~/specjax.tar.gz -C ~/specjax" in remote_script(unpack)


def test_setup_is_an_idempotent_install_on_every_worker():
  [cmd] = dry("setup", "mytpu")
  assert "--worker=all" in cmd
  script = remote_script(cmd)
  assert "[ ! -x .venv/bin/python ]" in script  # the venv only when missing
  assert "sha256sum setup.py" in script and ".venv/.specjax-setup" in script  # the stamp
  assert 'pip install -q -e ".[tpu]"' in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


def test_run_starts_the_config_on_all_workers_with_per_worker_logs():
  [cmd] = dry(
    "run",
    "mytpu",
    "--workdir",
    "gs://bucket/run1",
    "--",
    "configs/generate.py:method=sps",
    "--config.target=/ckpt/t",
    "--config.mesh_shape=(1,-1,1)",
  )
  assert "--worker=all" in cmd
  script = remote_script(cmd)
  assert "SPECJAX_DISTRIBUTED=1 .venv/bin/python -m specjax.main --config configs/generate.py:method=sps" in script
  assert "--config.target=/ckpt/t '--config.mesh_shape=(1,-1,1)'" in script
  assert "workdir=gs://bucket/run1" in script
  assert "log=logs/mytpu/worker-$i.log" in script and "nohup" in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


@pytest.fixture
def fake_worker(tmp_path):
  """A HOME with ~/specjax/.venv/bin/python that only reports, and a curl that fails (worker 0)."""
  home = tmp_path / "home"
  venv_bin = home / "specjax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(
    textwrap.dedent("""\
      #!/bin/bash
      echo "fake main: $* distributed=$SPECJAX_DISTRIBUTED"
      exit ${FAKE_RC:-0}
      """)
  )
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "curl").write_text("#!/bin/sh\nexit 7\n")
  for f in (venv_bin / "python", bin_dir / "curl"):
    f.chmod(0o755)

  def run(script, **env):
    full_env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False, env=full_env, timeout=60)

  return home / "specjax", run


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_run_script_on_a_worker(fake_worker):
  """The script `run` sends, executed here: log, DONE, --wait exit status, --skip-done."""
  specjax_dir, run = fake_worker
  log = specjax_dir / "logs" / "mytpu" / "worker-0.log"

  [cmd] = dry("run", "mytpu", "--workdir", "runs/a", "--", "configs/x.py:runlocal", "--config.seed=3")
  result = run(remote_script(cmd))
  assert result.returncode == 0 and "worker 0: started" in result.stdout, result.stderr
  deadline = time.time() + 30  # the run is in the background
  while not (specjax_dir / "runs" / "a" / "DONE").exists():
    assert time.time() < deadline, log.read_text() if log.exists() else "no log"
    time.sleep(0.05)
  assert (
    "fake main: -m specjax.main --config configs/x.py:runlocal --workdir runs/a --config.seed=3 distributed=1"
    in log.read_text()
  )
  assert (specjax_dir / "logs" / "mytpu" / "worker-0.pid").exists()  # for `stop`

  # --wait: the run's exit status, no DONE after a failure.
  [cmd] = dry("run", "mytpu", "--workdir", "runs/b", "--wait", "--", "configs/x.py")
  result = run(remote_script(cmd), FAKE_RC="3")
  assert result.returncode == 3 and "exit 3" in result.stdout
  assert not (specjax_dir / "runs" / "b" / "DONE").exists()

  # --skip-done: a finished workdir is left alone.
  [cmd] = dry("run", "mytpu", "--workdir", "runs/a", "--wait", "--skip-done", "--", "configs/x.py")
  result = run(remote_script(cmd), FAKE_RC="3")
  assert result.returncode == 0 and "DONE exists, skipping" in result.stdout


def test_logs_ssh_and_stop():
  [cmd] = dry("logs", "mytpu", "--worker", "2")
  assert "--worker=2" in cmd and "tail -n 100 -F ~/specjax/logs/mytpu/worker-2.log" == remote_script(cmd)
  [cmd] = dry("logs", "mytpu")
  assert "--worker=0" in cmd and remote_script(cmd).endswith("logs/mytpu/worker-0.log")
  [cmd] = dry("logs", "mytpu", "--worker=all", "--no-follow")
  assert "--worker=all" in cmd and "worker-*.log" in remote_script(cmd)
  assert dry("ssh", "mytpu", "--worker", "1") == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mytpu", "--worker=1"]]
  [cmd] = dry("ssh", "mytpu", "--worker", "all", "--", "ls", "-l")
  assert remote_script(cmd) == "ls -l" and "--worker=all" in cmd
  [cmd] = dry("stop", "mytpu")
  assert "--worker=all" in cmd and "logs/mytpu/worker-*.pid" in remote_script(cmd)


@pytest.mark.parametrize(
  "args, message",
  [
    (["frobnicate"], "unknown command 'frobnicate'"),
    ([], "missing command"),
    (["create", "mytpu"], "missing --type"),
    (["create", "--type", "v4-8"], "missing TPU name"),
    (["create", "mytpu", "--type", "v4-8", "--spot", "--preemptible"], "exclude each other"),
    (["delete"], "missing TPU name"),
    (["run", "mytpu", "--", "configs/generate.py"], "missing --workdir"),
    (["run", "mytpu", "--workdir", "w"], "missing '-- CONFIG"),
    (["list", "extra"], "unexpected argument 'extra'"),
    (["logs", "mytpu", "--worker", "x"], "--worker: expected"),
    (["ssh", "mytpu", "--bogus"], "unknown option '--bogus'"),
    (["create", "mytpu", "--zone"], "--zone needs a value"),
    (["setup", "My_TPU"], "bad TPU name"),
  ],
)
def test_usage_errors(args, message):
  result = tpu("--dry-run", *args, check=False)
  assert result.returncode == 2, result
  assert message in result.stderr and "usage: launch/tpu.sh" in result.stderr
  assert result.stdout == ""  # nothing printed as if it would run


def test_help():
  result = tpu("--help")
  assert "create NAME --type TYPE" in result.stdout and "SPECJAX_DRY_RUN" in result.stdout


# ---- launch/sweep.py ----

CONFIG = """\
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "generate"
  c.temperature = 0.0
  c.mesh_shape = (1, -1, 1)
  c.warmup = True
  c.prompts = "p.jsonl"
  return c

def sweep():
  return [
      {"config_arg": "method=sps,gamma=4", "temperature": 0.7},
      {"config_arg": "method=ar", "mesh_shape": (2, -1, 1), "warmup": False},
      {"prompts": "data/de en.jsonl"},
  ]
"""


def sweep(*args, env=None, cwd=None, check=True):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECJAX_")}
  full_env.update(env or {})
  result = subprocess.run(
    [sys.executable, SWEEP_PY, *args], capture_output=True, text=True, check=False, env=full_env, cwd=cwd, timeout=60
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "configs" / "swept.py"
  path.parent.mkdir()
  path.write_text(CONFIG)
  return str(path)


def _flag(cmd, name):
  [value] = [w.split("=", 1)[1] for w in cmd if w.startswith(f"--config.{name}=")]
  return value


def test_sweep_dry_run_prints_one_command_per_run(config_file, tmp_path):
  base = str(tmp_path / "base")
  out = sweep(config_file, "--workdir", base, "--dry-run", "--", "--config.prompts=x.jsonl").stdout
  cmds = [shlex.split(line) for line in out.splitlines()]
  assert len(cmds) == 3
  for cmd in cmds:
    assert cmd[1:3] == ["-m", "specjax.main"] and cmd[-1] == "--config.prompts=x.jsonl"
  configs = [c[c.index("--config") + 1] for c in cmds]
  assert configs == [f"{config_file}:method=sps,gamma=4", f"{config_file}:method=ar", config_file]
  assert _flag(cmds[0], "temperature") == "0.7"
  assert _flag(cmds[1], "mesh_shape") == "(2,-1,1)" and _flag(cmds[1], "warmup") == "false"
  assert "--config.prompts=data/de en.jsonl" in cmds[2]
  workdirs = [c[c.index("--workdir") + 1] for c in cmds]
  assert len(set(workdirs)) == 3 and all(os.path.dirname(w) == base for w in workdirs)
  assert os.path.basename(workdirs[0]) == "method-sps_gamma-4_temperature-0.7"
  # Deterministic: the same names on every expansion.
  assert sweep(config_file, "--workdir", base, "--dry-run", "--", "--config.prompts=x.jsonl").stdout == out
  # --only, and no mode at all is a dry run.
  only = sweep(config_file, "--workdir", base, "--only", "2").stdout.splitlines()
  assert only == [out.splitlines()[2].rsplit(" ", 1)[0]]


PARSE_CONFIG = """\
import sys
from absl import flags
from ml_collections import config_flags
config = config_flags.DEFINE_config_file("config")
flags.DEFINE_string("workdir", None, "")
flags.FLAGS(sys.argv)
c = config.value
print(repr((c.temperature, c.mesh_shape, c.warmup, c.prompts)))
"""


def test_sweep_flags_parse_back_in_ml_collections(config_file, tmp_path):
  """Each printed command, given to ml_collections' config flags, sets the values the sweep asked for."""
  parse = tmp_path / "parse.py"
  parse.write_text(PARSE_CONFIG)
  out = sweep(config_file, "--workdir", str(tmp_path), "--dry-run").stdout
  expected = [
    (0.7, (1, -1, 1), True, "p.jsonl"),
    (0.0, (2, -1, 1), False, "p.jsonl"),
    (0.0, (1, -1, 1), True, "data/de en.jsonl"),
  ]
  for line, want in zip(out.splitlines(), expected, strict=True):
    cmd = shlex.split(line)
    result = subprocess.run(
      [sys.executable, str(parse), *cmd[3:]], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(want)


def test_sweep_tpu_dry_run(tmp_path):
  # A copy of launch/ in a scratch "repository": --tpu wants the config inside the repository
  # (the workers get it from `tpu.sh copy`) and passes its repository-relative path.
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  (repo / "configs").mkdir()
  for name in ("sweep.py", "tpu.sh"):
    shutil.copy(os.path.join(REPO, "launch", name), repo / "launch" / name)
  (repo / "configs" / "swept.py").write_text(CONFIG)
  script = str(repo / "launch" / "sweep.py")

  result = subprocess.run(
    [
      sys.executable,
      script,
      str(repo / "configs" / "swept.py"),
      "--workdir",
      "gs://b/x",
      "--tpu",
      "mytpu",
      "--dry-run",
    ],
    capture_output=True,
    text=True,
    check=False,
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  cmds = [shlex.split(line) for line in result.stdout.splitlines()]
  assert len(cmds) == 3
  for cmd in cmds:
    assert cmd[0] == str(repo / "launch" / "tpu.sh")
    assert cmd[1:6] == ["run", "mytpu", "--wait", "--skip-done", "--workdir"] and cmd[7] == "--"
    assert cmd[6].startswith("gs://b/x/") and cmd[8].startswith("configs/swept.py")
  assert cmds[1][8:] == ["configs/swept.py:method=ar", "--config.mesh_shape=(2,-1,1)", "--config.warmup=false"]
  assert len({cmd[6] for cmd in cmds}) == 3

  outside = tmp_path / "c.py"
  outside.write_text(CONFIG)
  result = subprocess.run(
    [sys.executable, script, str(outside), "--workdir", "w", "--tpu", "mytpu", "--dry-run"],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 2 and "inside the repository" in result.stderr


FAKE_MAIN = """\
import os, sys
workdir = sys.argv[sys.argv.index("--workdir") + 1]
with open(os.environ["CALLS"], "a") as f:
  f.write(os.path.basename(workdir) + "\\n")
os.makedirs(workdir, exist_ok=True)
sys.exit(3 if os.path.basename(workdir) == os.environ.get("FAIL_RUN") else 0)
"""


def test_sweep_local_resumes_and_stops_at_a_failure(config_file, tmp_path):
  fake = tmp_path / "fake_main.py"
  fake.write_text(FAKE_MAIN)
  calls = tmp_path / "calls.txt"
  base = tmp_path / "base"
  runner = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}"
  names = [
    os.path.basename(shlex.split(line)[shlex.split(line).index("--workdir") + 1])
    for line in sweep(config_file, "--workdir", str(base), "--dry-run").stdout.splitlines()
  ]

  def calls_made():
    made = calls.read_text().split() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return made

  # Run 1 fails: the sweep stops with its status, run 2 never starts, no DONE for run 1.
  result = sweep(
    config_file,
    "--workdir",
    str(base),
    "--local",
    "--runner",
    runner,
    env={"CALLS": str(calls), "FAIL_RUN": names[1]},
    check=False,
  )
  assert result.returncode == 3 and f"run 1 ({names[1]}) failed" in result.stderr
  assert calls_made() == names[:2]
  assert (base / names[0] / "DONE").exists() and not (base / names[1] / "DONE").exists()

  # The same command again resumes: run 0 is skipped. The runner may also come from the environment.
  result = sweep(
    config_file, "--workdir", str(base), "--local", env={"CALLS": str(calls), "SPECJAX_SWEEP_RUNNER": runner}
  )
  assert calls_made() == names[1:] and "DONE exists, skipping" in result.stderr
  assert all((base / n / "DONE").exists() for n in names)

  # Everything done: nothing runs; the dry run marks the finished runs.
  sweep(config_file, "--workdir", str(base), "--local", "--runner", runner, env={"CALLS": str(calls)})
  assert calls_made() == []
  out = sweep(config_file, "--workdir", str(base), "--dry-run").stdout
  assert all(line.startswith("# done: ") for line in out.splitlines())


def test_sweep_without_sweep_function(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text("def get_config(arg=None):\n  return None\n")
  result = sweep(str(path), "--workdir", str(tmp_path / "w"), "--dry-run", check=False)
  assert result.returncode == 2 and f"{path}: no sweep() function" in result.stderr


@pytest.mark.parametrize(
  "body, message",
  [
    ("[{'a': 1}, 'temperature=0.7']", "sweep() entry 1: expected a dict"),
    ("[{'a': 1}, {'b': 2}, {3: 'x'}]", "sweep() entry 2: key 3 is not a string"),
    ("[{'config_arg': 5}]", "sweep() entry 0: config_arg must be a string"),
    ("[{'bad key': 1}]", "sweep() entry 0: key 'bad key' is not a config field name"),
    ("[{'a': None}]", "sweep() entry 0, key 'a': None cannot be set"),
    ("[{'a': 1}, {'a': 1}]", "sweep() entries 0 and 1 are the same run"),
    ("{'a': 1}", "sweep() returned dict"),
    ("[]", "sweep() returned no runs"),
  ],
)
def test_sweep_bad_entries(tmp_path, body, message):
  path = tmp_path / "bad.py"
  path.write_text(f"def sweep():\n  return {body}\n")
  result = sweep(str(path), "--workdir", str(tmp_path / "w"), "--dry-run", check=False)
  assert result.returncode == 2 and message in result.stderr and str(path) in result.stderr, result.stderr


def test_sweep_bad_command_line(config_file, tmp_path):
  result = sweep(config_file, "--workdir", str(tmp_path), "--only", "7", check=False)
  assert result.returncode == 2 and "the sweep has runs 0 to 2" in result.stderr
  result = sweep(config_file, check=False)  # no --workdir
  assert result.returncode == 2 and "usage:" in result.stderr
  result = sweep(config_file, "--workdir", "w", "--local", "--tpu", "t", check=False)
  assert result.returncode == 2


def _load_sweep_module():
  spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP_PY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_run_names_are_sanitised_unique_and_deterministic():
  module = _load_sweep_module()
  runs = module.expand(
    "c.py",
    [
      {"config_arg": "method=sps", "target": "/ckpt/a b"},
      {"target": "x/y"},
      {"target": "x y"},
      {},
      {"target": "z" * 200},
    ],
  )
  names = [r["name"] for r in runs]
  assert names[0] == "method-sps_target-ckpt-a-b"
  assert names[1].startswith("target-x-y-") and names[2].startswith("target-x-y-") and names[1] != names[2]
  assert names[3] == "default" and len(names[4]) == module.MAX_NAME + 9
  # A collision's suffix depends on the entry only, not on its position in the sweep.
  again = module.expand("c.py", [{"target": "x y"}, {"target": "x/y"}])
  assert [r["name"] for r in again] == [names[2], names[1]]
  assert module.render((True, "a", 1.5), "w") == "(True,'a',1.5)" and module.render([3], "w") == "(3,)"
