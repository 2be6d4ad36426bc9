"""Multi-host on one machine: two CPU processes joined through a coordinator on 127.0.0.1 (gloo
collectives), 4 devices each, run the same CLI commands a TPU pod's workers run. Their training
losses and speculative outputs must equal one process holding the same 8-device mesh, and a
process that dies must make the other exit with an error instead of hanging."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from specjax.train.writers import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("SPECJAX_")}
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    TF_CPP_MIN_LOG_LEVEL="3",
    **extra,
  )
  return env


def _specjax(args, env, **kw):
  return subprocess.Popen(
    [sys.executable, "-m", "specjax.main", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def _run_pair(args_for, timeout=420):
  """Starts processes 0 and 1 of a 2-process run; returns their outputs (both must exit 0)."""
  port = _free_port()
  procs = [
    _specjax(
      args_for(i),
      _env(
        4,
        SPECJAX_COORDINATOR=f"127.0.0.1:{port}",
        SPECJAX_NUM_PROCESSES="2",
        SPECJAX_PROCESS_ID=str(i),
        SPECJAX_HEARTBEAT_TIMEOUT="15",
      ),
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  return outputs


def _single(args, timeout=420):
  p = _specjax(args, _env(8))
  out = p.communicate(timeout=timeout)[0]
  assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  from specjax.jobs import local_assets

  root = tmp_path_factory.mktemp("multihost_assets")
  local_assets.ensure_corpus_checkpoints(str(root / "target"))
  local_assets.ensure_checkpoints(
    [(str(root / "gen" / "target"), "tiny"), (str(root / "gen" / "drafter"), "tiny-drafter")]
  )
  local_assets.ensure_question_file(str(root / "gen" / "question.jsonl"))
  return root


def test_two_processes_train_and_decode_like_one(assets, tmp_path):
  train = lambda workdir: [
    "--config",
    "configs/pretrain.py:runlocal,steps=4",
    "--workdir",
    str(workdir),
    f"--config.target={assets / 'target'}",
    "--config.local_assets=false",
    "--config.mesh_shape=(2,2,2)",
    "--config.data_shards=2",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.tensorboard=false",
    "--config.acceptance_prompts=",
    "--config.shuffle_buffer_size=200",
    "--config.checkpoint_every=2",
  ]
  generate = lambda workdir, T: [
    "--config",
    f"configs/generate.py:runlocal,method=sps,temperature={T}",
    "--workdir",
    str(workdir),
    f"--config.target={assets / 'gen' / 'target'}",
    f"--config.drafter={assets / 'gen' / 'drafter'}",
    f"--config.prompts={assets / 'gen' / 'question.jsonl'}",
    "--config.local_assets=false",
    "--config.batch_size=8",
    "--config.warmup=false",
    "--config.mesh_shape=(1,-1,1)",
  ]
  _single(train(tmp_path / "one"))
  _run_pair(lambda i: train(tmp_path / "two"))
  one, two = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
  losses = lambda rs: [r["loss"] for r in rs if r["kind"] == "train"]
  assert len(losses(one)) == 4
  np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5, atol=1e-6)
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints"))[:2] == ["2", "4"]
  assert (tmp_path / "two" / "drafter" / "model.safetensors").exists()

  for T in (0.0, 1.0):
    _single(generate(tmp_path / f"gen_one_{T}", T))
    _run_pair(lambda i: generate(tmp_path / f"gen_two_{T}", T))
    read = lambda d: [json.loads(line)["token_ids"] for line in open(d / "answers.jsonl", encoding="utf-8")]
    assert read(tmp_path / f"gen_two_{T}") == read(tmp_path / f"gen_one_{T}")


def test_a_dead_process_stops_the_other(assets, tmp_path):
  """Process 1 is killed mid-run; process 0 must exit non-zero within the heartbeat bound."""
  port = _free_port()
  args = [
    "--config",
    "configs/pretrain.py:runlocal,steps=100000",
    "--workdir",
    str(tmp_path / "run"),
    f"--config.target={assets / 'target'}",
    "--config.local_assets=false",
    "--config.data_shards=2",
    "--config.eval_every=0",
    "--config.tensorboard=false",
    "--config.acceptance_prompts=",
    "--config.shuffle_buffer_size=200",
    "--config.log_every=1",
    "--config.checkpoint_every=100000",
  ]
  env = lambda i: _env(
    4,
    SPECJAX_COORDINATOR=f"127.0.0.1:{port}",
    SPECJAX_NUM_PROCESSES="2",
    SPECJAX_PROCESS_ID=str(i),
    SPECJAX_HEARTBEAT_TIMEOUT="10",
  )
  procs = [_specjax(args, env(i)) for i in range(2)]
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.5)
  assert metrics.exists(), procs[0].communicate(timeout=5)[0][-3000:] if procs[0].poll() is not None else "no start"
  procs[1].kill()
  killed_at = time.time()
  try:
    out = procs[0].communicate(timeout=90)[0]
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("process 0 still running 90 s after process 1 died")
  waited = time.time() - killed_at
  assert procs[0].returncode != 0, out[-2000:]
  assert waited < 90
  procs[1].communicate()
