"""Faults a long run meets (issue 14), through the CLI in a subprocess: a SIGKILL while a
checkpoint is being saved, while distill_data writes a shard and while the generate job writes
its answers (the rerun of the same command finishes with what an uninterrupted run gives), and a
full disk while saving a checkpoint and while writing answers (one `specjax: error:` line naming
the path, exit status 2, no traceback; after space is freed the rerun resumes). The full-disk
cases mount a small tmpfs, which needs root (CAP_SYS_ADMIN): elsewhere they skip, saying so.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
  os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="3"
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A tiny random target (corpus-trained tokenizer) and the local question file."""
  from specjax.jobs import local_assets

  root = tmp_path_factory.mktemp("fault_assets")
  local_assets.ensure_corpus_checkpoints(str(root / "target"))
  local_assets.ensure_question_file(str(root / "question.jsonl"))
  return root


def _train_cmd(assets, workdir):
  return [
    sys.executable,
    "-m",
    "specjax.main",
    "--config",
    "configs/pretrain.py:runlocal,steps=6",
    "--config.local_assets=False",
    f"--config.target={assets / 'target'}",
    "--config.eval_every=0",
    "--config.tensorboard=False",
    "--config.acceptance_prompts=",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.export_hf=False",
    "--config.shuffle_buffer_size=200",
    "--workdir",
    str(workdir),
  ]


def _generate_cmd(assets, workdir):
  return [
    sys.executable,
    "-m",
    "specjax.main",
    "--config",
    "configs/generate.py:runlocal,method=ar",
    "--config.local_assets=False",
    f"--config.target={assets / 'target'}",
    "--config.drafter=",
    f"--config.prompts={assets / 'question.jsonl'}",
    "--config.batch_size=1",
    "--config.max_new_tokens=8",
    "--config.warmup=False",
    "--workdir",
    str(workdir),
  ]


def _distill_cmd(assets, workdir):
  return [
    sys.executable,
    "-m",
    "specjax.main",
    "--config",
    "configs/distill_data.py:runlocal",
    "--config.local_assets=False",
    f"--config.target={assets / 'target'}",
    "--config.data_dir=specjax/assets/corpus",
    "--workdir",
    str(workdir),
  ]


def _distilled(workdir):
  from specjax.data.selfdistill import read_records

  return list(read_records(str(workdir)))


def _run(cmd, timeout=300):
  proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stderr


def _killed_when(cmd, ready, timeout=300) -> str:
  """Starts cmd and SIGKILLs it the moment ready() holds (polled every few ms); returns its stderr."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + timeout
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      if ready():
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.005)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, f"finished before the kill point (rc {proc.returncode}): {err[-3000:]}"
  return err


def _losses(workdir):
  from specjax.train.writers import read_metrics

  return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["kind"] == "train"}


def _answers(workdir):
  with open(os.path.join(workdir, "answers.jsonl"), encoding="utf-8") as f:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in f]


def _lines(path) -> int:
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except OSError:
    return 0


def _assert_one_clear_error(code, err, *culprits):
  assert code == 2, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("specjax: error:")]
  assert len(lines) == 1, err[-3000:]
  for culprit in culprits:
    assert culprit in lines[0], (culprit, lines[0])


@pytest.fixture(scope="module")
def uninterrupted_training(assets, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("train_full") / "run"
  code, err = _run(_train_cmd(assets, workdir))
  assert code == 0, err[-3000:]
  return _losses(workdir)


@pytest.fixture(scope="module")
def uninterrupted_answers(assets, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("generate_full") / "run"
  code, err = _run(_generate_cmd(assets, workdir))
  assert code == 0, err[-3000:]
  return _answers(workdir)


# --- SIGKILL ---------------------------------------------------------------------------------


@pytest.mark.slow  # about 2 minutes on 2 cores: three training runs in subprocesses
def test_sigkill_during_a_checkpoint_save_then_resume(assets, uninterrupted_training, tmp_path):
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  # the moment the first save puts anything in the checkpoints folder (orbax's temporary step
  # directory, as a rule): the kill lands inside the save
  _killed_when(_train_cmd(assets, workdir), lambda: checkpoints.is_dir() and any(checkpoints.iterdir()))
  code, err = _run(_train_cmd(assets, workdir))
  assert code == 0 and "Traceback" not in err, err[-3000:]
  assert _losses(workdir) == uninterrupted_training  # every step once, the same losses


def test_sigkill_while_writing_answers_then_resume(assets, uninterrupted_answers, tmp_path):
  workdir = tmp_path / "run"
  _killed_when(_generate_cmd(assets, workdir), lambda: _lines(workdir / "answers.jsonl") >= 3)
  assert 3 <= _lines(workdir / "answers.jsonl") < len(uninterrupted_answers)
  code, err = _run(_generate_cmd(assets, workdir))
  assert code == 0 and "Traceback" not in err, err[-3000:]
  assert "resuming" in err
  assert _answers(workdir) == uninterrupted_answers


@pytest.mark.slow  # about a minute on 2 cores: three distill_data runs in subprocesses
def test_sigkill_during_a_shard_write_then_resume(assets, tmp_path):
  full = tmp_path / "full"
  code, err = _run(_distill_cmd(assets, full))
  assert code == 0, err[-3000:]
  expected = _distilled(full)
  assert len(expected) == 24 * 4 and [r["record_id"] for r in expected] == list(range(96))

  workdir = tmp_path / "run"
  data = workdir / "data"
  # the moment the first shard's file appears (its .tmp, as a rule): the kill lands inside the write
  _killed_when(_distill_cmd(assets, workdir), lambda: data.is_dir() and any(data.iterdir()))
  assert len(list(data.glob("*.jsonl"))) < 4  # killed before the last shard
  code, err = _run(_distill_cmd(assets, workdir))
  assert code == 0 and "Traceback" not in err, err[-3000:]
  assert not list(data.glob("*.tmp"))
  assert _distilled(workdir) == expected  # every record once, in order, the same responses
  with open(workdir / "manifest.json", encoding="utf-8") as f:
    manifest = json.load(f)
  assert (manifest["records"], manifest["shards_done"]) == (96, 4)


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MiB tmpfs (root only); skips with the reason where it cannot be mounted."""
  mount = tmp_path / "disk"
  mount.mkdir()
  proc = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True, check=False
  )
  if proc.returncode != 0:
    pytest.skip(
      f"cannot mount a small tmpfs here ({(proc.stderr or proc.stdout).strip() or 'mount failed'}); "
      "the full-disk cases need root"
    )
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk, leave: int) -> str:
  """Fills the file system but `leave` bytes; returns the filler's path (remove it to free space)."""
  st = os.statvfs(disk)
  free = st.f_bavail * st.f_frsize
  filler = os.path.join(disk, "filler")
  with open(filler, "wb") as f:
    f.write(b"\0" * max(0, free - leave))
  return filler


def test_full_disk_while_saving_a_checkpoint(assets, small_disk):
  workdir = small_disk / "run"
  _fill(small_disk, 96 << 10)  # room for the logs, not for a checkpoint of the drafter and its optimizer state
  code, err = _run(_train_cmd(assets, workdir))
  _assert_one_clear_error(code, err, str(workdir / "checkpoints"), "No space left on device")


def test_full_disk_while_writing_answers_then_resume(assets, uninterrupted_answers, small_disk):
  workdir = small_disk / "run"
  filler = _fill(small_disk, 16 << 10)  # room for the journal's header and a few batches
  code, err = _run(_generate_cmd(assets, workdir))
  _assert_one_clear_error(code, err, str(workdir), "No space left on device", "rerun the same command")
  done = _lines(workdir / "answers.jsonl")
  assert 0 < done < len(uninterrupted_answers)  # the batches before the disk filled are kept
  os.remove(filler)
  code, err = _run(_generate_cmd(assets, workdir))
  assert code == 0 and "Traceback" not in err, err[-3000:]
  assert _answers(workdir) == uninterrupted_answers
