"""Bad input and faults, as a user meets them through the CLI (issue 14): one `specjax: error:`
line naming the culprit, exit status 2, no traceback, and no work started (nothing built in the
workdir); the generate job writes its answers as it goes and a rerun resumes them exactly; a
damaged latest training checkpoint is reported and skipped for the newest intact one.

The CLI cases run `specjax.main` in this process (absl's flags reset between calls): a
subprocess per case would import JAX each time.
"""

import contextlib
import glob
import io
import json
import os
import sys

import pytest

from specjax.errors import SpecjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reset_flags():
  from absl import flags

  for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # the previous call's overrides
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def cli(*args, monkeypatch) -> tuple[int | None, str]:
  """(exit status, stderr) of `python -m specjax.main ARGS`, run in this process."""
  from specjax import main

  argv = ["specjax.main", *args]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds --config.FIELD overrides there
  monkeypatch.chdir(REPO)
  _reset_flags()
  err = io.StringIO()
  code = 0
  with contextlib.redirect_stderr(err):
    try:
      main.main(main._parse_flags(argv))
    except SystemExit as e:
      code = e.code
    finally:
      _reset_flags()
  return code, err.getvalue()


def _assert_clear_error(code, err, *culprits):
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith("specjax: error:")]
  assert len(lines) == 1, err
  for culprit in culprits:
    assert culprit in lines[0], (culprit, lines[0])


# --- configs: fields, ranges, types, paths ---------------------------------------------------

# (config, overrides, words the one error line must hold). Each fails before any work: the
# runlocal variants would otherwise build their local assets in the workdir first.
CONFIG_CASES = [
  ("generate.py:runlocal", ["--config.gamm=3"], ["`gamm`", "did you mean `gamma`"]),
  ("generate.py:runlocal", ["--config.tmperature=0.5"], ["`tmperature`", "`temperature`"]),
  ("generate.py:runlocal", ["--config.target.path=x"], ["`target`", "no field `path`"]),
  ("generate.py:runlocal", ["--config.prompt_bucket=0"], ["`prompt_bucket`=0", ">= 1"]),
  ("generate.py:runlocal", ["--config.gamma=0"], ["`gamma`=0", ">= 1"]),
  ("generate.py:runlocal,gamma=0", [], ["`gamma`=0"]),  # used to become 10
  ("generate.py:runlocal", ["--config.gamma_start=-2"], ["`gamma_start`=-2"]),
  ("generate.py:runlocal", ["--config.max_new_tokens=-5"], ["`max_new_tokens`=-5"]),
  ("generate.py:runlocal,max_new_tokens=0", [], ["`max_new_tokens`=0"]),
  ("generate.py:runlocal", ["--config.batch_size=0"], ["`batch_size`=0"]),
  ("generate.py:runlocal", ["--config.temperature=-0.5"], ["`temperature`=-0.5", ">= 0"]),
  ("generate.py:runlocal", ["--config.top_p=0"], ["`top_p`"]),
  ("generate.py:runlocal", ["--config.max_cache_len=0"], ["`max_cache_len`=0"]),
  ("generate.py:runlocal", ["--config.dtype=float64"], ["`dtype`", "bfloat16"]),
  ("distill_data.py:runlocal", ["--config.batch_size=0"], ["`batch_size`=0"]),
  ("distill_data.py:runlocal", ["--config.temperatures=(0.0, -1.0)"], ["`temperatures`", "-1.0"]),
  ("distill_data.py:runlocal", ["--config.prompt_bucket=0"], ["`prompt_bucket`=0"]),
  (
    "distill_data.py:runlocal",
    ["--config.data_dir=/nonexistent/corpus"],
    ["`data_dir`", "/nonexistent/corpus", "does not exist"],
  ),
  ("pretrain.py:runlocal", ["--config.lerning_rate=1e-3"], ["`lerning_rate`", "`learning_rate`"]),
  ("pretrain.py:runlocal", ["--config.learning_rate=-1.0"], ["`learning_rate`"]),
  ("pretrain.py:runlocal,batch_size=0", [], ["`batch_size`=0"]),
  ("pretrain.py:runlocal", ["--config.data_dir=/nonexistent/corpus"], ["`data_dir`", "/nonexistent/corpus"]),
  ("finetune.py:runlocal", ["--config.sequence_length=0"], ["`sequence_length`=0"]),
  ("finetune.py:runlocal", ["--config.checkpoints_to_keep=0"], ["`checkpoints_to_keep`=0"]),
  ("eval_specbench.py:runlocal", ["--config.gamma_start=0"], ["`gamma_start`=0"]),
  ("eval_specbench.py:runlocal,temperature=-1", [], ["`temperatures`", "-1.0"]),
  ("eval_specbench.py:runlocal", ["--config.seeds=()"], ["`seeds`", "at least one"]),
  ("demo.py:scale=tiny", ["--config.gama=3"], ["`gama`", "`gamma`"]),
  ("demo.py:scale=tiny", ["--config.max_new_tokens=0"], ["`max_new_tokens`=0"]),
]


@pytest.mark.parametrize(
  "config, overrides, culprits", CONFIG_CASES, ids=[f"{c}{''.join(o)}" for c, o, _ in CONFIG_CASES]
)
def test_config_mistakes_fail_before_any_work(config, overrides, culprits, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  code, err = cli("--config", f"configs/{config}", *overrides, "--workdir", str(workdir), monkeypatch=monkeypatch)
  _assert_clear_error(code, err, *culprits)
  assert not (workdir / "local_assets").exists()  # refused before anything was built


def test_every_config_passes_validation_as_shipped():
  import importlib.util
  from specjax import validate

  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [None, "runlocal"] + [f"scale={s}" for s in getattr(module, "SCALES", {})]
    args += [r.get("config_arg") for r in (module.sweep() if hasattr(module, "sweep") else [])]
    for arg in args:
      validate.check_fields(module.get_config(arg))


# --- prompt files ----------------------------------------------------------------------------


@pytest.mark.parametrize("turns, turn_no", [([""], 1), (["   "], 1), (["Translate: Hallo", ""], 2)])
def test_empty_prompt_names_file_and_line(turns, turn_no, tmp_path, monkeypatch):
  questions = tmp_path / "empty_question.jsonl"
  questions.write_text(
    json.dumps({"question_id": "a", "category": "deen", "turns": ["Translate: Hallo"]})
    + "\n"
    + json.dumps({"question_id": "b", "category": "deen", "turns": turns})
    + "\n"
  )
  code, err = cli(
    "--config",
    "configs/generate.py:runlocal",
    f"--config.prompts={questions}",
    "--workdir",
    str(tmp_path / "work"),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, str(questions), "line 2", f"turn {turn_no}", "empty")
  assert not (tmp_path / "work" / "local_assets").exists()  # read before the models are built


# --- workdirs --------------------------------------------------------------------------------


def _read_only_dir(tmp_path) -> str:
  """A directory this process cannot write: chmod 555, or, for root (which chmod does not stop),
  a read-only system directory."""
  if os.geteuid() != 0:
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    return str(path)
  for path in ("/sys/kernel", "/sys", "/proc/1"):
    if os.path.isdir(path):
      try:
        with open(os.path.join(path, ".specjax-probe"), "w"):
          pass
      except OSError:
        return path
      os.remove(os.path.join(path, ".specjax-probe"))
  pytest.skip("no directory here that this user cannot write")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only"])
def test_workdir_that_cannot_hold_outputs(kind, tmp_path, monkeypatch):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory\n")
  workdir = {"file": str(a_file), "under_a_file": str(a_file / "run"), "read_only": None}[kind]
  workdir = workdir or _read_only_dir(tmp_path)
  code, err = cli("--config", "configs/generate.py:runlocal", "--workdir", workdir, monkeypatch=monkeypatch)
  _assert_clear_error(code, err, "--workdir", workdir)
  try:
    os.chmod(tmp_path / "read_only", 0o755)
  except OSError:
    pass


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS", "EACCES"])
def test_a_refused_write_no_job_wraps_is_one_line(errno_name, tmp_path, monkeypatch):
  """A full disk (or a read-only file system, or a permission) met by a write the jobs do not wrap
  themselves, e.g. before a trainer's first checkpoint: one line naming the file, exit 2."""
  import errno
  from specjax import main

  path = str(tmp_path / "metrics.jsonl")

  def job_that_writes(config, workdir):
    raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), path)

  monkeypatch.setattr(main, "run_job", job_that_writes)
  code, err = cli("--config", "configs/generate.py:runlocal", "--workdir", str(tmp_path), monkeypatch=monkeypatch)
  _assert_clear_error(code, err, path, os.strerror(getattr(errno, errno_name)), "resume")


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
  """An OSError that is not the storage refusing (a bug, say) keeps its traceback."""
  import errno
  from specjax import main

  def job(config, workdir):
    raise OSError(errno.EBADF, "Bad file descriptor")

  monkeypatch.setattr(main, "run_job", job)
  with pytest.raises(OSError, match="Bad file descriptor"):
    cli("--config", "configs/generate.py:runlocal", "--workdir", str(tmp_path), monkeypatch=monkeypatch)


# --- the generate job: answers as they go, resume ---------------------------------------------


@pytest.fixture(scope="module")
def generate_assets(tmp_path_factory):
  from specjax.jobs import local_assets

  root = tmp_path_factory.mktemp("bad_input_assets")
  local_assets.ensure_question_file(str(root / "question.jsonl"))
  local_assets.ensure_checkpoints([(str(root / "target"), "tiny")])
  return root


def _generate_config(assets, **fields):
  sys.path.insert(0, REPO)
  try:
    from configs import generate
  finally:
    sys.path.remove(REPO)
  c = generate.get_config("runlocal,method=ar")  # 11 first turns and 1 second: batches of 4 -> 3 + 1
  c.unlock()
  c.update(local_assets=False, target=str(assets / "target"), drafter=None, prompts=str(assets / "question.jsonl"))
  c.update(fields)
  return c


def _answers(workdir):
  with open(os.path.join(workdir, "answers.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_generate_writes_as_it_goes_and_resumes_exactly(generate_assets, tmp_path, monkeypatch):
  from specjax.jobs import generate as generate_job

  config = _generate_config(generate_assets)
  full = generate_job.run(config, str(tmp_path / "full"))

  decode = generate_job._decode_batch
  calls = []

  def killed_after_two(*args, **kwargs):
    calls.append(args[3]["lo"])
    if len(calls) == 3:
      raise KeyboardInterrupt  # the job is killed while decoding its third batch
    return decode(*args, **kwargs)

  split = tmp_path / "split"
  monkeypatch.setattr(generate_job, "_decode_batch", killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    generate_job.run(config, str(split))
  written = _answers(split)
  assert len(written) == 8  # the two finished batches' answers are on disk already
  with open(split / generate_job.JOURNAL, "a", encoding="utf-8") as f:
    f.write('{"kind": "batch", "turn": 0, "lo": 8, "answ')  # and a kill cut the journal mid-line

  calls.clear()
  monkeypatch.setattr(generate_job, "_decode_batch", lambda *a, **k: (calls.append(a[3]["lo"]), decode(*a, **k))[1])
  resumed = generate_job.run(config, str(split))
  assert calls == [8, 0]  # only the unfinished batches: turn 1's third batch, then turn 2's
  key = lambda a: (a["question_id"], a["turn"])
  strip = lambda answers: [{k: v for k, v in a.items() if k != "wall_s"} for a in answers]
  assert strip(_answers(split)) == strip(_answers(tmp_path / "full"))  # same answers, same order
  for k in ("new_tokens", "generations", "tau", "verification_steps", "by_category"):
    if k == "by_category":
      drop = lambda m: {
        c: {x: v for x, v in d.items() if x not in ("wall_s", "tokens_per_second")} for c, d in m.items()
      }
      assert drop(resumed[k]) == drop(full[k])
    else:
      assert resumed[k] == full[k], k
  assert sorted(map(key, _answers(split))) == sorted(map(key, _answers(tmp_path / "full")))

  calls.clear()  # a rerun of a finished job decodes nothing
  generate_job.run(config, str(split))
  assert calls == []


def test_generate_refuses_a_journal_of_other_settings(generate_assets, tmp_path):
  from specjax.jobs import generate as generate_job

  journal = tmp_path / generate_job.JOURNAL
  echo = generate_job._echo(_generate_config(generate_assets, max_new_tokens=8))
  journal.write_text(json.dumps({"kind": "header", "config": echo, "question_ids": []}) + "\n")
  with pytest.raises(SpecjaxError, match=r"other values of max_new_tokens \(8, now 16\)"):
    generate_job.run(_generate_config(generate_assets), str(tmp_path))


def test_generate_finds_an_unwritable_output_before_decoding(generate_assets, tmp_path, monkeypatch):
  from specjax.jobs import generate as generate_job

  (tmp_path / "answers.jsonl").mkdir()  # writing the answers fails, even for root
  monkeypatch.setattr(generate_job, "_load", lambda *a: pytest.fail("the models were loaded"))
  with pytest.raises(SpecjaxError, match="cannot write the answers"):
    generate_job.run(_generate_config(generate_assets), str(tmp_path))


# --- training checkpoints --------------------------------------------------------------------


def _damage(step_dir: str, kind: str) -> str:
  """Damages a saved step the way a full disk or an interrupted copy does; returns a word the
  report must name."""
  if kind == "truncated_data":
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    for path in files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return os.path.join("state", "ocdbt.process_0", "d")
  if kind == "truncated_data_no_sizes":  # a checkpoint saved before the sizes record
    os.remove(os.path.join(step_dir, "specjax_files.json"))
    _damage(step_dir, "truncated_data")
    return "OUT_OF_RANGE"
  if kind == "manifest_removed":
    os.remove(os.path.join(step_dir, "specjax_files.json"))
    for path in glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True):
      os.remove(path)
    return "state"
  if kind == "meta_garbled":
    os.remove(os.path.join(step_dir, "specjax_files.json"))
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
      f.write("{")
    return os.path.join("meta", "metadata")
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated_data", "truncated_data_no_sizes", "manifest_removed", "meta_garbled"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(kind, tmp_path, capfd):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from specjax.train.checkpoint import Checkpointer

  state = {"w": jnp.arange(1000.0), "b": {"x": jnp.ones((10, 10))}}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, jax.tree.map(lambda a: a + step, state), {"step": step})
  ckpt.close()
  culprit = _damage(str(tmp_path / "checkpoints" / "3"), kind)
  capfd.readouterr()

  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  restored, meta = ckpt.restore(state)
  assert meta["step"] == 2
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1000.0) + 2)
  out = capfd.readouterr()
  lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
  assert "Traceback" not in out.out + out.err, out.err
  assert len(lines) == 1, lines  # one line says it all
  assert "step 3" in lines[0] and "damaged" in lines[0] and culprit in lines[0] and "step 2" in lines[0]
  assert ckpt.latest_step() == 2 and os.path.isdir(tmp_path / "checkpoints.damaged" / "3")
  ckpt.save(3, state, {"step": 3})  # the run goes on and saves step 3 again
  ckpt.close()
  restored, meta = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3).restore(state)
  assert meta["step"] == 3


def test_checkpoint_that_does_not_fit_is_not_skipped_and_all_damaged_is_an_error(tmp_path, capfd):
  import jax.numpy as jnp
  from specjax.train.checkpoint import Checkpointer

  state = {"w": jnp.arange(10.0)}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  for step in (1, 2):
    ckpt.save(step, state, {"step": step})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3)
  with pytest.raises(SpecjaxError, match="/2: the checkpoint does not match this config"):
    ckpt.restore({"w": jnp.arange(12.0)})  # another model: an error, not a fallback to step 1
  for step in (1, 2):
    _damage(str(tmp_path / "checkpoints" / str(step)), "meta_garbled")
  with pytest.raises(SpecjaxError, match=r"every checkpoint .* is damaged: step 2 .*; step 1 .*remove the"):
    ckpt.restore(state)
  assert "Traceback" not in "".join(capfd.readouterr())


def test_trainer_resumes_from_the_newest_intact_checkpoint(tmp_path, capfd):
  from specjax.jobs import local_assets
  from specjax.jobs import train as trainer
  from specjax.train.writers import read_metrics
  from tests.test_train import _config

  assets = str(tmp_path / "assets" / "target")
  local_assets.ensure_corpus_checkpoints(assets)
  workdir = tmp_path / "run"
  trainer.run(_config(assets, num_train_steps=6, checkpoint_every=2, max_steps_this_run=4), str(workdir))
  _damage(str(workdir / "checkpoints" / "4"), "truncated_data")
  capfd.readouterr()
  out = trainer.run(_config(assets, num_train_steps=6, checkpoint_every=2), str(workdir))
  printed = "".join(capfd.readouterr())
  assert out["finished"] and out["step"] == 6
  assert "Traceback" not in printed
  assert "checkpoint step 4 is damaged" in printed and "resuming from step 2" in printed
  steps = [r["step"] for r in read_metrics(str(workdir)) if r["kind"] == "train"]
  assert steps == list(range(1, 7))  # steps 3 and 4 redone once, not logged twice


# --- target and drafter checkpoints ----------------------------------------------------------
# A model directory is checked by specjax before the tokenizer (which reads config.json through
# transformers) and before any weight is mapped: each damage below is one line naming the file
# and the field or tensor.


def _edit_json(path, change):
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  change(value)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)


def _edit_safetensors_header(path, change):
  """Rewrites a safetensors header in place (same length: padded with spaces), data untouched."""
  import struct

  with open(path, "rb") as f:
    raw = f.read()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8 : 8 + n])
  change(header)
  blob = json.dumps(header, separators=(",", ":")).encode()
  assert len(blob) <= n
  with open(path, "wb") as f:
    f.write(raw[:8] + blob + b" " * (n - len(blob)) + raw[8 + n :])


def _a_weight(header, part="layers.0.mlp.down_proj"):
  return next(k for k in header if part in k)


def _cut(path, keep):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(keep(size))


def _weights_end(path):
  import struct

  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
  return 8 + n


def _sharded(directory):
  """The single model.safetensors as two shards with an index, the second one missing."""
  from specjax.models import safetensors_io

  tensors = {k: v.copy() for k, v in safetensors_io.open_tensors(os.path.join(directory, "model.safetensors")).items()}
  os.remove(os.path.join(directory, "model.safetensors"))
  names = sorted(tensors)
  safetensors_io.save_file(
    {k: tensors[k] for k in names[:3]}, os.path.join(directory, "model-00001-of-00002.safetensors")
  )
  weight_map = {
    k: "model-00001-of-00002.safetensors" if i < 3 else "model-00002-of-00002.safetensors" for i, k in enumerate(names)
  }
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)


# name -> (damage(dir) -> the path the error must name (None: the directory), words the line must hold)
CHECKPOINT_DAMAGE = {
  "config_cut_midway": (
    lambda d: _cut(os.path.join(d, "config.json"), lambda n: n // 2) or "config.json",
    ["line ", "column ", "malformed JSON"],
  ),
  "config_empty": (lambda d: _cut(os.path.join(d, "config.json"), lambda n: 0) or "config.json", ["line 1, column 1"]),
  "config_not_an_object": (
    lambda d: open(os.path.join(d, "config.json"), "w").write("[1, 2]\n") and "config.json",
    ["expected a JSON object", "list"],
  ),
  "config_layers_a_string": (
    lambda d: _edit_json(os.path.join(d, "config.json"), lambda c: c.update(num_hidden_layers="2")) or "config.json",
    ["'num_hidden_layers'", "positive integer", "'2'"],
  ),
  "config_rope_theta_a_string": (
    lambda d: _edit_json(os.path.join(d, "config.json"), lambda c: c.update(rope_theta="1e4")) or "config.json",
    ["'rope_theta'", "positive number"],
  ),
  "config_tie_a_string": (
    lambda d: _edit_json(os.path.join(d, "config.json"), lambda c: c.update(tie_word_embeddings="no")) or "config.json",
    ["'tie_word_embeddings'", "true or false"],
  ),
  "config_hidden_size_missing": (
    lambda d: _edit_json(os.path.join(d, "config.json"), lambda c: c.pop("hidden_size")) or "config.json",
    ["'hidden_size'", "missing"],
  ),
  "config_removed": (lambda d: os.remove(os.path.join(d, "config.json")), ["no config.json"]),
  "generation_config_cut": (
    lambda d: _cut(os.path.join(d, "generation_config.json"), lambda n: n - 3) or "generation_config.json",
    ["malformed JSON"],
  ),
  "weights_cut_short": (
    lambda d: _cut(os.path.join(d, "model.safetensors"), lambda n: n // 2) or "model.safetensors",
    ["truncated"],
  ),
  "weights_cut_in_header": (
    lambda d: _cut(os.path.join(d, "model.safetensors"), lambda n: 100) or "model.safetensors",
    ["truncated"],
  ),
  "weights_cut_to_4_bytes": (
    lambda d: _cut(os.path.join(d, "model.safetensors"), lambda n: 4) or "model.safetensors",
    ["not a safetensors file"],
  ),
  "weights_dtype_i32": (
    lambda d: (
      _edit_safetensors_header(os.path.join(d, "model.safetensors"), lambda h: h[_a_weight(h)].update(dtype="I32"))
      or "model.safetensors"
    ),
    ["'model.layers.0.mlp.down_proj.weight'", "I32", "float type"],
  ),
  "weights_tensor_renamed": (
    lambda d: _edit_safetensors_header(
      os.path.join(d, "model.safetensors"), lambda h: h.update(renamed=h.pop(_a_weight(h)))
    ),
    ["'model.layers.0.mlp.down_proj.weight'", "missing"],
  ),
  "weights_shape_off": (
    lambda d: (
      _edit_json(os.path.join(d, "config.json"), lambda c: c.update(intermediate_size=96)) or "model.safetensors"
    ),
    ["shape", "config.json implies"],
  ),
  "weights_header_garbled": (
    lambda d: (
      _edit_safetensors_header(os.path.join(d, "model.safetensors"), lambda h: h[_a_weight(h)].update(data_offsets="x"))
      or "model.safetensors"
    ),
    ["'model.layers.0.mlp.down_proj.weight'", "data_offsets"],
  ),
  "weights_removed": (lambda d: os.remove(os.path.join(d, "model.safetensors")), ["no weight file"]),
  "shard_missing": (lambda d: _sharded(d) or "model.safetensors.index.json", ["model-00002-of-00002", "missing"]),
}


@pytest.fixture(scope="module")
def tiny_target(generate_assets):
  return generate_assets / "target"


def _damaged_copy(tiny_target, tmp_path, kind):
  import shutil

  directory = tmp_path / kind
  shutil.copytree(tiny_target, directory)
  damage, words = CHECKPOINT_DAMAGE[kind]
  culprit = damage(str(directory))
  return str(directory), os.path.join(str(directory), culprit) if culprit else str(directory), words


def _generate_args(assets, workdir, *extra):
  return (
    "--config",
    "configs/generate.py:runlocal,method=ar",
    "--config.local_assets=False",
    f"--config.prompts={assets / 'question.jsonl'}",
    "--config.max_prompts=2",
    *extra,
    "--workdir",
    str(workdir),
  )


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_DAMAGE))
def test_damaged_target_checkpoint_is_named(kind, generate_assets, tmp_path, monkeypatch):
  directory, culprit, words = _damaged_copy(generate_assets / "target", tmp_path, kind)
  code, err = cli(
    *_generate_args(generate_assets, tmp_path / "work", f"--config.target={directory}"), monkeypatch=monkeypatch
  )
  _assert_clear_error(code, err, culprit, *words)


@pytest.mark.parametrize("target", ["missing", "a_file"])
def test_target_that_is_not_a_directory(target, generate_assets, tmp_path, monkeypatch):
  path = tmp_path / target
  if target == "a_file":
    path.write_text("not a checkpoint\n")
  code, err = cli(
    *_generate_args(generate_assets, tmp_path / "work", f"--config.target={path}"), monkeypatch=monkeypatch
  )
  _assert_clear_error(code, err, "`target`", str(path), "no such directory" if target == "missing" else "is a file")
  assert "Repo id" not in err


def test_missing_tokenizer_directory_is_named(generate_assets, tmp_path, monkeypatch):
  code, err = cli(
    *_generate_args(
      generate_assets,
      tmp_path / "work",
      f"--config.target={generate_assets / 'target'}",
      f"--config.tokenizer={tmp_path / 'no_tokenizer'}",
    ),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, str(tmp_path / "no_tokenizer"), "no such directory")


@pytest.mark.parametrize("kind", ["weights_cut_short", "config_layers_a_string"])
def test_damaged_drafter_is_named_before_anything_loads(kind, generate_assets, tmp_path, monkeypatch):
  from specjax.models import hf

  directory, culprit, words = _damaged_copy(generate_assets / "target", tmp_path, kind)
  monkeypatch.setattr(hf, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
  code, err = cli(
    "--config",
    "configs/generate.py:runlocal,method=sps",
    "--config.local_assets=False",
    f"--config.prompts={generate_assets / 'question.jsonl'}",
    f"--config.target={generate_assets / 'target'}",
    f"--config.drafter={directory}",
    "--workdir",
    str(tmp_path / "work"),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, culprit, *words)


# Every job that loads a checkpoint checks it the same way (the first line of CHECKPOINT_DAMAGE's
# damage that each config's field takes).
JOB_CHECKPOINT_CASES = [
  ("eval_specbench.py:runlocal", "--config.target={d}", "config_cut_midway"),
  ("eval_specbench.py:runlocal", "--config.drafters=general={d}", "weights_dtype_i32"),
  ("distill_data.py:runlocal", "--config.target={d}", "config_layers_a_string"),
  ("pretrain.py:runlocal", "--config.target={d}", "weights_cut_short"),
  ("finetune.py:runlocal", "--config.target={d}", "config_not_an_object"),
]


@pytest.mark.parametrize(
  "config, override, kind", JOB_CHECKPOINT_CASES, ids=[f"{c}-{k}" for c, _, k in JOB_CHECKPOINT_CASES]
)
def test_every_job_checks_its_checkpoints(config, override, kind, generate_assets, tmp_path, monkeypatch):
  directory, culprit, words = _damaged_copy(generate_assets / "target", tmp_path, kind)
  target = [] if "target" in override else [f"--config.target={generate_assets / 'target'}"]
  prompts = [f"--config.prompts={generate_assets / 'question.jsonl'}"] if "eval" in config else []
  if "eval" in config:
    prompts += ["--config.drafter=general"] + (
      [] if "drafters" in override else [f"--config.drafters=general={generate_assets / 'target'}"]
    )
  data = ["--config.data_dir=specjax/assets/corpus"] if "distill" in config else []
  code, err = cli(
    "--config",
    f"configs/{config}",
    "--config.local_assets=False",
    *target,
    *prompts,
    *data,
    override.format(d=directory),
    "--workdir",
    str(tmp_path / "work"),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, culprit, *words)


# --- resuming a training run with other data settings ------------------------------------------


@pytest.fixture(scope="module")
def trained_two_steps(tmp_path_factory):
  """A pretraining run stopped after 2 of 4 steps (a checkpoint at step 2), to resume."""
  from specjax.jobs import local_assets
  from specjax.jobs import train as trainer
  from tests.test_train import _config

  root = tmp_path_factory.mktemp("resume_settings")
  assets = str(root / "assets" / "target")
  local_assets.ensure_corpus_checkpoints(assets)
  trainer.run(
    _config(assets, num_train_steps=4, checkpoint_every=2, max_steps_this_run=2, export_hf=False), str(root / "run")
  )
  return assets, root / "run"


@pytest.mark.parametrize(
  "change, named",
  [
    ({"batch_size": 4}, "batch_size 8 (now 4)"),
    ({"sequence_length": 64}, "sequence_length 128 (now 64)"),
    ({"grad_accumulation": 2}, "grad_accumulation 1 (now 2)"),
    ({"mixture": "finetune_de_en"}, "mixture 'pretrain_multilingual' (now 'finetune_de_en')"),
    ({"seed": 3}, "seed 0 (now 3)"),
    ({"data_limit": 50}, "data_limit 0 (now 50)"),
  ],
)
def test_resume_with_other_data_settings_is_refused(change, named, trained_two_steps, tmp_path, monkeypatch):
  import shutil
  from specjax.jobs import train as trainer
  from tests.test_train import _config

  assets, run = trained_two_steps
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  monkeypatch.setattr(trainer, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
  with pytest.raises(SpecjaxError) as e:
    trainer.run(_config(assets, num_train_steps=4, checkpoint_every=2, export_hf=False, **change), str(workdir))
  message = str(e.value)
  assert named in message and "checkpoints/2" in message and "allow_resume_with_changes=True" in message, message


def test_resume_with_other_settings_when_asked(trained_two_steps, tmp_path, capfd):
  import shutil
  from specjax.jobs import train as trainer
  from tests.test_train import _config

  assets, run = trained_two_steps
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  capfd.readouterr()
  out = trainer.run(
    _config(
      assets, num_train_steps=4, checkpoint_every=2, export_hf=False, batch_size=4, allow_resume_with_changes=True
    ),
    str(workdir),
  )
  printed = "".join(capfd.readouterr())
  assert out["finished"] and out["step"] == 4
  assert "batch_size 8 (now 4)" in printed and "resuming anyway" in printed and "Traceback" not in printed
  # the new settings are recorded: a rerun with them is a plain resume, the old ones are refused
  with pytest.raises(SpecjaxError, match=r"batch_size 4 \(now 8\)"):
    trainer.run(_config(assets, num_train_steps=4, checkpoint_every=2, export_hf=False), str(workdir))


def test_resume_with_the_same_settings_and_a_config_typo(trained_two_steps, tmp_path, monkeypatch):
  import shutil
  from specjax.jobs import train as trainer
  from tests.test_train import _config

  assets, run = trained_two_steps
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  out = trainer.run(
    _config(assets, num_train_steps=4, checkpoint_every=2, export_hf=False, log_every=2), str(workdir)
  )  # logging is no data setting
  assert out["finished"] and out["step"] == 4
  code, err = cli(
    "--config",
    "configs/pretrain.py:runlocal",
    "--config.allow_resume_with_changes=maybe",
    "--workdir",
    str(tmp_path / "w2"),
    monkeypatch=monkeypatch,
  )
  assert code == 2 and "allow_resume_with_changes" in err and "Traceback" not in err, err


# --- the evaluation job: answers as they go, resume after the last finished unit ---------------


@pytest.fixture(scope="module")
def eval_assets(tmp_path_factory):
  from specjax.jobs import local_assets

  root = tmp_path_factory.mktemp("eval_resume_assets")
  local_assets.ensure_question_file(str(root / "question.jsonl"))
  local_assets.ensure_checkpoints([(str(root / "target"), "tiny"), (str(root / "drafter"), "tiny-drafter")])
  return root


def _eval_config(assets, **fields):
  sys.path.insert(0, REPO)
  try:
    from configs import eval_specbench
  finally:
    sys.path.remove(REPO)
  c = eval_specbench.get_config("runlocal,methods=ar+sps,drafter=general")
  c.unlock()
  c.update(
    local_assets=False,
    target=str(assets / "target"),
    drafters=f"general={assets / 'drafter'}",
    prompts=str(assets / "question.jsonl"),
    cross_language=False,
    max_prompts_per_language=1,
    max_new_tokens=8,
    temperatures=(0.0, 1.0),
    seeds=(0,),
    greedy_seeds=(0,),
    compilation_cache="",
  )
  c.update(fields)
  return c


def _eval_answers(workdir):
  out = {}
  for name in sorted(os.listdir(os.path.join(workdir, "answers"))):
    with open(os.path.join(workdir, "answers", name), encoding="utf-8") as f:
      out[name] = [{k: v for k, v in json.loads(line).items() if k != "tstamp"} for line in f]
      for a in out[name]:
        a["choices"] = [{k: v for k, v in c.items() if k != "wall_time"} for c in a["choices"]]
  return out


def _untimed(records):
  return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_second")} for r in records]


def test_eval_writes_as_it_goes_and_resumes_exactly(eval_assets, tmp_path, monkeypatch):
  from specjax.eval import specbench
  from specjax.jobs import eval_specbench

  config = _eval_config(eval_assets)
  full = eval_specbench.run(config, str(tmp_path / "full"))
  units = len(full["records"])
  assert units >= 6

  decode = specbench._Evaluation.decode
  calls = []

  def killed_at_the_fourth(self, run, indices, temperature, seed):
    calls.append((run.model_id, temperature, seed))
    if len(calls) == 4:
      raise KeyboardInterrupt  # the job is killed while decoding its fourth unit
    return decode(self, run, indices, temperature, seed)

  split = tmp_path / "split"
  monkeypatch.setattr(specbench._Evaluation, "decode", killed_at_the_fourth)
  with pytest.raises(KeyboardInterrupt):
    eval_specbench.run(config, str(split))
  assert sum(len(a) for a in _eval_answers(split).values()) == 3  # three units' answers on disk (1 question each)
  with open(split / "answers.progress.jsonl", "a", encoding="utf-8") as f:
    f.write('{"kind": "unit", "key": ["deen", 0.0')  # and a kill cut the journal mid-line

  calls.clear()
  monkeypatch.setattr(
    specbench._Evaluation, "decode", lambda self, run, *a: (calls.append(run.model_id), decode(self, run, *a))[1]
  )
  resumed = eval_specbench.run(config, str(split))
  assert len(calls) == units - 3  # only the unfinished units
  assert _eval_answers(split) == _eval_answers(tmp_path / "full")
  assert _untimed(resumed["records"]) == _untimed(full["records"])

  calls.clear()  # a finished job's rerun decodes nothing and loads no model
  monkeypatch.setattr(eval_specbench, "_load", lambda *a: pytest.fail("the models were loaded"))
  again = eval_specbench.run(config, str(split))
  assert calls == [] and _untimed(again["records"]) == _untimed(full["records"])


def test_eval_refuses_a_journal_of_other_settings(eval_assets, tmp_path):
  from specjax.jobs import eval_specbench

  eval_specbench._journal(_eval_config(eval_assets, max_new_tokens=4), str(tmp_path), [], True)
  with pytest.raises(SpecjaxError, match=r"other values of max_new_tokens \(4, now 8\)"):
    eval_specbench.run(_eval_config(eval_assets), str(tmp_path))


def test_eval_finds_an_unwritable_output_before_decoding(eval_assets, tmp_path, monkeypatch):
  from specjax.jobs import eval_specbench

  (tmp_path / "answers").write_text("a file where the answers folder goes\n")  # fails even for root
  monkeypatch.setattr(eval_specbench, "_load", lambda *a: pytest.fail("the models were loaded"))
  with pytest.raises(SpecjaxError, match="cannot write the answers"):
    eval_specbench.run(_eval_config(eval_assets), str(tmp_path))


# --- corpora ---------------------------------------------------------------------------------


def _corpus_copy(tmp_path, kind) -> tuple[str, str, list[str]]:
  """A copy of the embedded corpus damaged as `kind` says: (data_dir, the culprit path, words the
  error line must hold besides it)."""
  import shutil

  root = tmp_path / "corpus"
  shutil.copytree(os.path.join(REPO, "specjax", "assets", "corpus"), root)
  de = root / "de-en"
  if kind == "language_folder_missing":
    shutil.rmtree(de)
    return str(root), str(de), ["missing", "add the de-en folder"]  # train.de or eval.de: whichever is read first
  if kind == "eval_split_missing":
    os.remove(de / "eval.de")
    os.remove(de / "eval.en")
    return str(root), str(de / "eval.de"), ["missing"]
  if kind == "more_lines_than_english":
    n = len((de / "train.en").read_text(encoding="utf-8").splitlines())
    with open(de / "train.de", "a", encoding="utf-8") as f:
      f.write("Ein Satz zu viel.\n")
    return str(root), str(de / "train.de"), [f"{de / 'train.de'}:{n + 1}", "line-aligned"]
  if kind == "english_side_empty":
    (de / "train.en").write_text("")
    return str(root), str(de / "train.en"), ["empty"]
  if kind == "both_sides_empty":
    (de / "train.de").write_text("")
    (de / "train.en").write_text("")
    return str(root), str(de / "train.de"), ["empty"]
  if kind == "not_utf8":
    lines = (de / "train.de").read_bytes().split(b"\n")
    lines[2] = "Größe".encode("latin-1")
    (de / "train.de").write_bytes(b"\n".join(lines))
    return str(root), f"{de / 'train.de'}:3", ["invalid UTF-8", "convert"]
  if kind == "data_dir_a_file":
    path = tmp_path / "corpus.txt"
    path.write_text("not a folder\n")
    return str(path), str(path), ["not a directory"]
  raise AssertionError(kind)


CORPUS_DAMAGE = [
  "language_folder_missing",
  "eval_split_missing",
  "more_lines_than_english",
  "english_side_empty",
  "both_sides_empty",
  "not_utf8",
  "data_dir_a_file",
]


@pytest.mark.parametrize("kind", CORPUS_DAMAGE)
def test_damaged_corpus_for_distill_data(kind, tmp_path, monkeypatch):
  data_dir, culprit, words = _corpus_copy(tmp_path, kind)
  workdir = tmp_path / "work"
  code, err = cli(
    "--config",
    "configs/distill_data.py:runlocal",
    f"--config.data_dir={data_dir}",
    "--workdir",
    str(workdir),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, culprit, *words)
  assert not (workdir / "local_assets").exists()  # refused before the target was built


@pytest.mark.parametrize("kind", ["language_folder_missing", "more_lines_than_english", "not_utf8"])
def test_damaged_corpus_for_training(kind, generate_assets, tmp_path, monkeypatch):
  """The same damage met by the seqio tasks of a training run (pretraining reads every language)."""
  data_dir, culprit, words = _corpus_copy(tmp_path, kind)
  code, err = cli(
    "--config",
    "configs/pretrain.py:runlocal",
    "--config.local_assets=False",
    f"--config.target={generate_assets / 'target'}",
    f"--config.data_dir={data_dir}",
    "--workdir",
    str(tmp_path / "work"),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, culprit, *words)


# --- self-distillation outputs -----------------------------------------------------------------


def _selfdistill_dir(tmp_path, kind) -> tuple[str, str, list[str]]:
  """A distill_data workdir of German records (no manifest), damaged as `kind` says: (the
  selfdistill_dir, the culprit, words the error line must hold besides it)."""
  from specjax.data.selfdistill import FIELDS, shard_name

  root = tmp_path / "selfdistill"
  data = root / "data"
  data.mkdir(parents=True)
  records = [
    {
      "record_id": i,
      "source_id": i,
      "source": f"Satz {i}.",
      "prompt": f"Translate German to English:Satz {i}.",
      "chat_prompt": f"USER: Translate German to English:Satz {i}. ASSISTANT:",
      "response": "x",
      "response_token_ids": [5, 6, 7],
      "temperature": 0.0,
      "src_lang": "de",
      "tgt_lang": "en",
      "truncated": False,
    }
    for i in range(4)
  ]
  lines = [json.dumps({f: r[f] for f in FIELDS + ("truncated",)}) + "\n" for r in records]
  shard = data / shard_name("de", "en", 0, 1)
  if kind == "no_such_dir":
    return str(tmp_path / "nowhere"), str(tmp_path / "nowhere"), ["does not exist"]
  if kind == "no_shards":
    return str(root), str(root), ["no selfdistill-*.jsonl shards"]
  if kind == "other_language_only":
    (data / shard_name("fr", "en", 0, 1)).write_text("".join(lines).replace('"de"', '"fr"'))
    return str(root), str(root), ["de->en", "fr->en"]
  if kind == "cut_mid_line":
    shard.write_text("".join(lines)[:-25])
    return str(root), f"{shard}:4", ["malformed JSON", "regenerate"]
  if kind == "field_missing":
    lines[1] = json.dumps({f: records[1][f] for f in FIELDS if f != "response_token_ids"}) + "\n"
    shard.write_text("".join(lines))
    return str(root), f"{shard}:2", ["response_token_ids", "missing"]
  if kind == "not_an_object":
    lines[0] = "[1, 2]\n"
    shard.write_text("".join(lines))
    return str(root), f"{shard}:1", ["JSON object"]
  raise AssertionError(kind)


SELFDISTILL_DAMAGE = [
  "no_such_dir",
  "no_shards",
  "other_language_only",
  "cut_mid_line",
  "field_missing",
  "not_an_object",
]


@pytest.mark.parametrize("kind", SELFDISTILL_DAMAGE)
def test_damaged_selfdistill_outputs_for_finetuning(kind, generate_assets, tmp_path, monkeypatch):
  selfdistill_dir, culprit, words = _selfdistill_dir(tmp_path, kind)
  code, err = cli(
    "--config",
    "configs/finetune.py:runlocal,lang=de",
    "--config.local_assets=False",
    f"--config.target={generate_assets / 'target'}",
    "--config.data_dir=specjax/assets/corpus",
    f"--config.selfdistill_dir={selfdistill_dir}",
    "--workdir",
    str(tmp_path / "work"),
    monkeypatch=monkeypatch,
  )
  _assert_clear_error(code, err, culprit, *words)


@pytest.mark.parametrize("kind", ["cut_mid_line", "field_missing", "no_shards"])
def test_damaged_selfdistill_outputs_for_read_records(kind, tmp_path):
  from specjax.data.selfdistill import read_records

  selfdistill_dir, culprit, words = _selfdistill_dir(tmp_path, kind)
  with pytest.raises(SpecjaxError) as e:
    list(read_records(selfdistill_dir))
  for word in (culprit, *words):
    assert word in str(e.value), (word, str(e.value))


def test_distill_data_rerun_over_a_damaged_shard(generate_assets, tmp_path, monkeypatch):
  """A finished shard whose last line was cut (copied back incompletely) is named, not
  overwritten; an unfinished shard's .tmp is what a kill leaves, and a rerun redoes it (test_faults)."""
  workdir = tmp_path / "work"
  args = (
    "--config",
    "configs/distill_data.py:runlocal,num_sources=4,num_shards=2",
    "--config.local_assets=False",
    f"--config.target={generate_assets / 'target'}",
    "--config.data_dir=specjax/assets/corpus",
    "--workdir",
    str(workdir),
  )
  code, err = cli(*args, monkeypatch=monkeypatch)
  assert code in (0, None), err
  shard = sorted((workdir / "data").glob("*.jsonl"))[1]
  text = shard.read_text(encoding="utf-8")
  shard.write_text(text[:-30], encoding="utf-8")
  code, err = cli(*args, monkeypatch=monkeypatch)
  _assert_clear_error(code, err, f"{shard}:{text.count(chr(10))}", "malformed JSON", "regenerate")
  assert shard.read_text(encoding="utf-8") == text[:-30]  # left as it was, for the user to look at
