"""Acceptance and speed metrics from `DecodeResult`s, with vLLM's definitions (DESIGN.md).

Counters are summed first (over rows, categories, batches, calls) and ratios derived last, so
an aggregate is a ratio of totals, never a mean of per-call ratios: τ over a run is
1 + (all accepted drafts) / (all verification steps), as vLLM and the paper report it.
Undefined ratios (nothing proposed, no time measured) are None, so outputs stay JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import numpy as np

from specjax.decoding.decoder import DecodeResult
from specjax.decoding.engine import RoundStats


def _add(a, b):
  """Sums two counters; arrays of different shapes (histograms of calls with different maximum γ)
  are zero-padded to the larger first."""
  if np.ndim(a) == 0:
    return a + b
  shape = np.maximum(np.shape(a), np.shape(b))
  pad = lambda x: np.pad(x, [(0, n - m) for m, n in zip(np.shape(x), shape)])
  return pad(a) + pad(b)


def _no_rounds() -> RoundStats:
  """The empty sum: one row of zeros with no draft positions (a sum pads it to the call's γ)."""
  shapes = jax.eval_shape(lambda: RoundStats.zeros(1, 0))
  return jax.tree.map(lambda a: np.zeros(a.shape[:1] + (0,) * (a.ndim - 1), np.int64), shapes)


@flax.struct.dataclass
class Counters:
  """Totals from which every reported number derives; `+` adds every field (`jax.tree.map`).

  stats: the rows' `RoundStats` summed into one row (int64). target_calls, drafter_calls and
  wall_s belong to whole batch calls; a subset of a batch's rows (one category) gets an equal
  per-row share, so per-category speed is exact when batches do not mix categories (batch size
  1, or prompt files grouped by category).
  """

  rows: int = 0
  new_tokens: int = 0
  stats: RoundStats = dataclasses.field(default_factory=_no_rounds)
  target_calls: float = 0.0
  drafter_calls: float = 0.0
  wall_s: float = 0.0

  @classmethod
  def from_result(cls, result: DecodeResult, rows: Sequence[int] | None = None) -> "Counters":
    n = len(result.new_tokens)
    rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    share = len(rows) / n if n else 0.0
    return cls(
      rows=len(rows),
      new_tokens=int(sum(len(result.new_tokens[i]) for i in rows)),
      stats=jax.tree.map(lambda a: np.asarray(a, np.int64)[rows].sum(0, keepdims=True), result.stats),
      target_calls=result.target_calls * share,
      drafter_calls=result.drafter_calls * share,
      wall_s=result.wall_s * share,
    )

  def __add__(self, other: "Counters") -> "Counters":
    return jax.tree.map(_add, self, other)


def _ratio(num, den) -> float | None:
  return float(num) / float(den) if den else None


def _number(x: float) -> int | float:
  """Whole shares print as integers."""
  return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def summarize(c: Counters) -> dict:
  """The reported numbers of one set of counters (JSON-serialisable).

  tau: 1 + accepted / steps (1.0 without steps: plain decoding emits one token per step).
  tau_drafted: 1 + accepted / drafted_steps, over the rounds that proposed at least one draft
  (vLLM's mean acceptance length; None when none did). They differ for prompt lookup, whose
  rounds without an n-gram match propose nothing and emit one token.
  acceptance_rate: accepted / proposed drafts (None when nothing was proposed).
  per_position_acceptance.cumulative[i]: fraction of rounds proposing draft i+1 whose first
  i+1 drafts were all accepted; .conditional[i]: of the rounds that proposed draft i+1 with
  the first i accepted, the fraction that accepted it too (the first equals cumulative[0]).
  Counting only rounds that proposed the draft keeps both right when γ varies per round.
  accepted_hist[n]: fraction of rounds that accepted n drafts (they emitted n+1 tokens).
  """
  t = jax.tree.map(lambda a: a.sum(0), c.stats)  # totals over rows: ints, histograms [H], [G]
  steps, accepted, proposed = int(t.rounds_B), int(t.accepted_B), int(t.proposed_B)
  drafted = int(c.stats.drafted_B.sum()) if t.pos_proposed_BG.size else 0  # the empty sum has G = 0
  cumulative = [_ratio(a, p) for a, p in zip(t.pos_accepted_BG, t.pos_proposed_BG)]
  conditional = [_ratio(a, r) for a, r in zip(t.pos_accepted_BG, t.pos_reached_BG)]
  hist_total = int(t.accept_hist_BO.sum())
  return {
    "rows": c.rows,
    "new_tokens": c.new_tokens,
    "wall_s": float(c.wall_s),
    "tokens_per_second": _ratio(c.new_tokens, c.wall_s),
    "tau": 1.0 + accepted / steps if steps else 1.0,
    "tau_drafted": 1.0 + accepted / drafted if drafted else None,
    "acceptance_rate": _ratio(accepted, proposed),
    "accepted_drafts": accepted,
    "proposed_drafts": proposed,
    "verification_steps": steps,
    "drafted_steps": drafted,
    "target_forward_passes": _number(c.target_calls),
    "drafter_forward_passes": _number(c.drafter_calls),
    "per_position_acceptance": {"cumulative": cumulative, "conditional": conditional},
    "accepted_hist": [_ratio(n, hist_total) for n in t.accept_hist_BO],
    "accepted_hist_counts": [int(n) for n in t.accept_hist_BO],
  }


def aggregate(results: Sequence[DecodeResult], categories: Sequence[Sequence[str]] | None = None) -> dict:
  """Metrics over several calls: counters summed over every row of every call, then ratios.

  categories: per call, one label per row (e.g. the question's category); adds `by_category`
  with the same numbers per label, labels in order of first appearance.
  """
  total = Counters()
  by_category: dict[str, Counters] = {}
  for k, result in enumerate(results):
    total = total + Counters.from_result(result)
    if categories is None:
      continue
    labels = list(categories[k])
    if len(labels) != len(result.new_tokens):
      raise ValueError(f"call {k}: {len(labels)} category labels for {len(result.new_tokens)} rows")
    for label in dict.fromkeys(labels):
      rows = [i for i, l in enumerate(labels) if l == label]
      by_category[label] = by_category.get(label, Counters()) + Counters.from_result(result, rows)
  out = summarize(total)
  if categories is not None:
    out["by_category"] = {label: summarize(c) for label, c in by_category.items()}
  return out


def compute(result: DecodeResult, categories: Sequence[str] | None = None) -> dict:
  """Metrics of one call; categories: one label per row (adds `by_category`)."""
  return aggregate([result], None if categories is None else [categories])


def row_tau(result: DecodeResult) -> list[float]:
  """Each row's mean accepted length, 1 + accepted / steps."""
  return [1.0 + int(a) / int(s) if s else 1.0 for a, s in zip(result.stats.accepted_B, result.stats.rounds_B)]
