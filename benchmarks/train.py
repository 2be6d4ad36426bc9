r"""Drafter training throughput: tokens/s and model FLOPs utilisation of the jitted train step.

  python benchmarks/train.py --preset vicuna-68m --batch 8 --seq_len 512 --out bench_train.json
  python benchmarks/train.py --preset tiny-drafter --batch 8 --seq_len 128   # runlocal's shape

The step is the trainer's own (specjax.train.step: AdamW, clipping, packed causal attention),
on random tokens so the input pipeline is not measured. Model FLOPs per token = 6 * parameters
(forward + backward matmuls, embedding lookups excluded) + 12 * layers * hidden * seq_len
(attention scores and values), as in the PaLM paper's MFU. The peak it is divided by: the
device's nominal bf16/fp32 peak when known (`--peak_tflops`), else a measured large matmul on
this device (an attainable peak; the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measured_matmul_tflops(dtype, n: int = 2048, repeats: int = 5) -> float:
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="vicuna-68m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="nominal peak; 0 = measure a matmul")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from flax import nnx

  from specjax import sharding as shd
  from specjax.models.config import PRESETS
  from specjax.models.llama import init_model
  from specjax.train.optimizer import make_optimizer
  from specjax.train.step import StepSpec, init_state, jit_train_step, make_train_step

  cfg = PRESETS[args.preset].replace(dtype=args.dtype, param_dtype="float32")
  graphdef, params = nnx.split(init_model(cfg), nnx.Param)
  opt = ml_collections.ConfigDict(
    dict(
      learning_rate=2e-5,
      warmup_fraction=0.03,
      final_lr_fraction=0.0,
      weight_decay=0.0,
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      grad_clip_norm=1.0,
    )
  )
  tx, schedule = make_optimizer(opt, 1000)
  mesh = shd.make_mesh((1, -1, 1))
  step = make_train_step(graphdef, None, tx, schedule, StepSpec())
  B, L = args.batch, args.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (1, B, L)).astype(np.int32)
  batch = {
    "decoder_input_tokens": tokens,
    "decoder_target_tokens": np.roll(tokens, -1, -1),
    "decoder_loss_weights": np.ones_like(tokens),
    "decoder_positions": np.broadcast_to(np.arange(L), tokens.shape).astype(np.int32),
    "decoder_segment_ids": np.ones_like(tokens),
  }
  state = init_state(params, tx, 0)
  fn, state_sh = jit_train_step(step, state, None, {k: v.shape for k, v in batch.items()}, mesh)
  state = jax.device_put(state, state_sh)
  t0 = time.perf_counter()
  state, m = fn(state, None, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = fn(state, None, batch)
  jax.block_until_ready(m)
  seconds = (time.perf_counter() - t0) / args.steps
  # The input embedding is a lookup, not a matmul (unless tied: then it is also the output layer).
  matmul_params = cfg.num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
  flops_per_token = 6 * matmul_params + 12 * cfg.num_layers * cfg.hidden_size * L
  achieved = flops_per_token * B * L / seconds / 1e12
  peak, peak_kind = (
    (args.peak_tflops, "nominal")
    if args.peak_tflops
    else (measured_matmul_tflops(jnp.dtype(args.dtype)), "measured 2048x2048 matmul")
  )
  out = {
    "preset": args.preset,
    "parameters": cfg.num_params,
    "batch": B,
    "seq_len": L,
    "dtype": args.dtype,
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "machine": f"{platform.machine()} {os.cpu_count()} threads",
    "compile_s": compile_s,
    "step_s": seconds,
    "tokens_per_second": B * L / seconds,
    "model_tflops_per_second": achieved,
    "peak_tflops": peak,
    "peak_kind": peak_kind,
    "mfu": achieved / peak,
    "loss": float(m["loss"]),
  }
  print(
    f"{args.preset} ({cfg.num_params / 1e6:.1f}M), batch {B} x {L}, {args.dtype}, {jax.devices()[0].device_kind}: "
    f"{out['tokens_per_second']:.0f} tokens/s, {achieved * 1e3:.1f} GFLOP/s, MFU {out['mfu']:.2f} of "
    f"{peak * 1e3:.1f} GFLOP/s ({peak_kind}); compile {compile_s:.1f} s"
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
