"""Evaluation: Spec-Bench-style speed and acceptance runs (specbench), drafter routing by
language (routing), and the paper-style report with plots (report).

The record every evaluation produces and every report reads, one per
(language, method, drafter, temperature, seed):

  {"language": "de",            # X of an X->en category ("deen" -> "de"); other categories as they are
   "category": "deen",          # the question file's category
   "method": "ar" | "sps" | "pld",
   "drafter": None | "general" | "de" | ... | "auto",   # sps only: which drafter (auto = routed)
   "temperature": 0.0, "seed": 0,
   "prompts": 20, "new_tokens": 812, "wall_s": 3.1, "tokens_per_second": 261.9,
   "tau": 2.8, "acceptance_rate": 0.45 | None,
   "tau_drafted": 3.1 | None,   # over rounds that proposed a draft (differs from tau for pld; metrics.summarize)
   "per_position": [0.7, 0.5, ...],              # cumulative per-position acceptance (metrics.summarize)
   "per_position_conditional": [0.7, 0.71, ...]}

Speedup is derived, never stored: tokens_per_second over that of the `ar` record with the same
language, temperature and seed (measured in the same run).
"""
