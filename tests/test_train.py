"""The drafter trainer: losses, the sharded step, checkpoints, exact resume, NaN stop, metrics."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from specjax import sharding as shd
from specjax.errors import SpecjaxError
from specjax.jobs import train as trainer
from specjax.train import losses
from specjax.train.checkpoint import Checkpointer
from specjax.train.step import StepSpec, init_state, jit_train_step, make_train_step
from specjax.train.writers import read_metrics
from tests.helpers import random_model, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import finetune as finetune_config  # noqa: E402
from configs import pretrain as pretrain_config  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A tokenizer trained on the embedded corpus and a random tiny target that uses it."""
  from specjax.jobs import local_assets

  root = tmp_path_factory.mktemp("train_assets")
  local_assets.ensure_corpus_checkpoints(str(root / "target"))
  return str(root / "target")


def _config(assets, **fields):
  c = pretrain_config.get_config("runlocal,steps=8")
  c.unlock()
  c.target = assets
  c.local_assets = False
  c.log_every = 1
  c.eval_every = 0
  c.tensorboard = False
  c.acceptance_prompts = ""
  c.shuffle_buffer_size = 200
  for k, v in fields.items():
    c[k] = v
  return c


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["kind"] == "train"}


# --- losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward_kl", "total_variation"])
def test_distillation_loss_and_gradient_vanish_for_identical_models(kind):
  model = random_model(tiny_config())
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)), jnp.int32)
  target_logits = model(tokens)

  def loss_fn(p):
    return jnp.mean(losses.token_losses(kind, nnx.merge(graphdef, p)(tokens), tokens, target_logits))

  value, grads = jax.value_and_grad(loss_fn)(params)
  assert abs(float(value)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
  # and it is a real divergence: another model is at positive distance with a nonzero gradient
  other_logits = random_model(tiny_config(), seed=1)(tokens)
  value, grads = jax.value_and_grad(
    lambda p: jnp.mean(losses.token_losses(kind, nnx.merge(graphdef, p)(tokens), tokens, other_logits))
  )(params)
  assert float(value) > 1e-3
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-6


def test_losses_match_their_definitions():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(1, 3, 7)), rng.normal(size=(1, 3, 7))
  p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
  q = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  np.testing.assert_allclose(losses.forward_kl(jnp.asarray(s), jnp.asarray(t)), (p * np.log(p / q)).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(
    losses.total_variation(jnp.asarray(s), jnp.asarray(t)), 0.5 * np.abs(p - q).sum(-1), rtol=1e-5
  )
  targets = np.array([[0, 3, 6]])
  np.testing.assert_allclose(
    losses.cross_entropy(jnp.asarray(s), jnp.asarray(targets)),
    -np.log(np.take_along_axis(q, targets[..., None], -1)[..., 0]),
    rtol=1e-5,
  )
  with pytest.raises(SpecjaxError, match="needs the target"):
    losses.token_losses("forward_kl", jnp.asarray(s), jnp.asarray(targets))


# --- the step -------------------------------------------------------------------------------


def _packed_batch(vocab, A=2, b=4, L=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (A, b, L)).astype(np.int32)
  segments = np.where(np.arange(L) < L // 2, 1, 2)[None, None].repeat(A, 0).repeat(b, 1).astype(np.int32)
  segments[..., -2:] = 0  # padding
  positions = np.where(segments == 1, np.arange(L), np.arange(L) - L // 2).astype(np.int32)
  return {
    "decoder_input_tokens": tokens,
    "decoder_target_tokens": np.roll(tokens, -1, -1),
    "decoder_loss_weights": (segments > 0).astype(np.int32),
    "decoder_positions": positions,
    "decoder_segment_ids": segments,
  }


@pytest.mark.parametrize("loss", ["cross_entropy", "total_variation"])
def test_sharded_step_equals_single_device_step(loss):
  cfg = tiny_config()
  graphdef, params = nnx.split(random_model(cfg), nnx.Param)
  target = random_model(cfg, seed=3)
  target_graphdef, target_params = nnx.split(target)
  # Clipped SGD: linear in the gradient, so the comparison tests the sharded gradient itself
  # (Adam's first steps are ~sign(g), which turns 1e-9 noise in a near-zero gradient into a full step).
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
  spec = StepSpec(loss=loss, with_target=loss != "cross_entropy")
  step = make_train_step(
    graphdef, target_graphdef if spec.with_target else None, tx, optax.constant_schedule(1e-2), spec
  )
  batch = _packed_batch(cfg.vocab_size)
  shapes = {k: v.shape for k, v in batch.items()}
  tp = target_params if spec.with_target else None
  outs = []
  for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (2, 2, 2))):
    mesh = shd.make_mesh(shape, devices)
    state = init_state(jax.tree.map(jnp.array, params), tx, 0)
    fn, state_sh = jit_train_step(step, state, tp, shapes, mesh)
    state = jax.device_put(state, state_sh)
    for _ in range(2):
      state, metrics = fn(state, tp, batch)
    outs.append(jax.device_get((state["params"], metrics)))
  (p1, m1), (p8, m8) = outs
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)


def test_gradient_accumulation_equals_one_large_batch():
  cfg = tiny_config()
  graphdef, params = nnx.split(random_model(cfg), nnx.Param)
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(graphdef, None, tx, optax.constant_schedule(0.1), StepSpec()))
  batch = _packed_batch(cfg.vocab_size, A=4, b=2)
  whole = {k: v.reshape(1, 8, -1) for k, v in batch.items()}
  a, ma = step(init_state(params, tx, 0), None, batch)
  b, mb = step(init_state(params, tx, 0), None, whole)
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, atol=1e-6)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


def test_packed_segments_do_not_see_each_other():
  model = random_model(tiny_config())
  rng = np.random.default_rng(0)
  first, second = rng.integers(1, 200, 6), rng.integers(1, 200, 5)
  packed = jnp.asarray(np.concatenate([first, second])[None], jnp.int32)
  segments = jnp.asarray([[1] * 6 + [2] * 5], jnp.int32)
  positions = jnp.asarray([list(range(6)) + list(range(5))], jnp.int32)
  logits = model(packed, positions_BT=positions, segment_ids_BT=segments)
  alone = model(jnp.asarray(second[None], jnp.int32))
  np.testing.assert_allclose(logits[0, 6:], alone[0], atol=1e-5)


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
  graphdef, params = nnx.split(random_model(tiny_config()), nnx.Param)
  tx = optax.adamw(1e-3)
  state = init_state(params, tx, seed=7)
  state["opt_state"] = tx.update(jax.tree.map(jnp.ones_like, params), state["opt_state"], params)[1]
  ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, {"step": step})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 3]  # keep the last 2
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored, meta = ckpt.restore(zeros)
  ckpt.close()
  assert meta["step"] == 3
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_under_a_relative_workdir(tmp_path, monkeypatch):
  """orbax rejects relative paths only when the first save is written (minutes into a run)."""
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(4.0)}
  ckpt = Checkpointer(os.path.join("runs", "rel", "checkpoints"), save_every=1, keep=1)
  ckpt.save(1, state, {"step": 1})
  ckpt.close()
  assert os.path.isdir(tmp_path / "runs" / "rel" / "checkpoints" / "1")
  restored, _ = Checkpointer("runs/rel/checkpoints", save_every=1, keep=1).restore(state)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))


# --- the trainer end to end ----------------------------------------------------------------


def test_loss_falls_on_shared_data(assets, shared_data, tmp_path):
  c = _config(
    assets,
    data_dir=shared_data,
    data_limit=300,
    num_train_steps=30,
    learning_rate=5e-3,
    drafter="preset:tiny",
    checkpoint_every=100,
  )
  trainer.run(c, str(tmp_path))
  per_step = _losses(str(tmp_path))
  first, last = np.mean([per_step[s] for s in (1, 2, 3)]), np.mean([per_step[s] for s in (28, 29, 30)])
  assert last < first - 0.5, (first, last)
  assert os.path.exists(tmp_path / "drafter" / "model.safetensors")


def test_kill_and_resume_continues_the_same_losses(assets, tmp_path):
  full, split = tmp_path / "full", tmp_path / "split"
  trainer.run(_config(assets, checkpoint_every=100), str(full))
  out = trainer.run(_config(assets, checkpoint_every=100, max_steps_this_run=3), str(split))
  assert out["step"] == 3 and not out["finished"]
  assert not os.path.exists(split / "drafter")  # exported only when finished
  out = trainer.run(_config(assets, checkpoint_every=100), str(split))
  assert out["finished"]
  a, b = _losses(str(full)), _losses(str(split))
  assert sorted(a) == sorted(b) == list(range(1, 9))  # each step logged once
  for step in range(4, 9):
    assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
  # and the exported drafters are the same weights
  from safetensors.numpy import load_file

  wa, wb = (
    load_file(str(full / "drafter" / "model.safetensors")),
    load_file(str(split / "drafter" / "model.safetensors")),
  )
  for k in wa:
    np.testing.assert_allclose(wa[k], wb[k], atol=1e-6)


def test_sigterm_saves_and_the_rerun_resumes(assets, tmp_path):
  """TPU preemption: SIGTERM mid-run saves a checkpoint; the same command then finishes."""
  workdir = tmp_path / "run"
  args = [
    sys.executable,
    "-m",
    "specjax.main",
    "--config",
    "configs/pretrain.py:runlocal,steps=400",
    "--workdir",
    str(workdir),
    f"--config.target={assets}",
    "--config.local_assets=false",
    "--config.eval_every=0",
    "--config.checkpoint_every=1000",
    "--config.log_every=1",
    "--config.acceptance_prompts=",
    "--config.shuffle_buffer_size=200",
    "--config.tensorboard=false",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output[-3000:]
  steps = [int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints" / "[0-9]*"))]
  assert len(steps) == 1 and 5 <= steps[0] < 400, (steps, output[-2000:])
  logged = _losses(str(workdir))
  assert max(logged) == steps[0]  # the checkpoint is at the last logged step
  assert not (workdir / "drafter").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
  real = trainer.make_optimizer

  def poisoned(config, total_steps):
    tx, schedule = real(config, total_steps)

    def update(updates, state, params=None):
      count, inner = state
      updates, inner = tx.update(updates, inner, params)
      factor = jnp.where(count >= 5, jnp.nan, 1.0)  # the 6th update turns the weights to NaN
      return jax.tree.map(lambda u: u * factor, updates), (count + 1, inner)

    return optax.GradientTransformation(lambda p: (jnp.zeros((), jnp.int32), tx.init(p)), update), schedule

  monkeypatch.setattr(trainer, "make_optimizer", poisoned)
  c = _config(assets, checkpoint_every=2)
  with pytest.raises(SpecjaxError, match=r"step 6: the loss or gradient is not finite.*last good checkpoint is step 4"):
    trainer.run(c, str(tmp_path))
  assert sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))) == [2, 4]


def test_metrics_acceptance_and_tensorboard(assets, tmp_path):
  c = _config(
    assets,
    num_train_steps=4,
    log_every=2,
    eval_every=4,
    tensorboard=True,
    eval_batches=1,
    acceptance_prompts="heldout:de,ja",
    acceptance_prompts_per_language=2,
    acceptance_max_new_tokens=8,
    acceptance_temperatures=(0.0, 1.0),
    loss="forward_kl",
  )
  trainer.run(c, str(tmp_path))
  records = read_metrics(str(tmp_path))
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [2, 4]
  for r in train:
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "cross_entropy", "target_agreement"):
      assert np.isfinite(r[key]), key
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [0, 4]
  for r in evals:
    for T in ("T0", "T1"):
      assert r[f"accept/{T}/tau"] >= 1.0
      assert len(r[f"accept/{T}/per_position"]) == c.acceptance_gamma
      assert f"accept/{T}/deen/tau" in r and f"accept/{T}/jaen/tau" in r
    assert 0.0 <= r["eval/token_accuracy"] <= 1.0
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_config_errors(assets, tmp_path):
  with pytest.raises(SpecjaxError, match="`loss`='kl'"):
    trainer.run(_config(assets, loss="kl"), str(tmp_path))
  with pytest.raises(SpecjaxError, match="unknown preset"):
    trainer.run(_config(assets, drafter="preset:vicuna-69m"), str(tmp_path))
  with pytest.raises(SpecjaxError, match="must split into equal micro-batches"):
    trainer.run(_config(assets, grad_accumulation=3), str(tmp_path))
  with pytest.raises(SpecjaxError, match=r"drafter_config.json not found \(is it a specjax training run"):
    trainer.run(_config(assets, drafter=f"run:{tmp_path}/nothing"), str(tmp_path / "x"))


def test_finetune_starts_from_a_pretraining_run(assets, tmp_path):
  trainer.run(_config(assets, num_train_steps=3, checkpoint_every=3), str(tmp_path / "pretrain"))
  c = finetune_config.get_config("runlocal,lang=fr,steps=2")
  c.unlock()
  c.update(
    target=assets,
    local_assets=False,
    drafter="run:{workdir}/../pretrain",
    eval_every=0,
    tensorboard=False,
    shuffle_buffer_size=200,
    log_every=1,
  )
  out = trainer.run(c, str(tmp_path / "finetune"))
  assert out["finished"] and c.mixture == "finetune_fr_en"
  c.sequence_length = 64  # no Vicuna-template prompt fits in 32 tokens: an error, not an endless wait
  with pytest.raises(SpecjaxError, match="yields no example at sequence_length=64"):
    trainer.run(c, str(tmp_path / "finetune_short"))


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_every_config_loads_with_and_without_runlocal(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in (None, "runlocal"):
    c = module.get_config(arg)
    assert c.job in __import__("specjax.main", fromlist=["JOBS"]).JOBS
    assert bool(c.get("local_assets")) == (arg == "runlocal")
  assert module.__doc__ and "python -m specjax.main --config configs/" in module.__doc__
  if hasattr(module, "sweep"):
    runs = module.sweep()
    assert runs and all(isinstance(r, dict) for r in runs)
    for r in runs:
      module.get_config(r.get("config_arg"))
