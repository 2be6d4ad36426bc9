"""Report: derived speedups, the paper-layout table, the cross-language matrix, plots and report.md,
on a fixture of records whose speedups and τ are chosen so every expected cell is known."""

import json
import math

import pytest

from specjax.errors import SpecjaxError
from specjax.eval.report import (
  cross_language_matrix,
  main_table,
  method_label,
  plot_ablation,
  print_table,
  speedups,
  write_report,
)

LANGUAGES = ("de", "fr", "ru", "zh")
AR_TPS = {"de": 100.0, "fr": 110.0, "ru": 90.0, "zh": 80.0, "writing": 120.0}
SEEDS = (0, 1, 2)
# (speedup, τ) at T=0 for the seed in the middle; seeds 0 and 2 are -/+ 0.02 (speedup), -/+ 0.1 (τ).
# T=1 subtracts 0.2 from every speedup and 0.3 from every τ.
SPEEDUP_TAU = {
  "pld": {"de": (1.12, 1.41), "fr": (1.04, 1.30), "ru": (1.02, 1.20), "zh": (0.98, 1.10)},
  "general": {"de": (1.20, 1.46), "fr": (1.14, 1.40), "ru": (1.10, 1.36), "zh": (1.24, 1.50), "writing": (1.30, 1.60)},
  "own": {"de": (2.42, 3.04), "fr": (2.06, 2.60), "ru": (1.74, 2.20), "zh": (1.54, 2.00)},
  "auto": {"de": (2.40, 3.02), "fr": (2.04, 2.58), "ru": (1.72, 2.18), "zh": (1.52, 1.98)},
}
CROSS = (0.90, 1.25)  # any language's drafter on another language's prompts


def _record(language, method, drafter, temperature, seed, speedup=1.0, tau=None):
  tps = (AR_TPS[language] + seed) * speedup
  per_position = None if tau is None else [round((1 - 1 / tau) ** k, 6) for k in range(1, 6)]
  return {
    "language": language,
    "category": language + "en" if language in LANGUAGES else language,
    "method": method,
    "drafter": drafter,
    "temperature": temperature,
    "seed": seed,
    "prompts": 20,
    "new_tokens": 800,
    "wall_s": 800 / tps,
    "tokens_per_second": tps,
    "tau": tau,
    "acceptance_rate": None,
    "per_position": per_position,
    "per_position_conditional": None,
  }


def make_records(seeds=SEEDS):
  records = []
  for temperature in (0.0, 1.0):
    for seed in seeds:

      def at(speedup, tau):
        shift = seed - 1
        return dict(speedup=speedup + 0.02 * shift - 0.2 * temperature, tau=tau + 0.1 * shift - 0.3 * temperature)

      for language in AR_TPS:
        records.append(_record(language, "ar", None, temperature, seed))
      for method, by_language in SPEEDUP_TAU.items():
        for language, (speedup, tau) in by_language.items():
          kind, drafter = {"pld": ("pld", None), "own": ("sps", language)}.get(method, ("sps", method))
          records.append(_record(language, kind, drafter, temperature, seed, **at(speedup, tau)))
      for drafter in LANGUAGES:
        for language in LANGUAGES:
          if drafter != language:
            records.append(_record(language, "sps", drafter, temperature, seed, **at(*CROSS)))
  return records


def _table_rows(table: str) -> dict[str, list[str]]:
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
  return {row[0]: row[1:] for row in rows if row[0] != "---"}


def test_speedups_divide_by_the_same_runs_ar():
  records = make_records()
  derived = speedups(records)
  assert len(derived) == len(records) - 2 * len(SEEDS) * len(AR_TPS)
  assert all(r["method"] != "ar" for r in derived)
  one = next(
    r for r in derived if r["language"] == "fr" and r["drafter"] == "fr" and r["temperature"] == 1.0 and r["seed"] == 2
  )
  assert math.isclose(one["speedup"], 2.06 + 0.02 - 0.2, rel_tol=1e-12)
  assert math.isclose(one["tokens_per_second"] / (AR_TPS["fr"] + 2), one["speedup"], rel_tol=1e-12)


def test_method_labels():
  base = {"language": "de", "method": "sps"}
  assert method_label({**base, "method": "ar", "drafter": None}) == "Plain decoding"
  assert method_label({**base, "method": "pld", "drafter": None}) == "Prompt lookup (PLD)"
  assert method_label({**base, "drafter": "general"}) == "SpS, general drafter"
  assert method_label({**base, "drafter": "de"}) == "SpS, specialized drafter"
  assert method_label({**base, "drafter": "auto"}) == "SpS, routed drafter (auto)"
  assert method_label({**base, "drafter": "ja"}) == "SpS, ja drafter"
  with pytest.raises(SpecjaxError, match="drafter"):
    method_label({**base, "drafter": None})


def test_main_table_layout_cells_average_and_bold():
  table = main_table(make_records(), 0.0)
  lines = table.splitlines()
  assert lines[0] == "| T=0 | De | Fr | Ru | Zh | writing | Avg |"
  rows = _table_rows(table)
  assert list(rows)[1:] == [
    "Plain decoding",
    "Prompt lookup (PLD)",
    "SpS, general drafter",
    "SpS, specialized drafter",
    "SpS, routed drafter (auto)",
  ]
  assert rows["Plain decoding"] == ["1.00×"] * 4 + ["1.00×", "1.00×"]
  specialized = rows["SpS, specialized drafter"]
  assert specialized[0] == "**2.42±0.02× (3.04)**"
  assert specialized[3] == "**1.54±0.02× (2.00)**"
  assert specialized[4] == "–"  # no specialized drafter for a non-language category
  assert specialized[5] == "**1.94× (2.46)**"  # Avg over de fr ru zh, not over `writing`
  general = rows["SpS, general drafter"]
  assert general[0] == "1.20±0.02× (1.46)"
  assert general[4] == "**1.30±0.02× (1.60)**"
  assert general[5] == "1.17× (1.43)"
  assert rows["Prompt lookup (PLD)"][5] == "1.04× (1.25)"
  assert rows["SpS, routed drafter (auto)"][5] == "1.92× (2.44)"
  assert "SpS, fr drafter" not in table  # cross-language runs belong to the matrix
  assert table.count("**") == 2 * 6  # one best per column


def test_main_table_other_temperature_and_single_seed():
  rows = _table_rows(main_table(make_records(), 1))
  assert rows["SpS, specialized drafter"][0] == "**2.22±0.02× (2.74)**"
  rows = _table_rows(main_table(make_records(seeds=(1,)), 0.0))
  assert rows["SpS, specialized drafter"][1] == "**2.06× (2.60)**"
  with pytest.raises(SpecjaxError, match="temperature 0.7"):
    main_table(make_records(), 0.7)


def test_print_table(capsys):
  text = print_table(make_records(), 0.0)
  assert capsys.readouterr().out.strip() == text.strip()
  assert "**" not in text and "2.42±0.02× (3.04)*" in text and "Plain decoding" in text


def test_cross_language_matrix_diagonal():
  tau = _table_rows(cross_language_matrix(make_records(), 0.0, "tau"))
  assert tau["De drafter"] == ["**3.04**", "1.25", "1.25", "1.25"]
  assert tau["Zh drafter"] == ["1.25", "1.25", "1.25", "**2.00**"]
  speedup = _table_rows(cross_language_matrix(make_records(), 1.0, "speedup"))
  assert speedup["Fr drafter"] == ["0.70×", "**1.86×**", "0.70×", "0.70×"]
  with pytest.raises(SpecjaxError, match="value"):
    cross_language_matrix(make_records(), 0.0, "acceptance")


def test_plot_ablation_fits_log_slope(tmp_path):
  points = [{"x": x, "y": 1 + 2 * math.log10(x), "label": "P+F"} for x in (4e6, 4e7, 3e8, 1.27e9)]
  points += [{"x": x, "y": 0.5 + math.log10(x), "label": "F"} for x in (4e6, 1.27e9)]
  fits = plot_ablation(points, str(tmp_path / "a.png"), "finetuning tokens", "speedup", log_x=True, fit_log=True)
  assert fits["P+F"][1] == pytest.approx(2.0, abs=1e-9)
  assert fits["P+F"][0] == pytest.approx(1.0, abs=1e-9)
  assert fits["F"][1] == pytest.approx(1.0, abs=1e-9)
  assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(SpecjaxError, match="x > 0"):
    plot_ablation(
      [{"x": 0, "y": 1, "label": "s"}, {"x": 1, "y": 2, "label": "s"}], str(tmp_path / "b.png"), "x", "y", fit_log=True
    )


def test_write_report(tmp_path):
  records = make_records()
  ablation = (
    "Finetuning tokens",
    [{"x": x, "y": 1 + 0.3 * math.log10(x), "label": "P+F"} for x in (1e6, 1e7, 1e8)],
    "tokens",
    "speedup",
    True,
    True,
  )
  path = write_report(records, str(tmp_path), "specjax on CPU", notes=("Hardware: CPU.",), ablations=[ablation])
  assert path == str(tmp_path / "report.md")
  report = (tmp_path / "report.md").read_text(encoding="utf-8")
  assert report.startswith("# specjax on CPU")
  for temperature in ("0", "1"):
    assert f"## T={temperature}" in report
    assert f"| T={temperature} | De | Fr | Ru | Zh | writing | Avg |" in report
    assert f"### Cross-language τ, T={temperature}" in report
    assert f"### Cross-language speedup, T={temperature}" in report
    for image in (f"speedup_T{temperature}.png", f"per_position_T{temperature}.png"):
      assert f"]({image})" in report
      data = (tmp_path / image).read_bytes()
      assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  assert "## Finetuning tokens" in report and "](ablation_finetuning_tokens.png)" in report
  assert "b = 0.300" in report
  assert (tmp_path / "ablation_finetuning_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert report.rstrip().endswith("Hardware: CPU.")
  assert json.loads((tmp_path / "records.json").read_text()) == records


def test_report_without_cross_language_runs_has_no_matrix(tmp_path):
  records = [r for r in make_records() if not (r["drafter"] in LANGUAGES and r["drafter"] != r["language"])]
  report = open(write_report(records, str(tmp_path), "t"), encoding="utf-8").read()
  assert "Cross-language" not in report and "| T=0 |" in report


def test_missing_baseline_names_the_run(tmp_path):
  records = [
    r for r in make_records() if (r["method"], r["language"], r["temperature"], r["seed"]) != ("ar", "fr", 1.0, 2)
  ]
  with pytest.raises(SpecjaxError, match=r"language='fr', temperature=1, seed=2"):
    speedups(records)
  with pytest.raises(SpecjaxError, match="no `ar` record"):
    write_report(records, str(tmp_path / "out"), "t")
  assert not (tmp_path / "out").exists()
