"""Acceptance and speed metrics from `DecodeResult`s, with vLLM's definitions (DESIGN.md).

Counters are summed first (over rows, categories, batches, calls) and ratios derived last, so
an aggregate is a ratio of totals, never a mean of per-call ratios: τ over a run is
1 + (all accepted drafts) / (all verification steps), as vLLM and the paper report it.
Undefined ratios (nothing proposed, no time measured) are None, so outputs stay JSON.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from specjax.decoding.decoder import DecodeResult


def _pad_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Adds histograms of different lengths (calls with different maximum γ)."""
  n = max(len(a), len(b))
  return np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b)))


@dataclasses.dataclass
class Counters:
  """Totals from which every reported number derives.

  target_calls, drafter_calls and wall_s belong to whole batch calls; a subset of a batch's
  rows (one category) gets an equal per-row share, so per-category speed is exact when batches
  do not mix categories (batch size 1, or prompt files grouped by category).
  """
  rows: int = 0
  new_tokens: int = 0
  steps: int = 0  # verification rounds summed over rows
  drafted_steps: int = 0  # of those, rounds that proposed at least one draft
  accepted: int = 0
  proposed: int = 0
  accept_hist_H: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  pos_proposed_G: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  pos_accepted_G: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  pos_reached_G: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
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
        steps=int(np.sum(result.steps[rows])), drafted_steps=int(np.sum(result.drafted_steps[rows])),
        accepted=int(np.sum(result.accepted[rows])),
        proposed=int(np.sum(result.proposed[rows])),
        accept_hist_H=np.asarray(result.accept_hist[rows], np.int64).sum(0),
        pos_proposed_G=np.asarray(result.pos_proposed[rows], np.int64).sum(0),
        pos_accepted_G=np.asarray(result.pos_accepted[rows], np.int64).sum(0),
        pos_reached_G=np.asarray(result.pos_reached[rows], np.int64).sum(0),
        target_calls=result.target_calls * share, drafter_calls=result.drafter_calls * share,
        wall_s=result.wall_s * share)

  def __add__(self, other: "Counters") -> "Counters":
    return Counters(
        rows=self.rows + other.rows, new_tokens=self.new_tokens + other.new_tokens,
        steps=self.steps + other.steps, drafted_steps=self.drafted_steps + other.drafted_steps,
        accepted=self.accepted + other.accepted,
        proposed=self.proposed + other.proposed,
        accept_hist_H=_pad_sum(self.accept_hist_H, other.accept_hist_H),
        pos_proposed_G=_pad_sum(self.pos_proposed_G, other.pos_proposed_G),
        pos_accepted_G=_pad_sum(self.pos_accepted_G, other.pos_accepted_G),
        pos_reached_G=_pad_sum(self.pos_reached_G, other.pos_reached_G),
        target_calls=self.target_calls + other.target_calls,
        drafter_calls=self.drafter_calls + other.drafter_calls, wall_s=self.wall_s + other.wall_s)


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
  cumulative = [_ratio(a, p) for a, p in zip(c.pos_accepted_G, c.pos_proposed_G)]
  conditional = [_ratio(a, r) for a, r in zip(c.pos_accepted_G, c.pos_reached_G)]
  hist_total = int(c.accept_hist_H.sum())
  return {
      "rows": c.rows,
      "new_tokens": c.new_tokens,
      "wall_s": float(c.wall_s),
      "tokens_per_second": _ratio(c.new_tokens, c.wall_s),
      "tau": 1.0 + c.accepted / c.steps if c.steps else 1.0,
      "tau_drafted": 1.0 + c.accepted / c.drafted_steps if c.drafted_steps else None,
      "acceptance_rate": _ratio(c.accepted, c.proposed),
      "accepted_drafts": c.accepted,
      "proposed_drafts": c.proposed,
      "verification_steps": c.steps,
      "drafted_steps": c.drafted_steps,
      "target_forward_passes": _number(c.target_calls),
      "drafter_forward_passes": _number(c.drafter_calls),
      "per_position_acceptance": {"cumulative": cumulative, "conditional": conditional},
      "accepted_hist": [_ratio(n, hist_total) for n in c.accept_hist_H],
      "accepted_hist_counts": [int(n) for n in c.accept_hist_H],
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
  return [1.0 + int(a) / int(s) if s else 1.0 for a, s in zip(result.accepted, result.steps)]
