"""Decoding speed, side by side in one run: our plain and speculative decoding against
transformers' plain `generate` and assisted generation, on the same float32 weights and prompts,
and against the machine's limits (memory copy bandwidth, a bare jitted matrix-vector product).

    python benchmarks/decode.py --out bench_decode.json            # both sizes, a few minutes on 2 cores
    python benchmarks/decode.py --sizes small --prompts 4 --out x.json
    python benchmarks/decode.py --target smollm2 --drafter runs/demo/drafters/de/drafter --out real.json
    python benchmarks/decode.py --target smollm2 --routed-drafters runs/demo/drafters --prompts 2 \
        --max-new 40 --gamma 3 --batch-sizes 1 4 8 --out mixed.json       # mixed languages, one routed loop

--target (a checkpoint directory, a .gguf file or smollm2) benchmarks a real model instead of
the synthetic sizes: held-out sentences of the embedded corpus (--lang) rendered in the target's
own chat template, stopping at its stop ids; our plain, prompt-lookup and drafter decoding
against transformers' plain `generate`, prompt lookup (`prompt_lookup_num_tokens`) and assisted
generation with the same drafter (its full-vocabulary export), at each --batch-sizes (ours
only: transformers' assisted generation takes one row), with verify_cost_ratio (a γ+1-token
verification ÷ a plain step) and draft_cost_ratio (a draft step ÷ a plain step). Ours also
with `lookup_drafts` (prompt lookup's drafts first, the drafter's after them): spec_lookup_*.

The targets have random weights; the drafter is distilled briefly on the target's own greedy
continuations of the benchmark prompts (in-domain self-distillation, the paper's recipe in
miniature), so acceptance is that of a drafter that knows the domain rather than chance. This
measures the decoding engines, not how well a drafter generalises. Ratios are measured in the
same process, one method after another on the same prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from specjax.decoding import Decoder  # noqa: E402
from specjax.models import LlamaConfig, init_model, cpu_kernels, save_hf_checkpoint  # noqa: E402

VOCAB = 8000


def _llama(hidden, layers, mlp, heads, kv_heads):
  return LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=hidden,
    intermediate_size=mlp,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=hidden // heads,
    max_position_embeddings=1024,
  )


SIZES = {
  # Per-step overhead dominates: about 18M target parameters.
  "small": (_llama(320, 8, 1280, 5, 5), _llama(128, 1, 384, 2, 2)),
  # Reading weights dominates: about 110M target, 6M drafter.
  "large": (_llama(768, 14, 2048, 12, 12), _llama(256, 2, 768, 4, 4)),
}


@dataclasses.dataclass
class Args:
  sizes: list[str]
  prompts: int
  prompt_len: int
  max_new: int
  gamma: int
  train_steps: int
  threads: int
  out: str
  target: str = ""
  drafter: str = ""
  lang: str = "de"
  data_dir: str = ""
  batch_sizes: tuple = (1,)
  sweep_gammas: tuple = ()
  routed_drafters: str = ""


def weight_bytes_per_token(config: LlamaConfig) -> int:
  """Bytes of weights one decode step reads: all but the embedding table (one row of it)."""
  itemsize = jnp.dtype(config.param_dtype).itemsize
  return (config.num_params - config.vocab_size * config.hidden_size + config.hidden_size) * itemsize


def copy_bandwidth(nbytes=512 << 20, repeats=5) -> float:
  """Memory copy bandwidth in bytes/s, counting bytes read plus written (STREAM's convention)."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.zeros_like(src)  # touched, so the timing has no page faults
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t)
  return 2 * nbytes / best


def gemv_bandwidth(nbytes: int, hidden: int, iters=10, repeats=5) -> float:
  """Bytes/s that a bare jitted x[1, D] @ W[D, F] reads, W holding `nbytes` of float32."""
  cols = max(1, nbytes // 4 // hidden)
  w = jax.random.normal(jax.random.key(0), (hidden, cols), jnp.float32)

  @jax.jit
  def run(x, w):
    def body(_, x):
      return x + 1e-30 * (x @ w)[:, :hidden]

    return jax.lax.fori_loop(0, iters, body, x)

  x = jnp.ones((1, hidden), jnp.float32)
  run(x, w).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    run(x, w).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return w.nbytes * iters / best


def _as_the_loop_runs(fn):
  """fn with specjax's few-row CPU kernels on where the decoding loop turns them on (XLA:CPU,
  one device; `DecodingSettings.cpu_kernels`), so cost ratios time what decoding runs."""

  def traced(*args):
    with cpu_kernels.enabled(jax.default_backend() == "cpu"):
      return fn(*args)

  return jax.jit(traced)


def _cpu_kernels() -> bool:
  """Whether decoding ran specjax's few-row CPU kernels (else XLA's dot)."""
  return jax.default_backend() == "cpu" and cpu_kernels.available()


def forward_cost_ratio(model, width: int, repeats=20) -> float:
  """Time of a `width`-token cached forward over a 1-token one (the verify/step cost ratio)."""
  from specjax.models import KVCache

  fwd = _as_the_loop_runs(lambda m, t, c: m(t, c)[0])
  cache = KVCache.zeros(model.config, 1, 256).replace(lengths_B=jnp.array([100], jnp.int32))
  times = {}
  for w in (1, width):
    tokens = jnp.ones((1, w), jnp.int32)
    fwd(model, tokens, cache).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      fwd(model, tokens, cache).block_until_ready()
      best = min(best, time.perf_counter() - t)
    times[w] = best
  return times[width] / times[1]


def draft_cost_ratio(target, drafter, steps=20, repeats=10) -> float:
  """Time of one drafter step as the loop runs it (its reduced vocabulary, if it has one, with
  the output columns gathered once before the loop) over one target step: both as a
  `fori_loop` of `steps` one-token cached forwards inside one program, like the decoding loop."""
  from specjax.decoding.engine import DraftModel
  from specjax.models import KVCache

  def looped(model, as_drafter: bool):
    def run(m, cache):
      forward = DraftModel.of(m).forward if as_drafter else m

      def body(i, carry):
        acc, cache = carry
        scores, cache = forward(jnp.ones((1, 1), jnp.int32), cache, jnp.full((1, 1), 100, jnp.int32) + i)
        return acc + scores[0, 0, 0], cache

      return jax.lax.fori_loop(0, steps, body, (jnp.float32(0), cache))[0]

    program = _as_the_loop_runs(run)
    cache = KVCache.zeros(model.config, 1, 256)
    program(model, cache).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      program(model, cache).block_until_ready()
      best = min(best, time.perf_counter() - t)
    return best

  return looped(drafter, True) / looped(target, False)


def distill_drafter(target, drafter, prompts, max_new, steps, log):
  """Cross-entropy on the target's greedy continuations (the paper's finetuning, in miniature)."""
  data = Decoder(target, method="ar", max_new_tokens=max_new, batch_size=len(prompts)).generate(prompts, eos_id=-1)
  seqs = np.array([p + t for p, t in zip(prompts, data.new_tokens)], np.int32)
  loss_mask = np.zeros_like(seqs, np.float32)
  loss_mask[:, len(prompts[0]) :] = 1.0
  graphdef, params, rest = nnx.split(drafter, nnx.Param, ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, steps // 20), steps)
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, mask):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(batch[:, :-1])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
      return jnp.sum(ce * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.RandomState(0)
  for i in range(steps):
    idx = rng.choice(len(seqs), size=min(16, len(seqs)), replace=False)
    params, opt_state, loss = step(params, opt_state, seqs[idx], loss_mask[idx])
    if i % max(1, steps // 4) == 0 or i == steps - 1:
      log(f"  distill step {i:4d}  loss {float(loss):.3f}")
  return nnx.merge(graphdef, params, rest)


def timed_generate(decoder: Decoder, prompts, eos_id=-1, **kw):
  """(DecodeResult, tokens/s) of one call over every prompt, each batch's program compiled first
  (a one-token call on the batch's longest prompt), so no compile time is timed."""
  index, compiled = kw.pop("drafter_index", None), set()
  for lo in range(0, len(prompts), decoder.batch_size):
    longest = max(range(lo, min(lo + decoder.batch_size, len(prompts))), key=lambda i: len(prompts[i]))
    bucket = -(-len(prompts[longest]) // decoder.prompt_bucket)
    if bucket not in compiled:
      compiled.add(bucket)
      one = {} if index is None else {"drafter_index": [index[longest]]}
      decoder.generate([prompts[longest]], eos_id=eos_id, max_new_tokens=1, **one, **kw)
  if index is not None:
    kw["drafter_index"] = index
  result = decoder.generate(prompts, eos_id=eos_id, **kw)
  return result, sum(len(t) for t in result.new_tokens) / result.wall_s


def hf_generate(model, prompts, max_new, assistant=None, gamma=None, eos_ids=None, prompt_lookup=0):
  import torch

  outputs, tokens = [], 0
  kw = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos_ids) if eos_ids else None, pad_token_id=0)
  if assistant is not None:
    kw.update(
      assistant_model=assistant,
      num_assistant_tokens=gamma,
      num_assistant_tokens_schedule="constant",
      assistant_confidence_threshold=0.0,
    )
  if prompt_lookup:
    kw.update(prompt_lookup_num_tokens=prompt_lookup)
  with torch.inference_mode():
    model.generate(torch.tensor([prompts[0]]), **kw)  # warm-up
    start = time.perf_counter()
    for p in prompts:
      out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
      new = out[0, len(p) :].tolist()
      outputs.append(new)
      tokens += len(new)
  return outputs, tokens / (time.perf_counter() - start)


def bench_size(name: str, args: Args, bandwidth: float, log) -> dict:
  import torch
  from transformers import LlamaForCausalLM

  target_cfg, drafter_cfg = SIZES[name]
  log(f"[{name}] target {target_cfg.num_params / 1e6:.1f}M params, drafter {drafter_cfg.num_params / 1e6:.1f}M")
  target = init_model(target_cfg, 0)
  drafter = init_model(drafter_cfg, 1)
  rng = np.random.RandomState(1)
  prompts = [rng.randint(3, VOCAB, size=args.prompt_len).tolist() for _ in range(args.prompts)]
  drafter = distill_drafter(target, drafter, prompts, args.max_new + args.gamma + 1, args.train_steps, log)

  ar = Decoder(target, method="ar", max_new_tokens=args.max_new)
  ar_result, ours_ar_tps = timed_generate(ar, prompts)
  spec = Decoder(target, drafter, method="sps", gamma=args.gamma, max_new_tokens=args.max_new)
  spec_result, ours_spec_tps = timed_generate(spec, prompts)
  _, drafter_ar_tps = timed_generate(Decoder(drafter, method="ar", max_new_tokens=args.max_new), prompts)
  assert spec_result.new_tokens == ar_result.new_tokens, "speculative output differs from plain output"

  with tempfile.TemporaryDirectory() as tmp:
    save_hf_checkpoint(target, target_cfg, os.path.join(tmp, "target"))
    save_hf_checkpoint(drafter, drafter_cfg, os.path.join(tmp, "drafter"))
    hf_target = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "target"), dtype=torch.float32).eval()
    hf_drafter = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "drafter"), dtype=torch.float32).eval()
  hf_ar_out, hf_ar_tps = hf_generate(hf_target, prompts, args.max_new)
  hf_as_out, hf_assisted_tps = hf_generate(hf_target, prompts, args.max_new, hf_drafter, args.gamma)

  alpha = float(spec_result.accepted.sum() / spec_result.proposed.sum())
  tau = 1.0 + float(spec_result.accepted.sum() / spec_result.steps.sum())
  c = ours_ar_tps / drafter_ar_tps  # drafter step time / target step time
  g = args.gamma
  expected = (1 - alpha ** (g + 1)) / (1 - alpha) if alpha < 1 else g + 1.0
  verify_cost = forward_cost_ratio(target, g + 1)
  wbytes = weight_bytes_per_token(target_cfg)
  gemv = gemv_bandwidth(wbytes, target_cfg.hidden_size)
  record = {
    "size": name,
    "target_params": target_cfg.num_params,
    "drafter_params": drafter_cfg.num_params,
    "prompts": len(prompts),
    "max_new_tokens": args.max_new,
    "gamma": g,
    "ours_ar_tps": ours_ar_tps,
    "ours_spec_tps": ours_spec_tps,
    "hf_ar_tps": hf_ar_tps,
    "hf_assisted_tps": hf_assisted_tps,
    "spec_over_hf_assisted": ours_spec_tps / hf_assisted_tps,
    "tau": tau,
    "alpha": alpha,
    "cost_ratio_c": c,
    "predicted_speedup": expected / (g * c + 1),
    "measured_speedup": ours_spec_tps / ours_ar_tps,
    "verify_cost_ratio": verify_cost,
    "cpu_kernels": _cpu_kernels(),
    "predicted_speedup_with_verify_cost": expected / (g * c + verify_cost),
    "predicted_speedup_from_tau": tau / (g * c + verify_cost),
    "weight_bytes_per_token": wbytes,
    "copy_bandwidth_gbs": bandwidth / 1e9,
    "gemv_bandwidth_gbs": gemv / 1e9,
    "copy_bandwidth_fraction": ours_ar_tps * wbytes / bandwidth,
    "gemv_ceiling_fraction": ours_ar_tps * wbytes / gemv,
    "outputs_equal_hf_plain": float(np.mean([a == b for a, b in zip(hf_ar_out, ar_result.new_tokens)])),
    "outputs_equal_hf_assisted": float(np.mean([a == b for a, b in zip(hf_as_out, spec_result.new_tokens)])),
  }
  return record


def _upto_stop(tokens, stops) -> list[int]:
  """tokens up to and including the first stop id (transformers keeps the EOS it stops at)."""
  out = []
  for t in tokens:
    out.append(int(t))
    if int(t) in stops:
      break
  return out


def bench_checkpoint(args: Args, bandwidth: float, log) -> dict:
  """The real-target benchmark (module docstring): one record for args.target."""
  import torch
  from transformers import LlamaForCausalLM
  from specjax.data.parallel import EMBEDDED_CORPUS, load_pairs, translation_message
  from specjax.decoding.decoder import stop_ids
  from specjax.decoding.prompts import apply_template, encode_prompt
  from specjax.models.hf import load_model, load_tokenizer

  target, target_cfg = load_model(args.target, "float32")
  tokenizer = load_tokenizer(args.target)
  drafter, drafter_cfg = load_model(args.drafter, "float32")
  stops = stop_ids(target_cfg, tokenizer)
  pairs = load_pairs(args.data_dir or EMBEDDED_CORPUS, args.lang, "eval", args.prompts)
  prompts = [
    encode_prompt(tokenizer, apply_template("auto", translation_message(args.lang, "en", x), (), None, tokenizer))
    for x, _ in pairs
  ]
  log(
    f"[{args.target}] {target_cfg.num_params / 1e6:.1f}M params; drafter {args.drafter} "
    f"{drafter_cfg.num_params / 1e6:.1f}M; {len(prompts)} {args.lang}->en prompts, {args.max_new} new tokens, "
    f"γ={args.gamma}, stop ids {stops}"
  )
  g = args.gamma
  common = dict(max_new_tokens=args.max_new, prompt_bucket=32)
  ours, results, by_batch = {}, {}, {}
  for batch in args.batch_sizes:
    decoders = {
      "ar": Decoder(target, method="ar", batch_size=batch, **common),
      "pld": Decoder(target, method="pld", gamma=g, batch_size=batch, **common),
      "sps": Decoder(target, drafter, method="sps", gamma=g, batch_size=batch, **common),
      "sps_lookup": Decoder(target, drafter, method="sps", gamma=g, batch_size=batch, lookup_drafts=True, **common),
    }
    tps = {}
    for name, decoder in decoders.items():
      result, tps[name] = timed_generate(decoder, prompts, eos_id=stops)
      if batch == args.batch_sizes[0]:
        results[name], ours[name] = result, tps[name]
      assert result.new_tokens == results["ar"].new_tokens, f"{name} at batch {batch} differs from plain decoding"
    by_batch[str(batch)] = {
      "ar_tps": tps["ar"],
      "pld_speedup": tps["pld"] / tps["ar"],
      "spec_speedup": tps["sps"] / tps["ar"],
      "spec_lookup_speedup": tps["sps_lookup"] / tps["ar"],
    }
    log(
      f"  batch {batch}: plain {tps['ar']:.1f} tok/s, prompt lookup {tps['pld'] / tps['ar']:.2f}x, "
      f"drafter {tps['sps'] / tps['ar']:.2f}x, drafter after lookup {tps['sps_lookup'] / tps['ar']:.2f}x"
    )
  # The same programs with XLA's dot instead of specjax's few-row CPU kernels, side by side.
  xla = {}
  for name in ("ar", "sps"):
    decoder = Decoder(
      target, drafter, method=name, gamma=g, batch_size=args.batch_sizes[0], cpu_kernels=False, **common
    )
    result, xla[name] = timed_generate(decoder, prompts, eos_id=stops)
    assert result.new_tokens == results["ar"].new_tokens, f"{name} with XLA's dot differs from plain decoding"
  log(f"  with XLA's dot: plain {xla['ar']:.1f} tok/s, drafter {xla['sps'] / xla['ar']:.2f}x")
  sweep = {}
  for gamma in args.sweep_gammas:  # batch 1, plain re-measured beside each γ
    _, ar_tps = timed_generate(Decoder(target, method="ar", **common), prompts, eos_id=stops)
    result, sps_tps = timed_generate(
      Decoder(target, drafter, method="sps", gamma=gamma, **common), prompts, eos_id=stops
    )
    looked, lookup_tps = timed_generate(
      Decoder(target, drafter, method="sps", gamma=gamma, lookup_drafts=True, **common), prompts, eos_id=stops
    )
    for r in (result, looked):
      assert r.new_tokens == results["ar"].new_tokens, f"γ={gamma} differs from plain decoding"
    sweep[str(gamma)] = {
      "speedup": sps_tps / ar_tps,
      "tau": 1.0 + float(result.accepted.sum() / result.steps.sum()),
      "lookup_speedup": lookup_tps / ar_tps,
      "lookup_tau": 1.0 + float(looked.accepted.sum() / looked.steps.sum()),
      "verify_cost_ratio": forward_cost_ratio(target, gamma + 1),
    }
    point = sweep[str(gamma)]
    log(
      f"  γ={gamma}: drafter {point['speedup']:.2f}x, τ {point['tau']:.2f}; "
      f"after lookup {point['lookup_speedup']:.2f}x, τ {point['lookup_tau']:.2f}"
    )
  hf_target = LlamaForCausalLM.from_pretrained(
    _hf_dir(args.target, target, target_cfg, tokenizer), dtype=torch.float32
  ).eval()
  hf_drafter = LlamaForCausalLM.from_pretrained(args.drafter, dtype=torch.float32).eval()
  hf = {
    "ar": hf_generate(hf_target, prompts, args.max_new, eos_ids=stops),
    "pld": hf_generate(hf_target, prompts, args.max_new, eos_ids=stops, prompt_lookup=g),
    "sps": hf_generate(hf_target, prompts, args.max_new, hf_drafter, g, eos_ids=stops),
  }
  s, pld = results["sps"], results["pld"]
  tau = 1.0 + float(s.accepted.sum() / s.steps.sum())
  alpha = float(s.accepted.sum() / max(1, s.proposed.sum()))
  c = draft_cost_ratio(target, drafter)
  v = forward_cost_ratio(target, g + 1)
  expected = (1 - alpha ** (g + 1)) / (1 - alpha) if alpha < 1 else g + 1.0
  wbytes = weight_bytes_per_token(target_cfg) + (
    target_cfg.vocab_size * target_cfg.hidden_size * 4 if target_cfg.tie_word_embeddings else 0
  )
  gemv = gemv_bandwidth(wbytes, target_cfg.hidden_size)
  equal = lambda name: float(
    np.mean([_upto_stop(a, stops) == _upto_stop(b, stops) for a, b in zip(hf[name][0], results[name].new_tokens)])
  )
  return {
    "target": args.target,
    "drafter": args.drafter,
    "lang": args.lang,
    "target_params": target_cfg.num_params,
    "drafter_params": drafter_cfg.num_params,
    "draft_vocab_size": None
    if getattr(drafter, "draft_vocab", None) is None
    else int(drafter.draft_vocab[...].shape[0]),
    "prompts": len(prompts),
    "max_new_tokens": args.max_new,
    "gamma": g,
    "ours_ar_tps": ours["ar"],
    "ours_pld_tps": ours["pld"],
    "ours_spec_tps": ours["sps"],
    "hf_ar_tps": hf["ar"][1],
    "hf_pld_tps": hf["pld"][1],
    "hf_assisted_tps": hf["sps"][1],
    "spec_over_hf_assisted": ours["sps"] / hf["sps"][1],
    "pld_over_hf_pld": ours["pld"] / hf["pld"][1],
    "measured_speedup": ours["sps"] / ours["ar"],
    "pld_speedup": ours["pld"] / ours["ar"],
    "ours_spec_lookup_tps": ours["sps_lookup"],
    "spec_lookup_speedup": ours["sps_lookup"] / ours["ar"],
    "spec_lookup_over_hf_assisted": ours["sps_lookup"] / hf["sps"][1],
    "spec_lookup_tau": 1.0 + float(results["sps_lookup"].accepted.sum() / results["sps_lookup"].steps.sum()),
    "tau": tau,
    "alpha": alpha,
    "pld_tau": 1.0 + float(pld.accepted.sum() / pld.steps.sum()),
    "draft_cost_ratio": c,
    "verify_cost_ratio": v,
    "cpu_kernels": _cpu_kernels(),
    "predicted_speedup_with_verify_cost": expected / (g * c + v),
    "predicted_speedup_from_tau": tau / (g * c + v),
    "per_batch_size": by_batch,
    "xla_dot_ar_tps": xla["ar"],
    "xla_dot_spec_speedup": xla["sps"] / xla["ar"],
    "gamma_sweep": sweep,
    "weight_bytes_per_token": wbytes,
    "copy_bandwidth_gbs": bandwidth / 1e9,
    "gemv_bandwidth_gbs": gemv / 1e9,
    "gemv_ceiling_fraction": ours["ar"] * wbytes / gemv,
    "outputs_equal_hf_plain": equal("ar"),
    "outputs_equal_hf_pld": equal("pld"),
    "outputs_equal_hf_assisted": equal("sps"),
  }


def bench_mixed_languages(args: Args, log) -> dict:
  """Ragged batches of mixed languages on a real target (--routed-drafters DIR, holding
  LANG/drafter for each language, as make demo writes runs/demo/drafters): --prompts held-out
  prompts per language, interleaved so that each batch mixes languages and prompt lengths. At
  each --batch-sizes, plain decoding against (a) one routed loop, each row drafting with its own
  language's drafter (`drafter_index`), (b) the same with lookup_drafts, and (c) grouped: each
  language's rows in batches of their own, with that language's drafter alone (what a routed
  evaluation without a routed loop does). Every output equals plain decoding's."""
  from specjax.data.parallel import EMBEDDED_CORPUS, LANGS, load_pairs, translation_message
  from specjax.decoding.decoder import stop_ids
  from specjax.decoding.prompts import apply_template, encode_prompt
  from specjax.models.hf import load_model, load_tokenizer

  target, target_cfg = load_model(args.target, "float32")
  tokenizer = load_tokenizer(args.target)
  stops = stop_ids(target_cfg, tokenizer)
  langs = [lang for lang in LANGS if os.path.isdir(os.path.join(args.routed_drafters, lang, "drafter"))]
  if len(langs) < 2:
    raise SystemExit(f"--routed-drafters {args.routed_drafters}: expected LANG/drafter for two or more of {LANGS}")
  drafters = [load_model(os.path.join(args.routed_drafters, lang, "drafter"), "float32")[0] for lang in langs]
  per_lang = {
    lang: [
      encode_prompt(tokenizer, apply_template("auto", translation_message(lang, "en", x), (), None, tokenizer))
      for x, _ in load_pairs(args.data_dir or EMBEDDED_CORPUS, lang, "eval", args.prompts)
    ]
    for lang in langs
  }
  prompts, index = [], []
  for i in range(args.prompts):  # de fr ja ru zh de fr ...: every batch of 2+ rows mixes languages
    for k, lang in enumerate(langs):
      if i < len(per_lang[lang]):
        prompts.append(per_lang[lang][i])
        index.append(k)
  lengths = [len(p) for p in prompts]
  log(
    f"[{args.target}] mixed languages {'+'.join(langs)}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} "
    f"tokens, {args.max_new} new tokens, γ={args.gamma}"
  )
  common = dict(max_new_tokens=args.max_new, prompt_bucket=32, gamma=args.gamma)
  out = {"target": args.target, "langs": langs, "prompts": len(prompts), "gamma": args.gamma, "per_batch_size": {}}
  for batch in args.batch_sizes:
    plain, ar_tps = timed_generate(Decoder(target, method="ar", batch_size=batch, **common), prompts, eos_id=stops)
    row = {"ar_tps": ar_tps}
    for name, lookup in (("routed", False), ("routed_lookup", True)):
      decoder = Decoder(target, drafters, method="sps", batch_size=batch, lookup_drafts=lookup, **common)
      result, tps = timed_generate(decoder, prompts, eos_id=stops, drafter_index=index)
      assert result.new_tokens == plain.new_tokens, f"{name} at batch {batch} differs from plain decoding"
      row[f"{name}_speedup"] = tps / ar_tps
      row[f"{name}_tau"] = 1.0 + float(result.accepted.sum() / result.steps.sum())
    new_tokens, wall = 0, 0.0
    for k, drafter in enumerate(drafters):  # grouped: a language's rows only, its drafter alone
      rows = [i for i in range(len(prompts)) if index[i] == k]
      decoder = Decoder(target, drafter, method="sps", batch_size=batch, **common)
      result, _ = timed_generate(decoder, [prompts[i] for i in rows], eos_id=stops)
      assert result.new_tokens == [plain.new_tokens[i] for i in rows], f"grouped {langs[k]} differs from plain"
      new_tokens, wall = new_tokens + sum(len(t) for t in result.new_tokens), wall + result.wall_s
    row["grouped_speedup"] = new_tokens / wall / ar_tps
    out["per_batch_size"][str(batch)] = row
    log(
      f"  batch {batch}: plain {ar_tps:.1f} tok/s; routed loop {row['routed_speedup']:.2f}x (τ {row['routed_tau']:.2f}), "
      f"with lookup {row['routed_lookup_speedup']:.2f}x (τ {row['routed_lookup_tau']:.2f}); "
      f"grouped by language {row['grouped_speedup']:.2f}x"
    )
  return out


def _hf_dir(source: str, model, config, tokenizer) -> str:
  """A Hugging Face directory for transformers to load: the target itself, or its conversion."""
  from specjax.models.hf import save_hf_checkpoint

  if os.path.isdir(source):
    return source
  out = os.path.join(tempfile.mkdtemp(prefix="specjax_bench_"), "target")
  save_hf_checkpoint(model, config, out, tokenizer=tokenizer)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", nargs="+", default=["small", "large"], choices=sorted(SIZES))
  parser.add_argument("--prompts", type=int, default=6)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--max-new", type=int, default=96)
  parser.add_argument("--gamma", type=int, default=5)
  parser.add_argument("--train-steps", type=int, default=30)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--out", default="bench_decode.json")
  parser.add_argument("--target", default="", help="a checkpoint directory, .gguf file or smollm2 (real-target mode)")
  parser.add_argument("--drafter", default="", help="with --target: a drafter specjax trained for it")
  parser.add_argument("--lang", default="de", help="with --target: the held-out sentences' language")
  parser.add_argument("--data-dir", default="", help="with --target: a corpus (default: the embedded one)")
  parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
  parser.add_argument(
    "--sweep-gammas", nargs="*", type=int, default=[], help="with --target: drafter speedup and τ at each γ (batch 1)"
  )
  parser.add_argument(
    "--routed-drafters",
    default="",
    help="with --target: a directory of LANG/drafter (runs/demo/drafters): mixed-language batches, one routed loop",
  )
  args = Args(**vars(parser.parse_args(argv)))
  if args.target and args.routed_drafters:
    record = bench_mixed_languages(args, lambda msg: print(msg, flush=True))
    with open(args.out, "w") as f:
      json.dump([record], f, indent=2)
    print(f"wrote {args.out}")
    return
  if args.target and not args.drafter:
    parser.error(
      "--target needs --drafter, a drafter trained for it (make demo writes runs/demo/drafters/LANG/drafter)"
    )
  import torch

  torch.set_num_threads(args.threads)
  log = lambda msg: print(msg, flush=True)
  log(
    f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  bandwidth = copy_bandwidth()
  if args.target:
    record = bench_checkpoint(args, bandwidth, log)
    cols = [
      "ours_ar_tps",
      "ours_pld_tps",
      "ours_spec_tps",
      "hf_ar_tps",
      "hf_pld_tps",
      "hf_assisted_tps",
      "measured_speedup",
      "pld_speedup",
      "spec_over_hf_assisted",
      "tau",
      "pld_tau",
      "spec_lookup_speedup",
      "spec_lookup_tau",
      "spec_lookup_over_hf_assisted",
      "draft_cost_ratio",
      "verify_cost_ratio",
      "predicted_speedup_with_verify_cost",
      "predicted_speedup_from_tau",
      "gemv_ceiling_fraction",
      "outputs_equal_hf_plain",
      "outputs_equal_hf_pld",
      "outputs_equal_hf_assisted",
    ]
    log("\n".join(f"{c:36s} {record[c]:.3f}" for c in cols))
    with open(args.out, "w") as f:
      json.dump([record], f, indent=2)
    log(f"wrote {args.out}")
    return
  records = [bench_size(name, args, bandwidth, log) for name in args.sizes]
  cols = [
    "size",
    "ours_ar_tps",
    "ours_spec_tps",
    "hf_ar_tps",
    "hf_assisted_tps",
    "spec_over_hf_assisted",
    "tau",
    "alpha",
    "cost_ratio_c",
    "verify_cost_ratio",
    "predicted_speedup",
    "predicted_speedup_with_verify_cost",
    "predicted_speedup_from_tau",
    "measured_speedup",
    "copy_bandwidth_fraction",
    "gemv_ceiling_fraction",
    "outputs_equal_hf_assisted",
  ]
  log("\n" + " | ".join(cols))
  for r in records:
    log(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
  with open(args.out, "w") as f:
    json.dump(records, f, indent=2)
  log(f"wrote {args.out}")


if __name__ == "__main__":
  main()
