"""specjax.aot --roofline: one round of each decoding loop compiled alone on 8 CPU devices; the
bytes it must read (weights and KV caches) computed here by hand for the tiny presets."""

import contextlib
import io
import json

import pytest

from specjax import aot
from specjax.models.config import get_preset

TINY = ["--target", "tiny", "--drafter", "tiny-drafter", "--topology", "cpu:8", "--max_len", "64", "--what", "roofline"]
GAMMA, TAU, BF16 = 5, 3.5, 2


def run_main(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = aot.main(argv)
  return code, out.getvalue(), err.getvalue()


def weights_by_hand(cfg, rows, shards):
  """One forward's reads: every matrix split `shards` ways (fsdp over the embed dimension), the
  norms whole, the untied output layer in full, `rows` looked-up rows of the embedding."""
  d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  matrices = cfg.num_layers * (d * e * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f) + d * cfg.vocab_size
  norms = (2 * cfg.num_layers + 1) * d
  return (matrices // shards + norms + rows * d // shards) * BF16


def cache_by_hand(cfg, max_len, batch=1):
  return cfg.num_layers * 2 * batch * cfg.num_kv_heads * max_len * cfg.head_dim * BF16  # keys and values


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  path = tmp_path_factory.mktemp("roofline") / "report.json"
  code, out, err = run_main(TINY + ["--methods", "ar,sps", "--tau", str(TAU), "--json", str(path)])
  assert code == 0, err
  return json.loads(path.read_text()), out


def test_roofline_fields_and_bytes_needed_by_hand(report):
  report, out = report
  assert report["programs"] == [] and set(report["roofline"]) == {"ar", "sps"}
  target, drafter = get_preset("tiny"), get_preset("tiny-drafter")
  # fsdp=8 splits the target's matrices (embed 64 / 8); its 2-row cache and the drafter are whole.
  ar, sps = report["roofline"]["ar"], report["roofline"]["sps"]
  assert ar["bytes_needed_parts"] == {
    "target_weights": weights_by_hand(target, 1, 8),
    "target_cache": cache_by_hand(target, 64),
  }
  assert sps["bytes_needed_parts"] == {
    "target_weights": weights_by_hand(target, GAMMA + 1, 8),
    "target_cache": cache_by_hand(target, 64),
    # a two-token chunk, then gamma-1 one-token steps
    "drafter_weights": weights_by_hand(drafter, 2, 1) + (GAMMA - 1) * weights_by_hand(drafter, 1, 1),
    "drafter_cache": GAMMA * cache_by_hand(drafter, 64),
  }
  for r, tokens in ((ar, 1.0), (sps, TAU)):
    assert r["bytes_needed"] == sum(r["bytes_needed_parts"].values())
    assert r["bytes_accessed"] > 0 and r["bytes_ratio"] == pytest.approx(r["bytes_accessed"] / r["bytes_needed"])
    # XLA counts what the program reads and writes: never less than the weights and caches it must read
    assert r["bytes_ratio"] >= 1, r
    assert r["tokens_per_round"] == tokens and r["batch"] == 1
    assert set(r["tokens_per_s"]) == {"v4", "v5e", "v5p", "v6e"} == set(r["hbm_gbps"])
    assert r["tokens_per_s"]["v5e"] == pytest.approx(tokens * 819e9 / r["bytes_accessed"])
    assert r["tokens_per_s_at_needed"]["v4"] == pytest.approx(tokens * 1200e9 / r["bytes_needed"])
    assert r["compile_s"] > 0 and isinstance(r["hlo_copies"], list)
  # the drafting loop's body (counted once by XLA) is added for the gamma-2 steps it does not count
  assert sps["draft_step_bytes"] > 0
  assert sps["bytes_accessed"] == pytest.approx(sps["bytes_accessed_xla"] + (GAMMA - 2) * sps["draft_step_bytes"])
  assert ar["bytes_accessed"] == ar["bytes_accessed_xla"] and ar["draft_step_bytes"] is None
  assert "round ar" in out and "round sps (gamma 5)" in out and "bytes_ratio" in out and "v6e tok/s" in out
  assert "--tau" in sps["tokens_per_round_source"]


def test_default_tau_is_the_upper_bound_and_said_so(tmp_path):
  path = tmp_path / "pld.json"
  code, out, err = run_main(TINY + ["--methods", "pld", "--sampling", "greedy", "--json", str(path)])
  assert code == 0, err
  pld = json.loads(path.read_text())["roofline"]["pld"]
  assert pld["tokens_per_round"] == GAMMA + 1 and "upper bound" in pld["tokens_per_round_source"]
  assert "upper bound" in out and pld["bytes_ratio"] >= 1


class _Compiled:
  def __init__(self, cost):
    self.cost = cost

  def cost_analysis(self):
    if isinstance(self.cost, Exception):
      raise self.cost
    return self.cost


def test_cost_analysis_shapes_and_a_missing_key():
  assert aot._bytes_accessed(_Compiled({"bytes accessed": 12.0, "flops": 3.0})) == (12.0, "")
  assert aot._bytes_accessed(_Compiled([{"bytes accessed": 7.0}])) == (7.0, "")  # older jax: one dict per program
  value, why = aot._bytes_accessed(_Compiled({"flops": 3.0}))
  assert value is None and "no 'bytes accessed'" in why and "flops" in why
  value, why = aot._bytes_accessed(_Compiled([]))
  assert value is None and "returned nothing" in why
  value, why = aot._bytes_accessed(_Compiled(NotImplementedError("no cost model")))
  assert value is None and "NotImplementedError" in why


def test_hlo_copies_skips_fused_computations():
  text = "\n".join(
    [
      "%fused_computation (p: f32[4,4]) -> f32[4,4] {",
      "  %copy.1 = f32[1024,1024]{0,1} copy(f32[1024,1024]{1,0} %p)",
      "}",
      "ENTRY %main (a: bf16[32,2048,128]) -> bf16[32,2048,128] {",
      "  %copy.2 = bf16[32,2048,128]{1,2,0} copy(bf16[32,2048,128]{2,1,0} %a)",
      "  ROOT %transpose.3 = f32[8,16]{1,0} transpose(f32[16,8]{1,0} %b), dimensions={1,0}",
      "}",
    ]
  )
  copies = aot.hlo_copies(text)
  assert [(c["name"], c["bytes"]) for c in copies] == [("copy.2", 32 * 2048 * 128 * 2), ("transpose.3", 8 * 16 * 4)]
