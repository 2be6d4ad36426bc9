"""Paper-style tables, plots and report.md from evaluation records (schema: specjax/eval/__init__.py).

The main table has the paper's layout (rows = methods, columns = de fr ja ru zh + Avg, cells
"speedup (τ)") so a run can be read side by side with ../shared/PAPER.md. Speedups are derived
here, never stored, from the `ar` record of the same run (language, temperature, seed). Plots
use matplotlib's Figure directly (Agg canvas, no pyplot state), so importing this module never
changes a notebook's backend.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from specjax import fileio
from specjax.data.parallel import LANGS
from specjax.errors import SpecjaxError

PLAIN = "Plain decoding"
PLD = "Prompt lookup (PLD)"
GENERAL = "SpS, general drafter"
SPECIALIZED = "SpS, specialized drafter"
AUTO = "SpS, routed drafter (auto)"
MAIN_ROWS = (PLAIN, PLD, GENERAL, SPECIALIZED, AUTO)
_METHODS = ("ar", "sps", "pld")
_REQUIRED = ("language", "method", "temperature", "seed", "tokens_per_second")


# --- records and speedups --------------------------------------------------------------


def _describe(record: dict) -> str:
  return (
    f"record (language={record.get('language')!r}, method={record.get('method')!r}, "
    f"drafter={record.get('drafter')!r}, temperature={record.get('temperature')!r}, "
    f"seed={record.get('seed')!r})"
  )


def _check(records: Sequence[dict]) -> list[dict]:
  """The fields every table needs, checked once so later errors are about the data, not typos."""
  records = list(records)
  for index, record in enumerate(records):
    if not isinstance(record, dict):
      raise SpecjaxError(f"records[{index}]: expected a dict, got {type(record).__name__}")
    for field in _REQUIRED:
      if field not in record:
        raise SpecjaxError(f"records[{index}] {_describe(record)}: missing field `{field}`")
    if record["method"] not in _METHODS:
      raise SpecjaxError(f"records[{index}] {_describe(record)}: method must be one of {_METHODS}")
    tps = record["tokens_per_second"]
    if not isinstance(tps, (int, float)) or not tps > 0:
      raise SpecjaxError(f"records[{index}] {_describe(record)}: tokens_per_second={tps!r} must be a positive number")
  return records


def _run_key(record: dict) -> tuple:
  return record["language"], float(record["temperature"]), record["seed"]


def speedups(records: Sequence[dict]) -> list[dict]:
  """Each non-ar record plus `speedup`: its tokens/s over the same run's plain decoding."""
  records = _check(records)
  baseline = {}
  for record in records:
    if record["method"] == "ar":
      if _run_key(record) in baseline:
        raise SpecjaxError(f"two `ar` records for (language, temperature, seed) = {_run_key(record)}")
      baseline[_run_key(record)] = record["tokens_per_second"]
  out = []
  for record in records:
    if record["method"] == "ar":
      continue
    language, temperature, seed = _run_key(record)
    if (language, temperature, seed) not in baseline:
      raise SpecjaxError(
        f"no `ar` record for (language={language!r}, temperature={temperature:g}, "
        f"seed={seed!r}): the speedup of {_describe(record)} needs plain decoding "
        "measured in the same run"
      )
    out.append({**record, "speedup": record["tokens_per_second"] / baseline[_run_key(record)]})
  return out


def method_label(record: dict) -> str:
  """The row name of a record, in the paper's words."""
  method, drafter = record.get("method"), record.get("drafter")
  if method == "ar":
    return PLAIN
  if method == "pld":
    return PLD
  if method != "sps":
    raise SpecjaxError(f"{_describe(record)}: method must be one of {_METHODS}")
  if not isinstance(drafter, str) or not drafter:
    raise SpecjaxError(f"{_describe(record)}: an sps record needs a `drafter` name")
  if drafter == "general":
    return GENERAL
  if drafter == "auto":
    return AUTO
  return SPECIALIZED if drafter == record.get("language") else f"SpS, {drafter} drafter"


def _at(records: Sequence[dict], temperature: float) -> list[dict]:
  return [r for r in records if math.isclose(float(r["temperature"]), float(temperature), abs_tol=1e-9)]


def _ordered_languages(languages) -> list[str]:
  """de fr ja ru zh first (the paper's five), then other categories alphabetically."""
  present = set(languages)
  return [lang for lang in LANGS if lang in present] + sorted(present - set(LANGS))


def _column_name(language: str) -> str:
  return language.capitalize() if language in LANGS else language


def _is_cross_language(record: dict) -> bool:
  drafter = record.get("drafter")
  return record["method"] == "sps" and drafter in LANGS and drafter != record["language"]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
  """Mean and sample std over seeds (None for a single seed: nothing to spread)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# --- main table --------------------------------------------------------------------------


def _main_stats(records: Sequence[dict], temperature: float):
  """(columns, {label: {language: (mean speedup, std, mean τ | None)}}) in row order."""
  records = _check(records)
  at_t = _at(records, temperature)
  if not at_t:
    present = sorted({float(r["temperature"]) for r in records})
    raise SpecjaxError(f"no records at temperature {temperature:g} (present: {present})")
  samples: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
  for record in _at(speedups(records), temperature):
    if not _is_cross_language(record):
      cell = samples.setdefault(method_label(record), {}).setdefault(record["language"], [])
      cell.append((record["speedup"], record.get("tau")))
  columns = _ordered_languages(r["language"] for r in at_t)
  plain = {r["language"] for r in at_t if r["method"] == "ar"}
  stats = {PLAIN: {lang: (1.0, None, None) for lang in plain}} if plain else {}
  extra_rows = sorted(set(samples) - set(MAIN_ROWS))
  for label in [row for row in MAIN_ROWS if row in samples] + extra_rows:
    stats[label] = {}
    for lang, cell in samples[label].items():
      mean, std = _mean_std([speedup for speedup, _ in cell])
      taus = [tau for _, tau in cell if tau is not None]
      stats[label][lang] = (mean, std, statistics.fmean(taus) if taus else None)
  return columns, stats


def _average(cells: dict, columns: list[str]) -> tuple[float, None, float | None] | None:
  """Mean over the paper's languages in the table; None when the row lacks one of them."""
  langs = [lang for lang in columns if lang in LANGS]
  if not langs or any(lang not in cells for lang in langs):
    return None
  taus = [cells[lang][2] for lang in langs]
  mean_tau = statistics.fmean(taus) if all(tau is not None for tau in taus) else None
  return statistics.fmean(cells[lang][0] for lang in langs), None, mean_tau


def _cell_text(cell) -> str:
  if cell is None:
    return "–"
  mean, std, tau = cell
  speed = f"{mean:.2f}×" if std is None else f"{mean:.2f}±{std:.2f}×"
  return speed if tau is None else f"{speed} ({tau:.2f})"


def _table_grid(records: Sequence[dict], temperature: float):
  """Header, body rows of cell strings, and which body cells hold their column's best speedup."""
  columns, stats = _main_stats(records, temperature)
  header = [f"T={temperature:g}"] + [_column_name(lang) for lang in columns] + ["Avg"]
  cells = [[row.get(lang) for lang in columns] + [_average(row, columns)] for row in stats.values()]
  best = []
  for column in range(len(columns) + 1):
    values = [round(row[column][0], 2) for row in cells if row[column] is not None]
    best.append(max(values) if values else None)
  body = [[label] + [_cell_text(cell) for cell in row] for label, row in zip(stats, cells)]
  is_best = [
    [False] + [cell is not None and round(cell[0], 2) == best[c] for c, cell in enumerate(row)] for row in cells
  ]
  return header, body, is_best


def main_table(records: Sequence[dict], temperature: float) -> str:
  """Markdown in the paper's layout; cells "speedup (τ)", mean±std over seeds; best per column bold."""
  header, body, is_best = _table_grid(records, temperature)
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for row, bold in zip(body, is_best):
    lines.append("| " + " | ".join(f"**{text}**" if b else text for text, b in zip(row, bold)) + " |")
  return "\n".join(lines)


def print_table(records: Sequence[dict], temperature: float) -> str:
  """main_table as aligned plain text for a terminal (best cells marked *); printed and returned."""
  header, body, is_best = _table_grid(records, temperature)
  rows = [header] + [[text + ("*" if b else "") for text, b in zip(row, bold)] for row, bold in zip(body, is_best)]
  widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
  lines = [
    "  ".join(text.ljust(widths[c]) if c == 0 else text.rjust(widths[c]) for c, text in enumerate(row)) for row in rows
  ]
  lines.insert(1, "-" * len(lines[0]))
  text = "\n".join(lines)
  print(text)
  return text


def cross_language_matrix(records: Sequence[dict], temperature: float, value: str = "tau") -> str:
  """Markdown: rows = drafter language, columns = prompt language, mean over seeds; diagonal bold."""
  if value not in ("tau", "speedup"):
    raise SpecjaxError(f"cross_language_matrix: value={value!r} must be 'tau' or 'speedup'")
  source = speedups(records) if value == "speedup" else _check(records)
  rows = [r for r in _at(source, temperature) if r["method"] == "sps" and r.get("drafter") in LANGS]
  if not rows:
    raise SpecjaxError(f"cross_language_matrix: no sps records with a language drafter at T={temperature:g}")
  samples: dict[tuple[str, str], list[float]] = {}
  for record in rows:
    if record.get(value) is not None:
      samples.setdefault((record["drafter"], record["language"]), []).append(record[value])
  drafters = _ordered_languages(r["drafter"] for r in rows)
  prompts = _ordered_languages(r["language"] for r in rows)
  unit = "×" if value == "speedup" else ""
  symbol = "speedup" if value == "speedup" else "τ"
  header = [f"{symbol}, T={temperature:g}: drafter ↓ prompt →"] + [_column_name(p) for p in prompts]
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  for drafter in drafters:
    cells = []
    for prompt in prompts:
      values = samples.get((drafter, prompt))
      text = f"{statistics.fmean(values):.2f}{unit}" if values else "–"
      cells.append(f"**{text}**" if drafter == prompt and values else text)
    lines.append(f"| {_column_name(drafter)} drafter | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------


def _save(figure: Figure, path: str) -> None:
  fileio.makedirs(os.path.dirname(path if fileio.is_remote(path) else os.path.abspath(path)), exist_ok=True)
  figure.tight_layout()
  buffer = io.BytesIO()  # rendered here, written through fileio (gs:// workdirs)
  figure.savefig(buffer, dpi=120, format=os.path.splitext(path)[1][1:].lower() or None)
  with fileio.open(path, "wb") as f:
    f.write(buffer.getvalue())


def plot_speedup(records: Sequence[dict], path: str, temperature: float) -> None:
  """Grouped bars per language, one per method, error bars = std over seeds; dashed line = plain."""
  columns, stats = _main_stats(records, temperature)
  labels = [label for label in stats if label != PLAIN]
  figure = Figure(figsize=(max(6.0, 1.5 * len(columns) + 2), 4.2))
  axes = figure.add_subplot()
  width = 0.8 / max(len(labels), 1)
  for i, label in enumerate(labels):
    offsets = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(columns))]
    cells = [stats[label].get(lang) for lang in columns]
    heights = [cell[0] if cell else math.nan for cell in cells]  # NaN: no bar where no run
    errors = [(cell[1] or 0.0) if cell else math.nan for cell in cells]
    axes.bar(offsets, heights, width, yerr=errors, capsize=3, label=label)
  axes.axhline(1.0, linestyle="--", color="gray", linewidth=1, label=PLAIN)
  axes.set_xticks(range(len(columns)), [_column_name(lang) for lang in columns])
  axes.set_ylabel("speedup over plain decoding")
  axes.set_title(f"Speedup, T={temperature:g} (mean ± std over seeds)")
  axes.legend(fontsize=8)
  _save(figure, path)


_LINE_STYLES = {SPECIALIZED: "-", GENERAL: "--", AUTO: ":"}


def _per_position_series(records: Sequence[dict], temperature: float) -> dict[tuple[str, str], list[float]]:
  """(language, label) -> cumulative acceptance per draft position, mean over seeds."""
  grouped: dict[tuple[str, str], list[list[float]]] = {}
  for record in _at(_check(records), temperature):
    curve = record.get("per_position")
    if record["method"] != "sps" or not curve or method_label(record) not in _LINE_STYLES:
      continue
    if not all(isinstance(v, (int, float)) for v in curve):
      raise SpecjaxError(f"{_describe(record)}: per_position must be a list of numbers, got {curve!r}")
    grouped.setdefault((record["language"], method_label(record)), []).append(list(curve))
  # Draft lengths may differ between seeds (dynamic schedule): average the common positions.
  return {
    key: np.mean([c[: min(map(len, curves))] for c in curves], axis=0).tolist() for key, curves in grouped.items()
  }


def plot_per_position(records: Sequence[dict], path: str, temperature: float) -> None:
  """Cumulative acceptance vs draft position: colour = language, line style = drafter kind."""
  series = _per_position_series(records, temperature)
  if not series:
    raise SpecjaxError(f"plot_per_position: no sps records with per_position at T={temperature:g}")
  languages = _ordered_languages(lang for lang, _ in series)
  figure = Figure(figsize=(6.5, 4.2))
  axes = figure.add_subplot()
  for (lang, label), curve in sorted(series.items(), key=lambda kv: (languages.index(kv[0][0]), kv[0][1])):
    colour = f"C{languages.index(lang) % 10}"
    kind = label.removeprefix("SpS, ").removesuffix(" drafter")
    axes.plot(
      range(1, len(curve) + 1),
      curve,
      _LINE_STYLES[label],
      color=colour,
      marker="o",
      markersize=3,
      label=f"{_column_name(lang)}, {kind}",
    )
  axes.set_xticks(range(1, max(map(len, series.values())) + 1))
  axes.set_xlabel("draft position k")
  axes.set_ylabel("P(first k draft tokens accepted)")
  axes.set_ylim(0, 1.05)
  axes.set_title(f"Per-position acceptance, T={temperature:g}")
  axes.legend(fontsize=7, ncol=2, handlelength=3.5)
  _save(figure, path)


def _points_by_label(points: Sequence[dict]) -> dict[str, list[tuple[float, float]]]:
  series: dict[str, list[tuple[float, float]]] = {}
  for index, point in enumerate(points):
    if not isinstance(point, dict) or any(k not in point for k in ("x", "y", "label")):
      raise SpecjaxError(f"ablation points[{index}]={point!r}: needs keys x, y, label")
    if not all(isinstance(point[k], (int, float)) for k in ("x", "y")):
      raise SpecjaxError(f"ablation points[{index}]={point!r}: x and y must be numbers")
    series.setdefault(str(point["label"]), []).append((float(point["x"]), float(point["y"])))
  return {label: sorted(xy) for label, xy in series.items()}


def _fit_log10(label: str, xy: list[tuple[float, float]]) -> tuple[float, float]:
  """Least squares y = a + b·log10(x): the paper's 'speedup grows with the log of tokens'."""
  xs = [x for x, _ in xy]
  if min(xs) <= 0 or len(set(xs)) < 2:
    raise SpecjaxError(f"ablation series {label!r}: a log fit needs x > 0 at two or more distinct x, got {xs}")
  b, a = np.polyfit(np.log10(xs), [y for _, y in xy], 1)
  return float(a), float(b)


def plot_ablation(
  points: Sequence[dict], path: str, x_label: str, y_label: str, log_x: bool = False, fit_log: bool = False
) -> dict[str, tuple[float, float]]:
  """One series per label; with fit_log, a dashed y = a + b·log10(x) line each. Returns {label: (a, b)}."""
  series = _points_by_label(points)
  if not series:
    raise SpecjaxError(f"plot_ablation: no points for {path}")
  figure = Figure(figsize=(6.0, 4.0))
  axes = figure.add_subplot()
  fits = {}
  for i, (label, xy) in enumerate(series.items()):
    colour = f"C{i % 10}"
    legend = label
    if fit_log:
      fits[label] = a, b = _fit_log10(label, xy)
      grid = np.geomspace(xy[0][0], xy[-1][0], 50)
      axes.plot(grid, a + b * np.log10(grid), "--", color=colour, linewidth=1)
      legend = f"{label} (fit b = {b:.3g} per decade)"
    axes.plot([x for x, _ in xy], [y for _, y in xy], "o-", color=colour, label=legend)
  if log_x:
    axes.set_xscale("log")
  axes.set_xlabel(x_label)
  axes.set_ylabel(y_label)
  axes.legend(fontsize=8)
  _save(figure, path)
  return fits


def ablation_section(
  title: str,
  points: Sequence[dict],
  x_label: str = "x",
  y_label: str = "y",
  image: str | None = None,
  fits: dict[str, tuple[float, float]] | None = None,
) -> str:
  """Markdown: a heading, the points as a table, the log fits if any, and the plot."""
  lines = [f"## {title}", "", f"| series | {x_label} | {y_label} |", "| --- | --- | --- |"]
  for label, xy in _points_by_label(points).items():
    lines += [f"| {label} | {x:g} | {y:.4g} |" for x, y in xy]
  if fits:
    lines += [
      "",
      "Least-squares fit y = a + b·log10(x): "
      + "; ".join(f"{label}: a = {a:.3f}, b = {b:.3f}" for label, (a, b) in fits.items()),
    ]
  if image:
    lines += ["", f"![{title}]({image})"]
  return "\n".join(lines)


# --- report ------------------------------------------------------------------------------


def _slug(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "ablation"


def write_report(
  records: Sequence[dict], out_dir: str, title: str, notes: Sequence[str] = (), ablations: Sequence[tuple] = ()
) -> str:
  """Writes out_dir/report.md (+ its PNGs) and out_dir/records.json; returns the report's path.

  ablations: (title, points, x_label, y_label, log_x, fit_log) each, one plot and section each.
  """
  records = _check(records)
  speedups(records)  # a missing baseline fails here, before any file is written
  fileio.makedirs(out_dir, exist_ok=True)
  lines = [
    f"# {title}",
    "",
    "Speedup = tokens/s over plain decoding's in the same run (same language, temperature "
    "and seed); τ = mean accepted length per verification step. Cells: mean (± sample std "
    "when several seeds) over seeds, τ in brackets; Avg = mean over the languages; best per "
    "column in bold.",
    "",
  ]
  for temperature in sorted({float(r["temperature"]) for r in records}):
    lines += [f"## T={temperature:g}", "", main_table(records, temperature), ""]
    at_t = _at(records, temperature)
    if len({r["drafter"] for r in at_t if _is_cross_language(r)}) > 1:
      for value, name in (("tau", "τ"), ("speedup", "speedup")):
        lines += [
          f"### Cross-language {name}, T={temperature:g}",
          "",
          cross_language_matrix(records, temperature, value),
          "",
        ]
    if any(r["method"] != "ar" for r in at_t):
      image = f"speedup_T{temperature:g}.png"
      plot_speedup(records, fileio.join(out_dir, image), temperature)
      lines += [f"![speedup at T={temperature:g}]({image})", ""]
    if _per_position_series(records, temperature):
      image = f"per_position_T{temperature:g}.png"
      plot_per_position(records, fileio.join(out_dir, image), temperature)
      lines += [f"![per-position acceptance at T={temperature:g}]({image})", ""]
  for index, ablation in enumerate(ablations):
    if len(ablation) != 6:
      raise SpecjaxError(
        f"write_report: ablations[{index}] must be (title, points, x_label, y_label, "
        f"log_x, fit_log), got {len(ablation)} items"
      )
    ablation_title, points, x_label, y_label, log_x, fit_log = ablation
    image = f"ablation_{_slug(ablation_title)}.png"
    fits = plot_ablation(points, fileio.join(out_dir, image), x_label, y_label, log_x, fit_log)
    lines += [ablation_section(ablation_title, points, x_label, y_label, image, fits), ""]
  for note in notes:
    lines += [note, ""]
  report_path = fileio.join(out_dir, "report.md")
  with fileio.open(report_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  with fileio.open(fileio.join(out_dir, "records.json"), "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1, ensure_ascii=False)
  return report_path
