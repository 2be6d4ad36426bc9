r"""Ablations from a sweep's runs: one plot (PNG) and one markdown section per ablation.

A sweep is a config file's `sweep()` expanded by launch/sweep.py into runs BASE/NAME; this reads
what each run left there (trainer runs: metrics.jsonl and drafter_config.json; eval_specbench
runs: metrics.json) and plots the paper's ablations. Runs not finished yet are listed as missing,
so a half-done sweep already gives a partial plot.

  # τ at T=0 and T=1 against finetuning tokens (log x, least-squares fit y = a + b·log10(x)):
  python -m specjax.eval.ablations --config configs/finetune.py --sweep_dir BASE --kind finetune_tokens --out DIR
  # pretrain + finetune against finetune only (scratch=true), per language:
  python -m specjax.eval.ablations --config configs/finetune.py --sweep_dir BASE --kind pretrain_vs_scratch --out DIR
  # τ (or held-out loss when the runs measured no acceptance) against drafter parameters:
  python -m specjax.eval.ablations --config configs/pretrain.py --sweep_dir BASE --kind drafter_size --out DIR
  # speedup and τ of speculative sampling against the draft length γ:
  python -m specjax.eval.ablations --config configs/eval_specbench.py --sweep_dir BASE --kind gamma --out DIR

BASE is the --workdir given to launch/sweep.py. Each writes DIR/ablation_<kind>.png and
DIR/ablation_<kind>.md (the points, the fit, the plot and every run with its status) and prints
the markdown's path.

Training tokens are the response tokens the drafter was trained on (the sum of `loss_tokens`
over the run's train lines), not the config's `tokens=` (which counts whole rows). τ is the last
evaluation's. Eval runs are averaged over languages and seeds per method row (report.method_label).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
from typing import Callable, Sequence

from specjax import fileio, sweeps
from specjax.errors import SpecjaxError
from specjax.eval import report
from specjax.models.config import LlamaConfig
from specjax.train.writers import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("finetune_tokens", "pretrain_vs_scratch", "drafter_size", "gamma")
TITLES = {
  "finetune_tokens": "τ against finetuning tokens",
  "pretrain_vs_scratch": "Pretrain + finetune against finetune only",
  "drafter_size": "Drafter size",
  "gamma": "Draft length γ",
}
ARMS = ("pretrain + finetune", "finetune only")  # x = 0 and x = 1 of pretrain_vs_scratch


# --- the sweep's runs --------------------------------------------------------------------


def _runs(config_path: str) -> list[tuple[dict, dict]]:
  """(entry, expanded run) per sweep() entry, named exactly as launch/sweep.py names them."""
  entries = sweeps.load_sweep(config_path)  # a SweepError (a SpecjaxError) names the config file
  return list(zip(entries, sweeps.expand(config_path, entries)))


def _arg(entry: dict) -> dict[str, str]:
  """The entry's config_arg as key -> text ("lang=de,scratch" -> {"lang": "de", "scratch": "true"})."""
  out = {}
  for item in entry.get("config_arg", "").split(","):
    key, has_value, value = item.strip().partition("=")
    if key.strip():
      out[key.strip()] = value.strip() if has_value else "true"
  return out


def _truthy(value) -> bool:
  if isinstance(value, str):
    return value.strip().lower() in ("1", "true", "yes", "")
  return bool(value)


def _number(value) -> float | None:
  """A finite float, or None (the writers store NaN as the string "nan")."""
  if isinstance(value, bool):
    return None
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      return None
  if isinstance(value, (int, float)) and math.isfinite(value):
    return float(value)
  return None


# --- reading runs ------------------------------------------------------------------------


def _read_json(path: str):
  try:
    with fileio.open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise SpecjaxError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None


def _drafter_params(path: str) -> int:
  if fileio.is_remote(path):  # from_hf_json reads local files only
    hf = _read_json(path)
    if not isinstance(hf, dict):
      raise SpecjaxError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return LlamaConfig.from_hf_dict(hf, source=path).num_params
  return LlamaConfig.from_hf_json(path).num_params


def _trainer_numbers(workdir: str) -> dict:
  """The last eval line's τ (per temperature and category) and loss; tokens and steps trained."""
  path = fileio.join(workdir, "metrics.jsonl")
  lines = read_jsonl(path)
  train = [r for r in lines if r.get("kind") == "train"]
  evals = [r for r in lines if r.get("kind") == "eval"]
  out = {
    "kind": "train",
    "tau": {},
    "category_tau": {},
    "eval_loss": None,
    "eval_step": None,
    "train_tokens": None,
    "steps": None,
    "drafter_params": None,
  }
  if train:
    tokens = [_number(r.get("loss_tokens")) for r in train]
    out["train_tokens"] = sum(t for t in tokens if t is not None) if any(t is not None for t in tokens) else None
    steps = [_number(r.get("step")) for r in train]
    out["steps"] = int(max(s for s in steps if s is not None)) if any(s is not None for s in steps) else None
  if evals:
    last = evals[-1]
    out["eval_step"] = last.get("step")
    out["eval_loss"] = _number(last.get("eval/loss"))
    for key, value in last.items():
      parts = key.split("/")
      if len(parts) < 3 or parts[0] != "accept" or not parts[1].startswith("T") or parts[-1] != "tau":
        continue
      if len(parts) == 3:
        out["tau"][parts[1]] = _number(value)
      elif len(parts) == 4:
        out["category_tau"].setdefault(parts[1], {})[parts[2]] = _number(value)
  config_path = fileio.join(workdir, "drafter_config.json")
  if fileio.exists(config_path):
    out["drafter_params"] = _drafter_params(config_path)
  if not train and not evals:
    raise _Missing(f"{path} has no train or eval line yet")
  return out


def _eval_numbers(workdir: str) -> dict:
  """Mean speedup and τ per method row and temperature (over languages and seeds)."""
  path = fileio.join(workdir, "metrics.json")
  data = _read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("records"), list):
    raise SpecjaxError(f'{path}: expected {{"records": [...]}} (schema: specjax/eval/__init__.py)')
  try:
    rows = report.speedups(data["records"])
  except SpecjaxError as e:
    raise SpecjaxError(f"{path}: {e}") from None
  groups: dict[tuple[str, float], list[dict]] = {}
  for record in rows:
    groups.setdefault((report.method_label(record), float(record["temperature"])), []).append(record)
  results = []
  for (label, temperature), records in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    taus = [_number(r.get("tau")) for r in records]
    taus = [t for t in taus if t is not None]
    results.append(
      {
        "label": label,
        "method": records[0]["method"],
        "temperature": temperature,
        "speedup": statistics.fmean(r["speedup"] for r in records),
        "tau": statistics.fmean(taus) if taus else None,
        "records": len(records),
      }
    )
  return {"kind": "eval", "eval": results}


class _Missing(Exception):
  """A run without results yet (not an error: sweeps finish run by run)."""


def collect(config_path: str, sweep_dir: str) -> list[dict]:
  """One row per sweep() entry, in sweep order, with the numbers its run left (or status missing)."""
  rows = []
  for entry, run in _runs(config_path):
    workdir = sweeps.join(sweep_dir, run["name"])
    row = {
      "name": run["name"],
      "entry": dict(entry),
      "workdir": workdir,
      "status": "missing",
      "reason": None,
      "kind": None,
      "finished": fileio.exists(sweeps.done_path(workdir)),
    }
    try:
      if fileio.exists(fileio.join(workdir, "metrics.json")):
        row.update(_eval_numbers(workdir))
      elif fileio.exists(fileio.join(workdir, "metrics.jsonl")):
        row.update(_trainer_numbers(workdir))
      elif fileio.exists(workdir):
        raise _Missing("no metrics.jsonl or metrics.json yet")
      else:
        raise _Missing("no run directory")
      row["status"] = "done"
    except _Missing as e:
      row["reason"] = str(e)
    rows.append(row)
  return rows


# --- points ------------------------------------------------------------------------------


def _get(row: dict, key):
  """A row's number at a key ("tau/T0" walks nested dicts) or from a callable; None if absent."""
  if callable(key):
    return _number(key(row))
  value = row
  for part in str(key).split("/"):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return _number(value)


def ablation_points(rows: Sequence[dict], x, y, label=None) -> list[dict]:
  """Points {x, y, label, run} for plot_ablation from the done rows where both x and y exist.

  x, y: a key into the row ("train_tokens", "tau/T0") or a callable row -> number. label: a
  string, a callable row -> string, or None (y's key).
  """
  points = []
  for row in rows:
    if row.get("status") != "done":
      continue
    xv, yv = _get(row, x), _get(row, y)
    if xv is None or yv is None:
      continue
    name = label(row) if callable(label) else (label if label is not None else str(y))
    points.append({"x": xv, "y": yv, "label": name, "run": row["name"]})
  return points


def _temperatures(rows: Sequence[dict]) -> list[str]:
  found = {t for row in rows if row.get("status") == "done" for t, v in (row.get("tau") or {}).items() if v is not None}
  return sorted(found, key=lambda t: float(t[1:]) if t[1:].replace(".", "", 1).isdigit() else math.inf)


def _language_suffix(rows: Sequence[dict]) -> Callable[[dict], str]:
  languages = {_arg(row["entry"]).get("lang") for row in rows}
  if len(languages) <= 1:
    return lambda row: ""
  return lambda row: f" ({_arg(row['entry']).get('lang', '?')})"


def _is_scratch(row: dict) -> bool:
  entry = row["entry"]
  return _truthy(_arg(entry).get("scratch", "false")) or _truthy(entry.get("scratch", False))


def _has_tokens(row: dict) -> bool:
  return "tokens" in _arg(row["entry"]) or "train_tokens" in row["entry"]


def finetune_tokens(rows: Sequence[dict]) -> list[dict]:
  """τ at each temperature against training tokens, per language that has a token-limited run.

  The language's other pretrained runs (the full finetune) join its curve: x is measured.
  """
  swept = {_arg(row["entry"]).get("lang") for row in rows if _has_tokens(row) and not _is_scratch(row)}
  rows = [row for row in rows if not _is_scratch(row) and _arg(row["entry"]).get("lang") in swept]
  suffix = _language_suffix(rows)
  points = []
  for t in _temperatures(rows):
    points += ablation_points(rows, "train_tokens", f"tau/{t}", lambda row, t=t: f"τ, T={t[1:]}{suffix(row)}")
  return points


def pretrain_vs_scratch(rows: Sequence[dict]) -> list[dict]:
  """Per scratch=true run and its pretrained twin (same entry without scratch): τ at x = 0 and 1."""

  def key(row):
    arg = {k: v for k, v in _arg(row["entry"]).items() if k != "scratch"}
    fields = {k: repr(v) for k, v in row["entry"].items() if k not in ("config_arg", "scratch")}
    return tuple(sorted(arg.items())), tuple(sorted(fields.items()))

  pretrained = {key(row): row for row in rows if not _is_scratch(row)}
  pairs = [(pretrained[key(row)], row) for row in rows if _is_scratch(row) and key(row) in pretrained]
  suffix = _language_suffix([row for pair in pairs for row in pair])
  points = []
  for t in _temperatures([row for pair in pairs for row in pair]):
    for pair in pairs:
      if any(_get(row, f"tau/{t}") is None or row["status"] != "done" for row in pair):
        continue  # a bar without its twin compares nothing
      for x, row in enumerate(pair):
        points += ablation_points(
          [row], lambda r, x=x: x, f"tau/{t}", lambda r, t=t, pair=pair: f"τ, T={t[1:]}{suffix(pair[1])}"
        )
  for point in points:
    point["arm"] = ARMS[int(point["x"])]
  return points


def drafter_size(rows: Sequence[dict]) -> list[dict]:
  """τ per temperature against drafter parameters; held-out loss when no run measured τ."""
  points = []
  for t in _temperatures(rows):
    points += ablation_points(rows, "drafter_params", f"tau/{t}", f"τ, T={t[1:]}")
  return points or ablation_points(rows, "drafter_params", "eval_loss", "held-out loss")


@functools.lru_cache(maxsize=None)
def _config_module(config_path: str):
  spec = importlib.util.spec_from_file_location("_specjax_ablation_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # load_sweep imported it already, so this succeeds
  return module


def _setting(row: dict, field: str, config_path: str | None):
  """A run's config field: the entry's override, else its config_arg, else get_config's value."""
  entry = row["entry"]
  if field in entry:
    return entry[field]
  if field in _arg(entry):
    return _arg(entry)[field]
  get_config = getattr(_config_module(config_path), "get_config", None) if config_path else None
  if callable(get_config):
    try:
      return get_config(entry.get("config_arg") or None).get(field)
    except Exception as e:  # noqa: BLE001 (the config file's own error, reported with its name)
      raise SpecjaxError(
        f"{config_path}: get_config({entry.get('config_arg')!r}) failed ({type(e).__name__}: {e})"
      ) from None
  return None


def gamma(rows: Sequence[dict], config_path: str | None = None) -> list[dict]:
  """Speedup and τ of the sps rows per temperature against γ (dynamic-schedule runs apart, at their ceiling)."""
  done = [row for row in rows if row.get("status") == "done" and row.get("kind") == "eval"]
  labels = {r["label"] for row in done for r in row["eval"] if r["method"] == "sps"}
  points = []
  for row in done:
    value = _number(_setting(row, "gamma", config_path))
    if value is None:
      raise SpecjaxError(f'{config_path}: run {row["name"]}: no γ (set "gamma" in its sweep() entry)')
    dynamic = " (dynamic γ)" if _truthy(_setting(row, "dynamic_gamma", config_path) or False) else ""
    for r in row["eval"]:
      if r["method"] != "sps":
        continue
      which = f", {r['label']}" if len(labels) > 1 else ""
      for name in ("speedup", "tau"):
        if r[name] is not None:
          symbol = "τ" if name == "tau" else "speedup"
          points.append(
            {"x": value, "y": r[name], "label": f"{symbol}, T={r['temperature']:g}{which}{dynamic}", "run": row["name"]}
          )
  return points


# --- report ------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
  return "–" if value is None else format(value, spec)


def _summary(row: dict) -> str:
  if row["status"] != "done":
    return row["reason"] or ""
  if row["kind"] == "eval":
    return (
      "; ".join(
        f"{r['label']}, T={r['temperature']:g}: {r['speedup']:.2f}×"
        + (f" (τ {r['tau']:.2f})" if r["tau"] is not None else "")
        for r in row["eval"]
      )
      or "no records"
    )
  parts = [f"τ {t} {_fmt(v)}" for t, v in row["tau"].items()]
  if row["eval_loss"] is not None:
    parts.append(f"held-out loss {_fmt(row['eval_loss'], '.4g')}")
  if row["train_tokens"] is not None:
    parts.append(f"{row['train_tokens']:.4g} tokens")
  if row["steps"] is not None:
    parts.append(f"{row['steps']} steps")
  if row["drafter_params"] is not None:
    parts.append(f"{row['drafter_params'] / 1e6:.1f}M parameters")
  return ", ".join(parts)


def runs_table(rows: Sequence[dict]) -> str:
  """Markdown: every run of the sweep, done or missing, with its numbers or what is missing."""
  lines = ["| run | status | numbers |", "| --- | --- | --- |"]
  for row in rows:
    status = row["status"] + ("" if row["finished"] or row["status"] != "done" else " (no DONE yet)")
    lines.append(f"| {row['name']} | {status} | {_summary(row).replace('|', '/')} |")
  return "\n".join(lines)


_AXES = {
  "finetune_tokens": ("training tokens (response tokens seen)", "τ (mean accepted length)", True, True),
  "pretrain_vs_scratch": (f"0 = {ARMS[0]}, 1 = {ARMS[1]}", "τ (mean accepted length)", False, False),
  "drafter_size": ("drafter parameters", "τ (mean accepted length)", False, False),
  "gamma": ("γ (draft tokens per round)", "speedup (×) and τ", False, False),
}


def points_for(kind: str, rows: Sequence[dict], config_path: str | None = None) -> list[dict]:
  if kind == "finetune_tokens":
    return finetune_tokens(rows)
  if kind == "pretrain_vs_scratch":
    return pretrain_vs_scratch(rows)
  if kind == "drafter_size":
    return drafter_size(rows)
  if kind == "gamma":
    return gamma(rows, config_path)
  raise SpecjaxError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")


def write_ablations(config_path: str, sweep_dir: str, out_dir: str, kind: str) -> str:
  """Writes out_dir/ablation_<kind>.png and .md for the sweep's runs; returns the markdown's path."""
  if kind not in KINDS:
    raise SpecjaxError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")
  rows = collect(config_path, sweep_dir)
  points = points_for(kind, rows, config_path)
  missing = [row for row in rows if row["status"] != "done"]
  if not points:
    done = [row["name"] for row in rows if row["status"] == "done"]
    listed = ", ".join(f"{row['name']} ({row['reason']})" for row in missing)
    because = f"missing runs: {listed}" if missing else "every run is done"
    raise SpecjaxError(
      f"{config_path}, {sweep_dir}: no finished run gives {kind} points; {because}"
      + (f"; done runs without the numbers {kind} needs: {', '.join(done)}" if done else "")
    )
  x_label, y_label, log_x, fit_log = _AXES[kind]
  if kind == "drafter_size" and points[0]["label"] == "held-out loss":
    y_label = "held-out loss"
  image = f"ablation_{kind}.png"
  fileio.makedirs(out_dir, exist_ok=True)
  fits = report.plot_ablation(points, fileio.join(out_dir, image), x_label, y_label, log_x=log_x, fit_log=fit_log)
  lines = [
    f"# Ablation: {TITLES[kind]}",
    "",
    f"Sweep `{config_path}` in `{sweep_dir}`: {len(rows) - len(missing)} of {len(rows)} runs done"
    + (f"; missing: {', '.join(row['name'] for row in missing)}." if missing else "."),
    "",
    report.ablation_section(TITLES[kind], points, x_label, y_label, image, fits),
    "",
    "## Runs",
    "",
    runs_table(rows),
    "",
  ]
  path = fileio.join(out_dir, f"ablation_{kind}.md")
  with fileio.open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m specjax.eval.ablations",
    description="Plot an ablation from a sweep's runs (see the module docstring).",
  )
  parser.add_argument("--config", required=True, help="the config file whose sweep() made the runs")
  parser.add_argument("--sweep_dir", required=True, help="the --workdir given to launch/sweep.py (BASE)")
  parser.add_argument("--kind", required=True, choices=KINDS)
  parser.add_argument("--out", required=True, help="directory for ablation_<kind>.png and .md")
  args = parser.parse_args(argv)
  try:
    path = write_ablations(args.config, args.sweep_dir, args.out, args.kind)
  except SpecjaxError as e:
    print(f"specjax: error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
