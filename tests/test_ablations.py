"""Ablations from fake sweep directories: runs named as launch/sweep.py names them, metrics written
so every expected point (and the log fit's slope, exactly 0.5) is known."""

import json
import math
import os
import textwrap

import numpy as np
import pytest

from specjax.errors import SpecjaxError
from specjax.eval import ablations
from specjax.models.config import PRESETS

TOKENS = (1_000, 10_000, 100_000)
NAMES = {n: f"lang-de_tokens-{n}" for n in TOKENS}  # launch/sweep.py's naming, spelled out


def _tau(tokens, offset=1.0):
  return offset + 0.5 * math.log10(tokens)


def _config(tmp_path, body, name="sweep_config.py"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(body))
  return str(path)


def _trainer_run(base, name, tokens, tau0, tau1=None, drafter=None, done=True):
  """metrics.jsonl as the trainer writes it: train lines, an early eval line, then the last one."""
  workdir = os.path.join(base, name)
  os.makedirs(workdir)
  last = {"step": 20, "kind": "eval", "eval/loss": 2.5, "accept/T0/tau": tau0, "accept/T0/deen/tau": tau0 + 0.1}
  if tau1 is not None:
    last["accept/T1/tau"] = tau1
  lines = [
    {"step": 10, "kind": "train", "loss": 3.0, "loss_tokens": tokens / 2},
    {"step": 10, "kind": "eval", "eval/loss": 3.0, "accept/T0/tau": 99.0, "accept/T1/tau": 99.0},
    {"step": 20, "kind": "train", "loss": 2.6, "loss_tokens": tokens / 2},
    last,
  ]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  if drafter:
    with open(os.path.join(workdir, "drafter_config.json"), "w") as f:
      json.dump(PRESETS[drafter].to_hf_dict(), f)
  if done:
    open(os.path.join(workdir, "DONE"), "w").close()


FINETUNE = """
def sweep():
  return [{"config_arg": f"lang=de,tokens={n}"} for n in (1000, 10000, 100000)]
"""


@pytest.fixture
def finetune_sweep(tmp_path):
  config = _config(tmp_path, FINETUNE)
  base = str(tmp_path / "sweep")
  for n in TOKENS:
    _trainer_run(base, NAMES[n], n, _tau(n), _tau(n, offset=0.5))
  return config, base


def test_finetune_tokens_fit_slope_is_half_and_png_written(finetune_sweep, tmp_path):
  config, base = finetune_sweep
  rows = ablations.collect(config, base)
  assert [r["name"] for r in rows] == [NAMES[n] for n in TOKENS]
  assert all(r["status"] == "done" and r["finished"] for r in rows)
  first = rows[0]
  assert first["workdir"] == os.path.join(base, NAMES[1000])
  assert first["entry"] == {"config_arg": "lang=de,tokens=1000"}
  assert first["train_tokens"] == 1000 and first["steps"] == 20 and first["eval_loss"] == 2.5
  assert first["tau"] == {"T0": _tau(1000), "T1": _tau(1000, 0.5)}  # the last eval line's
  assert first["category_tau"] == {"T0": {"deen": _tau(1000) + 0.1}}

  points = ablations.finetune_tokens(rows)
  for label in ("τ, T=0", "τ, T=1"):
    xy = sorted((p["x"], p["y"]) for p in points if p["label"] == label)
    assert [x for x, _ in xy] == list(TOKENS)
    slope, _ = np.polyfit(np.log10([x for x, _ in xy]), [y for _, y in xy], 1)
    assert abs(slope - 0.5) < 1e-9

  out = str(tmp_path / "out")
  md = ablations.write_ablations(config, base, out, "finetune_tokens")
  assert md == os.path.join(out, "ablation_finetune_tokens.md")
  with open(os.path.join(out, "ablation_finetune_tokens.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = open(md, encoding="utf-8").read()
  assert "τ, T=0: a = 1.000, b = 0.500" in text and "τ, T=1: a = 0.500, b = 0.500" in text
  assert "![" in text and "ablation_finetune_tokens.png" in text and "3 of 3 runs done" in text


def test_missing_runs_are_listed_not_errors(finetune_sweep, tmp_path):
  config, base = finetune_sweep
  missing = os.path.join(base, NAMES[100_000])
  for name in os.listdir(missing):
    os.remove(os.path.join(missing, name))  # started, nothing written yet
  rows = ablations.collect(config, base)
  assert [r["status"] for r in rows] == ["done", "done", "missing"]
  assert "no metrics.jsonl or metrics.json" in rows[2]["reason"]
  md = ablations.write_ablations(config, base, str(tmp_path / "out"), "finetune_tokens")
  text = open(md, encoding="utf-8").read()
  assert "2 of 3 runs done; missing: lang-de_tokens-100000." in text
  assert f"| {NAMES[100_000]} | missing |" in text

  # Nothing finished: the error names every missing run.
  for n in TOKENS:
    workdir = os.path.join(base, NAMES[n])
    for name in os.listdir(workdir):
      os.remove(os.path.join(workdir, name))
    os.rmdir(workdir)
  with pytest.raises(SpecjaxError, match="no finished run") as error:
    ablations.write_ablations(config, base, str(tmp_path / "out2"), "finetune_tokens")
  assert all(NAMES[n] in str(error.value) for n in TOKENS) and "no run directory" in str(error.value)


GAMMA = """
def sweep():
  return ([{"config_arg": "methods=ar+sps", "gamma": g, "dynamic_gamma": False} for g in (1, 3)] +
          [{"config_arg": "methods=ar+sps", "gamma": 10, "dynamic_gamma": True}])
"""
# γ -> (speedup on de, τ on de); fr is +0.2 speedup and +0.4 τ, T=1 is -0.3 speedup and -0.5 τ.
GAMMA_RESULTS = {1: (1.4, 1.8), 3: (2.0, 2.6), 10: (2.4, 3.2)}


def _record(language, method, temperature, seed, speedup=1.0, tau=None):
  return {
    "language": language,
    "category": f"{language}en",
    "method": method,
    "drafter": "general" if method == "sps" else None,
    "temperature": temperature,
    "seed": seed,
    "prompts": 4,
    "new_tokens": 100,
    "wall_s": 1.0,
    "tokens_per_second": 100.0 * speedup,
    "tau": tau,
    "acceptance_rate": None,
    "per_position": None,
    "per_position_conditional": None,
  }


def test_gamma_points_are_mean_speedup_and_tau(tmp_path):
  config = _config(tmp_path, GAMMA)
  base = str(tmp_path / "sweep")
  names = {
    1: "methods-ar-sps_gamma-1_dynamic-gamma-false",
    3: "methods-ar-sps_gamma-3_dynamic-gamma-false",
    10: "methods-ar-sps_gamma-10_dynamic-gamma-true",
  }
  for g, (speedup, tau) in GAMMA_RESULTS.items():
    records = []
    for temperature, dt in ((0.0, 0.0), (1.0, 0.3)):
      for language, extra in (("de", 0.0), ("fr", 0.2)):
        records.append(_record(language, "ar", temperature, 0))
        records.append(_record(language, "sps", temperature, 0, speedup + extra - dt, tau + 2 * extra - 5 * dt / 3))
    os.makedirs(os.path.join(base, names[g]))
    with open(os.path.join(base, names[g], "metrics.json"), "w") as f:
      json.dump({"records": records}, f)
  rows = ablations.collect(config, base)
  assert [r["name"] for r in rows] == [names[g] for g in (1, 3, 10)]
  assert all(r["kind"] == "eval" and r["status"] == "done" and not r["finished"] for r in rows)

  got = {(p["label"], p["x"]): p["y"] for p in ablations.gamma(rows, config)}
  expected = {}
  for g, (speedup, tau) in GAMMA_RESULTS.items():
    dynamic = " (dynamic γ)" if g == 10 else ""
    expected[(f"speedup, T=0{dynamic}", g)] = speedup + 0.1
    expected[(f"τ, T=0{dynamic}", g)] = tau + 0.2
    expected[(f"speedup, T=1{dynamic}", g)] = speedup + 0.1 - 0.3
    expected[(f"τ, T=1{dynamic}", g)] = tau + 0.2 - 0.5
  assert got.keys() == expected.keys()
  assert all(abs(got[k] - expected[k]) < 1e-9 for k in expected)

  md = ablations.write_ablations(config, base, str(tmp_path / "out"), "gamma")
  assert os.path.exists(os.path.join(tmp_path, "out", "ablation_gamma.png"))
  assert "SpS, general drafter, T=0: 1.50× (τ 2.00)" in open(md, encoding="utf-8").read()


def test_pretrain_vs_scratch_and_drafter_size(tmp_path):
  config = _config(
    tmp_path,
    """
  def sweep():
    return [{"config_arg": "lang=de"}, {"config_arg": "lang=de,scratch=true"}, {"config_arg": "lang=fr"}]
  """,
  )
  base = str(tmp_path / "ft")
  _trainer_run(base, "lang-de", 5000, 3.0, 2.5)
  _trainer_run(base, "lang-de_scratch-true", 5000, 2.0, 1.5)
  _trainer_run(base, "lang-fr", 5000, 2.9)  # no twin: not a bar
  points = ablations.pretrain_vs_scratch(ablations.collect(config, base))
  assert sorted((p["label"], p["x"], p["y"], p["arm"]) for p in points) == [
    ("τ, T=0", 0.0, 3.0, "pretrain + finetune"),
    ("τ, T=0", 1.0, 2.0, "finetune only"),
    ("τ, T=1", 0.0, 2.5, "pretrain + finetune"),
    ("τ, T=1", 1.0, 1.5, "finetune only"),
  ]
  assert os.path.exists(ablations.write_ablations(config, base, str(tmp_path / "o1"), "pretrain_vs_scratch"))

  config = _config(
    tmp_path,
    """
  def sweep():
    return [{"config_arg": f"size={s}"} for s in ("drafter-small", "vicuna-68m", "drafter-large")]
  """,
    name="pretrain_like.py",
  )
  base = str(tmp_path / "pt")
  for tau, size in ((1.5, "drafter-small"), (2.0, "vicuna-68m"), (2.4, "drafter-large")):
    _trainer_run(base, f"size-{size}", 1000, tau, drafter=size)
  points = ablations.drafter_size(ablations.collect(config, base))
  assert [(p["x"], p["y"]) for p in points] == [
    (PRESETS["drafter-small"].num_params, 1.5),
    (PRESETS["vicuna-68m"].num_params, 2.0),
    (PRESETS["drafter-large"].num_params, 2.4),
  ]


def test_cli_and_config_without_sweep(finetune_sweep, tmp_path, capsys):
  config, base = finetune_sweep
  out = str(tmp_path / "cli")
  assert ablations.main(["--config", config, "--sweep_dir", base, "--kind", "finetune_tokens", "--out", out]) == 0
  assert capsys.readouterr().out.strip() == os.path.join(out, "ablation_finetune_tokens.md")

  plain = _config(tmp_path, "def get_config(arg=None):\n  return {}\n", name="no_sweep.py")
  with pytest.raises(SpecjaxError, match=r"no_sweep\.py: no sweep\(\) function"):
    ablations.collect(plain, base)
  assert ablations.main(["--config", plain, "--sweep_dir", base, "--kind", "gamma", "--out", out]) == 2
  assert "no_sweep.py" in capsys.readouterr().err
