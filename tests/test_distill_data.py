"""The distill_data job: records and manifest, reproducible bytes, restart after a kill equal to an
uninterrupted run, partial shards discarded, read_records, and user mistakes (exit code 2)."""

import json
import os
import subprocess
import sys

import pytest

from configs.distill_data import get_config
from specjax.jobs import local_assets
from specjax.data import parallel, selfdistill
from specjax.jobs import distill_data
from specjax.errors import SpecjaxError
from specjax.main import run_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN = 12  # sources; with two temperatures 24 records in 4 shards of 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data folder with every file of de-en's split table: numbered sentences, one eval sentence
  repeated in training (which must not become a source)."""
  root = tmp_path_factory.mktemp("data")
  table = parallel._SPLIT_TABLE["de"]
  for split in ("train", "eval"):
    for f, (x, en) in enumerate(table[split]()):
      n = NUM_TRAIN if (split, f) == ("train", 0) else 2
      xs = [f"{split} Satz {f}.{i}: der Hund läuft." for i in range(n)]
      ens = [f"{split} sentence {f}.{i}: the dog runs." for i in range(n)]
      if (split, f) == ("train", 1):
        xs[0], ens[0] = "eval Satz 0.0: der Hund läuft.", "eval sentence 0.0: the dog runs."
      for path, lines in ((x, xs), (en, ens)):
        os.makedirs(os.path.dirname(root / path), exist_ok=True)
        (root / path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(root)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return str(tmp_path_factory.mktemp("assets") / "target")


def _config(data_dir, assets, **overrides):
  c = get_config("runlocal,num_sources=12,num_shards=4,batch_size=4,max_new_tokens=8")
  c.data_dir, c.target, c.temperatures = data_dir, assets, (0.0, 1.0)
  c.prompt_bucket = 64
  c.update(overrides)
  return c


def _files(workdir) -> dict[str, bytes]:
  out = {}
  for folder in (workdir, os.path.join(workdir, "data")):
    for name in sorted(os.listdir(folder)):
      if os.path.isfile(os.path.join(folder, name)):
        with open(os.path.join(folder, name), "rb") as f:
          out[os.path.relpath(os.path.join(folder, name), workdir)] = f.read()
  return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir, assets):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = run_job(_config(data_dir, assets), workdir)
  return workdir, result


def test_records_and_manifest(full_run, data_dir):
  workdir, result = full_run
  assert result == {"records": 24, "response_tokens": result["response_tokens"], "shards_done": 4, "shards_total": 4}
  names = sorted(os.listdir(os.path.join(workdir, "data")))
  assert names == [f"selfdistill-deen-{k:05d}-of-00004.jsonl" for k in range(4)]
  records = list(selfdistill.read_records(workdir))
  assert [r["record_id"] for r in records] == list(range(24))
  sources = [x for x, _ in parallel.load_pairs(data_dir, "de", "train")][:NUM_TRAIN]
  assert "eval Satz 0.0: der Hund läuft." not in sources
  for r in records:
    assert set(r) == set(selfdistill.FIELDS) | {"truncated"}
    assert r["source"] == sources[r["source_id"]] and r["record_id"] == 2 * r["source_id"] + (r["temperature"] == 1.0)
    assert r["prompt"] == f"Translate German to English:{r['source']}"
    assert r["chat_prompt"].endswith(f"USER: {r['prompt']} ASSISTANT:")
    assert 1 <= len(r["response_token_ids"]) <= 8 and (r["src_lang"], r["tgt_lang"]) == ("de", "en")
  with open(os.path.join(workdir, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  assert manifest["records"] == 24 and manifest["shards_done"] == manifest["shards_total"] == 4
  assert manifest["response_tokens"] == sum(len(r["response_token_ids"]) for r in records)
  assert manifest["config"]["temperatures"] == [0.0, 1.0] and manifest["config"]["template"] == "auto"
  assert manifest["config"]["seed"] == 0 and manifest["config"]["src"] == "de"


def test_restart_after_kill_equals_uninterrupted_run(full_run, tmp_path, data_dir, assets):
  reference = _files(full_run[0])
  workdir = str(tmp_path / "restarted")
  first = run_job(_config(data_dir, assets, max_shards_this_run=1), workdir)  # "killed" after one shard
  assert first["shards_done"] == 1 and list(_files(workdir)) == ["manifest.json", "data/" + reference_name(0)]
  assert json.loads(_files(workdir)["manifest.json"])["shards_done"] == 1
  partial = os.path.join(workdir, "data", reference_name(1) + ".tmp")  # killed while writing shard 1
  with open(partial, "wb") as f:
    f.write(reference["data/" + reference_name(1)][:100])
  run_job(_config(data_dir, assets), workdir)
  assert not os.path.exists(partial)
  assert _files(workdir) == reference  # byte for byte, manifest included


def reference_name(k):
  return selfdistill.shard_name("de", "en", k, 4)


def test_rerun_of_a_finished_job_changes_nothing(full_run, data_dir, assets):
  workdir = full_run[0]
  before = {p: os.stat(os.path.join(workdir, p)).st_mtime_ns for p in _files(workdir) if p.startswith("data/")}
  result = run_job(_config(data_dir, assets), workdir)
  assert result["shards_done"] == 4
  assert before == {p: os.stat(os.path.join(workdir, p)).st_mtime_ns for p in before}


def test_restart_with_other_settings_or_foreign_shards_fails(full_run, tmp_path, data_dir, assets):
  with pytest.raises(SpecjaxError, match=r"manifest\.json: an earlier run .* temperatures"):
    run_job(_config(data_dir, assets, temperatures=(0.0, 0.7)), full_run[0])
  workdir = tmp_path / "foreign"
  (workdir / "data").mkdir(parents=True)
  shard = workdir / "data" / reference_name(2)
  shard.write_bytes(b"".join(open(os.path.join(full_run[0], "data", reference_name(2)), "rb").readlines()[:2]))
  with pytest.raises(SpecjaxError, match=r"selfdistill-deen-00002-of-00004\.jsonl: holds 2 records but .* 6"):
    run_job(_config(data_dir, assets), str(workdir))


def test_read_records_round_trip_and_errors(full_run, tmp_path):
  workdir = full_run[0]
  from_files = []
  for k in range(4):
    with open(os.path.join(workdir, "data", reference_name(k)), encoding="utf-8") as f:
      from_files += [json.loads(line) for line in f]
  assert list(selfdistill.read_records(workdir)) == from_files
  assert list(selfdistill.read_records(os.path.join(workdir, "data", reference_name(3)))) == from_files[18:]
  lines = [json.dumps(r, ensure_ascii=False) for r in from_files[:3]]
  for bad, message in (
    ('{"record_id": 5', "malformed JSON"),
    ("[1]", "expected a JSON object"),
    (json.dumps({**from_files[0], "response_token_ids": "12"}), "response_token_ids"),
    (json.dumps({k: v for k, v in from_files[0].items() if k != "response"}), "response"),
  ):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines[:2] + [bad]) + "\n", encoding="utf-8")
    with pytest.raises(SpecjaxError, match=rf"bad\.jsonl:3: .*{message}"):
      list(selfdistill.read_records(str(path)))
  (tmp_path / "empty").mkdir()
  with pytest.raises(SpecjaxError, match="no selfdistill"):
    list(selfdistill.read_records(str(tmp_path / "empty")))


def test_sources_for_both_directions(data_dir, assets, tmp_path, monkeypatch):
  into_english = distill_data._sources(_config(data_dir, assets), data_dir)
  from_english = distill_data._sources(_config(data_dir, assets, src="en", tgt="de"), data_dir)
  pairs = parallel.load_pairs(data_dir, "de", "train", limit=NUM_TRAIN)
  assert into_english == [x for x, _ in pairs] and from_english == [en for _, en in pairs]
  with pytest.raises(SpecjaxError, match="`data_dir`='/nonexistent': /nonexistent does not exist"):
    distill_data._sources(_config("/nonexistent", assets), "/nonexistent")  # a data_dir given is never ignored
  monkeypatch.chdir(tmp_path)  # runlocal's default ../shared/data is absent here: local_assets' sentences
  fallback = distill_data._sources(_config("../shared/data", assets), "../shared/data")
  assert fallback == [text for _, language, text in local_assets.SENTENCES if language == "German"]


def _cli(workdir, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "specjax.main", "--workdir", str(workdir), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_reports_bad_fields(tmp_path):
  bad_lang = _cli(tmp_path, "--config", "configs/distill_data.py:runlocal", "--config.src=xx")
  assert bad_lang.returncode == 2, bad_lang.stderr
  assert "`src`='xx'" in bad_lang.stderr and "de, fr, ja, ru, zh" in bad_lang.stderr
  assert "Traceback" not in bad_lang.stderr
  bad_arg = _cli(tmp_path, "--config", "configs/distill_data.py:runlocal,temperature=1")
  assert bad_arg.returncode == 2 and "configs/distill_data.py: unknown argument 'temperature'" in bad_arg.stderr


def test_generated_records_read_back_through_their_seqio_task(full_run, data_dir, assets, tmp_path):
  """The job's own output through `selfdistill_de_en`: inputs are the chat prompt, targets the
  target's response ids (one EOS, none after a response cut off by max_new_tokens); a vocabulary
  other than the generating target's is refused."""
  import seqio
  from specjax.data import tasks
  from specjax.models.tokenizer_utils import train_tokenizer

  workdir, _ = full_run
  records = list(selfdistill.read_records(workdir))
  tasks.register_tasks(data_dir=data_dir, vocab_dir=assets, selfdistill_dir=workdir, shuffle_buffer_size=16)
  vocab = tasks.vocabulary()
  ds = seqio.get_mixture_or_task("selfdistill_de_en").get_dataset(
    {"inputs": 512, "targets": 64}, split="train", shuffle=False
  )
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == len(records)
  truncated = [r["truncated"] for r in records]
  assert any(truncated) and not all(truncated)  # 8 new tokens: some responses end, some are cut off
  for ex, r in zip(examples, records):
    assert vocab.decode(ex["inputs"]) == r["chat_prompt"]
    ids = r["response_token_ids"]
    assert r["truncated"] == (len(ids) == 8 and ids[-1] != vocab.eos_id)
    assert list(ex["targets"]) == (ids if r["truncated"] else ids[:-1] + [vocab.eos_id])
  train_tokenizer(["Ein ganz anderer Text.", "Something else entirely."] * 20, 300, str(tmp_path / "other"))
  with pytest.raises(SpecjaxError, match="manifest.json.*differs from the vocabulary"):
    tasks.register_tasks(data_dir=data_dir, vocab_dir=str(tmp_path / "other"), selfdistill_dir=workdir)
