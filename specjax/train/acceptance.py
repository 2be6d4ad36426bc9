"""Acceptance measured during training: the real speculative loop (specjax.decoding) runs the
drafter being trained against the target on held-out prompts, and reports τ, the acceptance
rate and per-position acceptance at each evaluation temperature, by prompt language.

Teacher-forced accuracy says how often the drafter's argmax equals the data's next token; what
speculative decoding pays for is agreement with the target on the drafter's own prefixes, so
both are reported, apart (`eval/` and `accept/`).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from specjax.config_utils import workdir_path
from specjax.decoding import metrics
from specjax.data.parallel import load_pairs, translation_message
from specjax.decoding.decoder import Decoder, stop_ids
from specjax.models.draft_vocab import set_draft_vocab
from specjax.decoding.prompts import apply_template, encode_prompt, read_prompt_files
from specjax.errors import SpecjaxError
from specjax.train.settings import AcceptanceSettings


def heldout_questions(config, workdir: str) -> list[dict]:
  """Spec-Bench-style questions: from `acceptance.prompts` files, or "heldout:LANGS" = the eval
  split's sentences of LANGS (comma-separated; never seen in training) as translation prompts."""
  acceptance = AcceptanceSettings.from_config(config)
  spec = acceptance.prompts
  if not spec.startswith("heldout:"):
    return read_prompt_files(spec.replace("{workdir}", workdir))

  langs = [lang.strip() for lang in spec.split(":", 1)[1].split(",") if lang.strip()]
  if not langs:
    raise SpecjaxError(f"config field `acceptance.prompts`={spec!r}: name languages after heldout:, e.g. heldout:de,fr")
  data_dir = workdir_path(config, "data_dir", workdir)
  out = []
  for lang in langs:
    for i, (x, _) in enumerate(load_pairs(data_dir, lang, "eval", acceptance.prompts_per_language)):
      out.append(
        {"question_id": f"heldout_{lang}en_{i}", "category": f"{lang}en", "turns": [translation_message(lang, "en", x)]}
      )
  return out


def first_per_category(questions: list[dict], per: int) -> list[dict]:
  """The first `per` questions of each category, in order (per <= 0: all of them)."""
  if per <= 0:
    return list(questions)
  counts: dict[str, int] = {}
  out = []
  for q in questions:
    counts[q["category"]] = counts.get(q["category"], 0) + 1
    if counts[q["category"]] <= per:
      out.append(q)
  return out


class AcceptanceEval:
  """Built once (one compile per temperature mode); each call swaps in the current parameters."""

  def __init__(self, config, workdir, target, drafter_graphdef, params, tokenizer, mesh, draft_ids_W=None):
    acceptance = AcceptanceSettings.from_config(config)  # config.acceptance.* (or the acceptance_* aliases)
    questions = heldout_questions(config, workdir)
    if acceptance.prompts_per_language and not acceptance.prompts.startswith("heldout:"):
      questions = first_per_category(questions, acceptance.prompts_per_language)
    if not questions:
      raise SpecjaxError(f"config field `acceptance.prompts`={acceptance.prompts!r}: no prompts")
    self.prompts = [
      encode_prompt(tokenizer, apply_template(config.template, q["turns"][0], tokenizer=tokenizer)) for q in questions
    ]
    self.categories = [q["category"] for q in questions]
    self.temperatures = tuple(acceptance.temperatures)
    self.seed = config.seed
    self.mesh = mesh if jax.device_count() > 1 else None
    self.drafter_graphdef, self.draft_ids_W = drafter_graphdef, draft_ids_W
    self.decoder = Decoder(target, self._drafter(params), acceptance.decoding(), mesh=self.mesh)
    self.decoder.drafter_state = None  # set per call: the train step donates parameter buffers
    self.eos_id = stop_ids(target.config, tokenizer)

  def _drafter(self, params):
    """The drafter as it decodes: these parameters, with its reduced vocabulary when it has one."""
    drafter = nnx.merge(self.drafter_graphdef, params)
    set_draft_vocab(drafter, self.draft_ids_W)
    return drafter

  def __call__(self, step: int, params) -> dict:
    if self.mesh is not None:  # the decoder keeps a full drafter copy per device
      params = jax.jit(lambda t: t, out_shardings=NamedSharding(self.mesh, P()))(params)
    self.decoder.drafter_state = nnx.split(self._drafter(params))[1]
    record = {}
    try:
      for temperature in self.temperatures:
        result = self.decoder.generate(self.prompts, temperature=temperature, seed=self.seed + step, eos_id=self.eos_id)
        m = metrics.compute(result, self.categories)
        key = f"accept/T{temperature:g}"
        record[f"{key}/tau"] = m["tau"]
        record[f"{key}/acceptance_rate"] = m["acceptance_rate"]
        record[f"{key}/per_position"] = m["per_position_acceptance"]["cumulative"]
        record[f"{key}/new_tokens"] = m["new_tokens"]
        for category, c in m["by_category"].items():
          record[f"{key}/{category}/tau"] = c["tau"]
    finally:
      self.decoder.drafter_state = None
    return record
