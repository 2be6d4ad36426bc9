"""specjax.fileio on local disk and on TensorFlow's in-memory `ram://` filesystem (standing in
for gs://), and the outputs routed through it: metrics.jsonl, reports, answer files, the
drafter config and Hugging Face exports all land in a URL workdir."""

import json
import math
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from specjax import fileio
from tests.helpers import flat_params, random_model, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _ram() -> str:
  """A fresh directory of the process-wide in-memory filesystem."""
  return f"ram://specjax-test-{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
  return str(tmp_path) if request.param == "local" else _ram()


def _read_bytes(path) -> bytes:
  with fileio.open(path, "rb") as f:
    return f.read()


def _copy_tree(src: str, dst: str) -> None:
  """A flat directory (what save_hf_checkpoint writes) from anywhere to anywhere."""
  fileio.makedirs(dst)
  for path in fileio.glob(fileio.join(src, "*")):
    if not fileio.isdir(path):
      fileio.copy(path, fileio.join(dst, os.path.basename(path)))


# --- fileio itself ------------------------------------------------------------------------


def test_is_remote():
  for path in ("gs://bucket/x", "ram://a", "s3://b/c", "file:///tmp/x", "hdfs://n/p"):
    assert fileio.is_remote(path), path
  for path in ("/tmp/x", "relative/dir", "C:\\x", "odd:name", "./gs:/x", ""):
    assert not fileio.is_remote(path), path


def test_join(root):
  assert fileio.join(root, "a", "b.txt") == root + "/a/b.txt"
  assert fileio.join("gs://bucket", "run", "metrics.jsonl") == "gs://bucket/run/metrics.jsonl"
  assert fileio.join("gs://bucket/run/", "x") == "gs://bucket/run/x"


def test_makedirs_exists_isdir(root):
  nested = fileio.join(root, "a", "b", "c")
  assert not fileio.exists(nested) and not fileio.isdir(nested)
  fileio.makedirs(nested)
  fileio.makedirs(nested)  # exist_ok by default
  assert fileio.exists(nested) and fileio.isdir(nested)
  assert fileio.isdir(fileio.join(root, "a", "b"))
  with pytest.raises(FileExistsError):
    fileio.makedirs(nested, exist_ok=False)


def test_open_text_binary_append(root):
  fileio.makedirs(root)
  text = fileio.join(root, "t.txt")
  with fileio.open(text, "w", encoding="utf-8") as f:
    f.write("Grüße, 你好\n")
    f.writelines(["second\n", "third\n"])
  with fileio.open(text, "a") as f:
    f.write("fourth\n")
  assert fileio.exists(text) and not fileio.isdir(text)
  with fileio.open(text) as f:
    assert f.read() == "Grüße, 你好\nsecond\nthird\nfourth\n"
  with fileio.open(text, encoding="utf-8") as f:
    assert [line for line in f] == ["Grüße, 你好\n", "second\n", "third\n", "fourth\n"]
  assert _read_bytes(text) == "Grüße, 你好\nsecond\nthird\nfourth\n".encode()

  binary = fileio.join(root, "b.bin")
  with fileio.open(binary, "wb") as f:
    f.write(bytes(range(256)))
  with fileio.open(binary, "ab") as f:
    f.write(b"\x00end")
  assert _read_bytes(binary) == bytes(range(256)) + b"\x00end"
  with fileio.open(binary, "w") as f:  # "w" truncates
    f.write("short")
  assert _read_bytes(binary) == b"short"


def test_missing_files_raise_file_not_found(root):
  fileio.makedirs(root)
  missing = fileio.join(root, "missing.txt")
  assert not fileio.exists(missing)
  with pytest.raises(FileNotFoundError):
    fileio.open(missing)
  with pytest.raises(FileNotFoundError):
    fileio.open(missing, "rb")
  with pytest.raises(FileNotFoundError):
    fileio.remove(missing)


def test_replace_glob_remove_copy(root):
  fileio.makedirs(fileio.join(root, "d"))
  src, dst = fileio.join(root, "d", "new.tmp"), fileio.join(root, "d", "x.jsonl")
  with fileio.open(dst, "w") as f:
    f.write("old\n")
  with fileio.open(src, "w") as f:
    f.write("new\n")
  fileio.replace(src, dst)  # over an existing file
  assert not fileio.exists(src)
  with fileio.open(dst) as f:
    assert f.read() == "new\n"

  for name in ("a-1.jsonl", "b-2.jsonl", "c.txt"):
    with fileio.open(fileio.join(root, "d", name), "w") as f:
      f.write(name)
  assert sorted(os.path.basename(p) for p in fileio.glob(fileio.join(root, "d", "*.jsonl"))) == [
    "a-1.jsonl",
    "b-2.jsonl",
    "x.jsonl",
  ]
  assert [os.path.basename(p) for p in fileio.glob(fileio.join(root, "d", "?-2.jsonl"))] == ["b-2.jsonl"]
  assert all(p.startswith(root) for p in fileio.glob(fileio.join(root, "d", "*")))
  assert fileio.glob(fileio.join(root, "nowhere", "*.jsonl")) == []

  fileio.copy(fileio.join(root, "d", "c.txt"), fileio.join(root, "d", "a-1.jsonl"))  # overwrites
  assert _read_bytes(fileio.join(root, "d", "a-1.jsonl")) == b"c.txt"
  fileio.remove(fileio.join(root, "d", "c.txt"))
  assert not fileio.exists(fileio.join(root, "d", "c.txt"))
  assert fileio.exists(fileio.join(root, "d", "b-2.jsonl"))


def test_copy_and_replace_across_filesystems(tmp_path):
  local = tmp_path / "local.txt"
  local.write_text("here\n")
  remote = fileio.join(_ram(), "there.txt")
  fileio.copy(str(local), remote)
  assert _read_bytes(remote) == b"here\n"
  back = str(tmp_path / "back.txt")
  fileio.replace(remote, back)
  with open(back) as f:
    assert f.read() == "here\n"
  assert not fileio.exists(remote)


def test_url_modes_and_encodings_outside_utf8_are_refused():
  path = fileio.join(_ram(), "x")
  with pytest.raises(ValueError, match="UTF-8"):
    fileio.open(path, "w", encoding="latin-1")
  with pytest.raises(ValueError, match="mode"):
    fileio.open(path, "r+")
  with fileio.open(path, "w", encoding="UTF-8") as f:
    f.write("ok")


def test_local_paths_do_not_import_tensorflow(tmp_path):
  code = f"""
import json, sys
from specjax import fileio
from specjax.eval import report
from specjax.models import hf
from specjax.train import writers
d = fileio.join({str(tmp_path)!r}, "a")
fileio.makedirs(d)
with fileio.open(fileio.join(d, "x.txt"), "w") as f:
  f.write("x")
fileio.replace(fileio.join(d, "x.txt"), fileio.join(d, "y.txt"))
fileio.copy(fileio.join(d, "y.txt"), fileio.join(d, "z.txt"))
assert fileio.exists(d) and fileio.isdir(d) and len(fileio.glob(fileio.join(d, "*.txt"))) == 2
fileio.remove(fileio.join(d, "y.txt"))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
    [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# --- outputs routed through it --------------------------------------------------------------


@pytest.mark.parametrize("tensorboard", [False, True])
def test_metric_writer_on_a_url(tensorboard):
  from specjax.train.writers import MetricWriter, read_metrics

  workdir = fileio.join(_ram(), "run")
  writer = MetricWriter(workdir, tensorboard=tensorboard)
  for step in range(1, 6):
    writer.write(step, {"train/loss": 1.0 / step, "eval": {"acc": [0.5, 0.25]}, "nan": math.nan})
  writer.close()
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]
  assert read_metrics(workdir)[1] == {"step": 2, "train/loss": 0.5, "eval": {"acc": [0.5, 0.25]}, "nan": "nan"}
  if tensorboard:
    assert fileio.glob(fileio.join(workdir, "tensorboard", "events.out.tfevents.*"))

  with fileio.open(fileio.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "train/lo')  # a killed run's half-written last line
  writer = MetricWriter(workdir, resume_step=3, tensorboard=False)  # resumed from the step-3 checkpoint
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
  writer.write(4, {"train/loss": 0.2})
  writer.close()
  assert [(r["step"], r.get("train/loss")) for r in read_metrics(workdir)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]
  assert not fileio.exists(fileio.join(workdir, "metrics.jsonl.tmp"))


def test_write_report_into_a_url():
  from specjax.eval.report import write_report
  from tests.test_report import make_records

  records = make_records(seeds=(0, 1))
  ablation = (
    "Finetuning tokens",
    [{"x": x, "y": 1 + 0.3 * math.log10(x), "label": "P+F"} for x in (1e6, 1e7, 1e8)],
    "tokens",
    "speedup",
    True,
    True,
  )
  out_dir = fileio.join(_ram(), "eval")
  path = write_report(records, out_dir, "specjax on ram", notes=("Hardware: none.",), ablations=[ablation])
  assert path == out_dir + "/report.md"
  with fileio.open(path) as f:
    report = f.read()
  assert report.startswith("# specjax on ram") and report.rstrip().endswith("Hardware: none.")
  images = [
    "speedup_T0.png",
    "per_position_T0.png",
    "speedup_T1.png",
    "per_position_T1.png",
    "ablation_finetuning_tokens.png",
  ]
  for image in images:
    assert f"]({image})" in report
    data = _read_bytes(fileio.join(out_dir, image))
    assert data[:8] == PNG and len(data) > 10_000, image
  with fileio.open(fileio.join(out_dir, "records.json")) as f:
    assert json.load(f) == records


def test_generate_and_specbench_outputs_into_a_url(capsys):
  from specjax.jobs import generate as generate_job
  from specjax.jobs import eval_specbench
  from tests.test_report import make_records

  workdir = fileio.join(_ram(), "gen")
  answers = [{"question_id": 1, "choices": [{"turns": ["Grüße"]}]}]
  generate_job._write(workdir, answers, {"job": "generate", "tokens_per_second": 1.5})
  with fileio.open(fileio.join(workdir, "answers.jsonl")) as f:
    assert [json.loads(line) for line in f] == answers
  with fileio.open(fileio.join(workdir, "metrics.json")) as f:
    assert json.load(f)["tokens_per_second"] == 1.5

  workdir = fileio.join(_ram(), "specbench")
  fileio.makedirs(fileio.join(workdir, "answers"))
  stale, kept = (fileio.join(workdir, "answers", name) for name in ("specjax-old-T0-seed9.jsonl", "mine.jsonl"))
  for path in (stale, kept):
    with fileio.open(path, "w") as f:
      f.write("{}\n")
  files = {
    "specjax-ar-T0-seed0.jsonl": [{"question_id": 1, "answer": "ja"}],
    "specjax-sps-de-T0-seed0.jsonl": [{"question_id": 1, "answer": "ja"}, {"question_id": 2}],
  }
  records = make_records(seeds=(0,))
  eval_specbench._write(workdir, files, {"job": "eval_specbench", "records": records}, title="t", notes=())
  capsys.readouterr()
  names = sorted(os.path.basename(p) for p in fileio.glob(fileio.join(workdir, "answers", "*")))
  assert names == ["mine.jsonl", *sorted(files)]  # the earlier run's answer file is gone, others stay
  with fileio.open(fileio.join(workdir, "answers", "specjax-sps-de-T0-seed0.jsonl")) as f:
    assert [json.loads(line) for line in f] == files["specjax-sps-de-T0-seed0.jsonl"]
  with fileio.open(fileio.join(workdir, "metrics.json")) as f:
    assert json.load(f)["records"] == records
  assert fileio.exists(fileio.join(workdir, "report.md"))
  assert _read_bytes(fileio.join(workdir, "speedup_T0.png"))[:8] == PNG


@pytest.mark.parametrize("shards", ["single", "sharded"])
def test_save_hf_checkpoint_into_a_url(tmp_path, shards):
  from specjax.models.hf import load_hf_checkpoint, load_tokenizer, save_hf_checkpoint
  from specjax.models.tokenizer_utils import train_tokenizer

  config = tiny_config()
  model = random_model(config, seed=11)
  tokenizer = train_tokenizer(["a tiny corpus for a tiny tokenizer", "Grüße aus Berlin"], 300)
  remote = fileio.join(_ram(), "drafter")
  save_hf_checkpoint(model, config, remote, max_shard_bytes=4 << 30)  # a first export, then over it
  save_hf_checkpoint(
    model, config, remote, tokenizer=tokenizer, max_shard_bytes=50_000 if shards == "sharded" else 4 << 30
  )
  names = {os.path.basename(p) for p in fileio.glob(fileio.join(remote, "*"))}
  assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
  weights = {n for n in names if n.endswith(".safetensors")}
  if shards == "sharded":
    assert len(weights) > 1 and "model.safetensors" not in weights  # the first export's file is gone
    assert "model.safetensors.index.json" in names
  else:
    assert weights == {"model.safetensors"} and "model.safetensors.index.json" not in names

  local = str(tmp_path / "drafter")
  _copy_tree(remote, local)
  loaded, loaded_config = load_hf_checkpoint(local)
  assert loaded_config == config
  a, b = flat_params(model), flat_params(loaded)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  assert load_tokenizer(local).encode("Grüße aus Berlin") == tokenizer.encode("Grüße aus Berlin")

  # A tokenizer directory is copied file by file, into a URL as well.
  again = fileio.join(_ram(), "again")
  save_hf_checkpoint(model, config, again, tokenizer=local)
  assert _read_bytes(fileio.join(again, "tokenizer.json")) == _read_bytes(fileio.join(local, "tokenizer.json"))


def test_trainer_reads_a_run_drafter_config_from_a_url():
  from specjax.jobs.train import _drafter_config

  config = tiny_config()
  run = _ram()
  fileio.makedirs(run)
  with fileio.open(fileio.join(run, "drafter_config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f)
  cfg, weights = _drafter_config(None, {"drafter": f"run:{run}"}, config.vocab_size)
  assert cfg == config and weights is None
  from specjax.errors import SpecjaxError

  with pytest.raises(SpecjaxError, match="not found"):
    _drafter_config(None, {"drafter": f"run:{_ram()}"}, config.vocab_size)
