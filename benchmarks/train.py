"""LoRA SFT speed with SmolLM2-135M-Instruct (fp32, CPU) vs transformers + PEFT, in one run.

Both train LoRA r=64, alpha=16 on q/k/v/o (the reference's setting; dropout 0 so both do the
same arithmetic) with AdamW on the same `--batch` x `--length` token batches, NLL on every token.
Timed: after a warm-up step each (ours compiles in it), `--steps` rounds in which every
contender runs one step in turn (interleaved, so a noisy machine slows all of them alike); the
median per contender.
MFU = model FLOPs per second over the fp32 matmul peak measured in the same run (1024^3 products,
the fastest of the interleaved rounds), counting for a frozen base with LoRA 4 * params * tokens
(forward + input gradients; no weight gradients) plus attention, and the LoRA matmuls themselves.
GEMM floor: every matrix product of one step (forward, input gradients, LoRA weight gradients,
attention, LM head), each at its own shape with XLA, run back to back as one more interleaved
contender. A step cannot take less time than its matrix products; both implementations are
reported as multiples of it.
Pool: the 3-model vmapped step (`distill.make_pool_step`) vs 3 single-model steps in sequence.

  python benchmarks/train.py [--batch=4] [--length=128] [--steps=5]
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rank", type=int, default=64)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import peft
  import torch
  import transformers

  from single_multi import assets, distill, pool as pool_lib, train as train_lib
  from single_multi.models import lora as lora_lib, loading

  torch.set_num_threads(os.cpu_count())
  model = loading.load("embedded:smollm2-135m-instruct")
  config = model.config
  lora_cfg = lora_lib.LoraConfig(rank=args.rank, alpha=16.0, dropout=0.0)
  optim = train_lib.OptimConfig(learning_rate=1e-4, warmup_fraction=0.0, clip_norm=0.0)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, config.vocab_size, (args.batch, args.length)).astype(np.int32)
             for _ in range(args.steps + 1)]
  ones = np.ones((args.batch, args.length), np.int32)
  tokens = args.batch * args.length

  # Ours: one model.
  loss_fn = distill.make_loss(config, "supervised_kd", lora_cfg)
  opt = train_lib.make_optimizer(optim, 100)
  step = train_lib.make_train_step(loss_fn, opt)
  state = {"lora": lora_lib.init(config, lora_cfg, jax.random.key(0))}
  state["opt"] = opt.init(state["lora"])

  def ours(b):
    batch = {"tokens": b, "mask": ones, "loss_mask": ones}
    state["lora"], state["opt"], m = step(state["lora"], state["opt"], model.params, batch,
                                          jax.random.key(1))
    jax.block_until_ready(m["loss"])

  # transformers + PEFT.
  path = assets.embedded_model_path("smollm2-135m-instruct")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
  hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=["q_proj", "k_proj", "v_proj",
                                                               "o_proj"]))
  hf.train()
  torch_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

  def theirs(b):
    ids = torch.from_numpy(b.astype(np.int64))
    loss = hf(input_ids=ids, labels=ids).loss
    loss.backward()
    torch_opt.step()
    torch_opt.zero_grad(set_to_none=True)

  # The 3-model pool: vmapped step.
  pool = pool_lib.stack([model.params] * 3)
  pool_step = distill.make_pool_step(loss_fn, opt, 1, per_model_batch=False)
  pstate = {"lora": jax.vmap(lambda k: lora_lib.init(config, lora_cfg, k))(
      jax.random.split(jax.random.key(0), 3))}
  pstate["opt"] = jax.vmap(opt.init)(pstate["lora"])

  def pool_fn(b):
    batch = {"tokens": b, "mask": ones, "loss_mask": ones}
    pstate["lora"], pstate["opt"], m = pool_step(pstate["lora"], pstate["opt"], pool, batch,
                                                 jax.random.key(1))
    jax.block_until_ready(m["loss"])

  def sequential3(b):
    for _ in range(3):
      ours(b)

  floor_fn, gemm_flops = gemm_floor(config, args, lora_cfg)
  n = 1024
  square = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(square).block_until_ready()

  def matmul_peak(_):  # Ten 1024^3 products; the fastest round gives the peak.
    for _ in range(10):
      out = mm(square)
    out.block_until_ready()

  contenders = {"ours": ours, "transformers_peft": theirs, "pool3": pool_fn,
                "sequential3": sequential3, "gemm_floor": floor_fn, "matmul_peak": matmul_peak}
  times = {k: [] for k in contenders}
  first = {}
  for i, b in enumerate(batches):
    for name, fn in contenders.items():
      t0 = time.perf_counter()
      fn(b)
      (times[name] if i else first.setdefault(name, [])).append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  ours_s, hf_s, pool_s, seq_s, floor_s = (med[k] for k in list(contenders)[:5])
  peak = 10 * 2 * n ** 3 / min(times["matmul_peak"])
  params = sum(x.size for x in jax.tree.leaves(model.params))
  lora_params = sum(x.size for x in jax.tree.leaves(state["lora"]))
  attn = 4 * 2 * config.num_layers * args.length * config.num_heads * config.head_dim
  flops = (4 * params + 6 * lora_params + attn) * tokens
  mfu = flops / ours_s / peak
  result = {
      "batch": args.batch, "length": args.length, "rank": args.rank,
      "tokens_per_s": {"ours": tokens / ours_s, "transformers_peft": tokens / hf_s},
      "step_seconds": {"ours": ours_s, "transformers_peft": hf_s,
                       "ours_first": first["ours"][0]},
      "speedup_vs_peft": hf_s / ours_s, "target_speedup": 1.5,
      "mfu": mfu, "target_mfu": 0.40, "matmul_peak_flops_per_s": peak,
      "model_flops_per_step": flops,
      "gemm_floor_seconds": floor_s, "gemm_flops_per_step": gemm_flops,
      "ours_over_floor": ours_s / floor_s, "transformers_peft_over_floor": hf_s / floor_s,
      "pool3_step_seconds": pool_s, "sequential3_step_seconds": seq_s,
      "pool_vs_sequential": pool_s / seq_s, "target_pool_vs_sequential": 1.0,
  }
  print(f"LoRA r={args.rank} step on {args.batch}x{args.length}: ours {ours_s:.2f} s "
        f"({tokens / ours_s:.0f} tok/s), transformers+PEFT {hf_s:.2f} s ({tokens / hf_s:.0f} "
        f"tok/s): {hf_s / ours_s:.2f}x; MFU {mfu:.1%} of {peak / 1e9:.0f} GFLOP/s; the step's "
        f"GEMMs alone {floor_s:.2f} s (ours {ours_s / floor_s:.2f}x, PEFT {hf_s / floor_s:.2f}x "
        f"of it); 3-model vmapped step {pool_s:.2f} s vs 3 sequential {seq_s:.2f} s "
        f"({pool_s / seq_s:.2f}x)")
  print(json.dumps(result))


def gemm_floor(config, args, lora_cfg):
  """(run, flops): run() computes every matrix product of one LoRA training step, back to back
  (one compiled product per shape, called as many times as the step has it)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from single_multi.models.config import PROJECTIONS, dim_sizes

  M = args.batch * (args.length - 1)  # Tokens through the model (the last one predicts nothing).
  T, R = args.length - 1, args.rank
  sizes = dim_sizes(config)
  width = lambda letters: int(np.prod([sizes[c] for c in letters]))
  counts = {}  # (m, k, n, batch) -> products per step

  def add(m, k, n, times=1, batch=1):
    counts[(m, k, n, batch)] = counts.get((m, k, n, batch), 0) + times * config.num_layers

  for name, (ins, outs) in PROJECTIONS.items():
    add(M, width(ins), width(outs))  # Forward.
    add(M, width(outs), width(ins))  # Input gradient (frozen weight: no weight gradient),
    if name in ("q", "k", "v"):  # not needed into the (frozen) embeddings by layer 0.
      counts[(M, width(outs), width(ins), 1)] -= 1
      if name in lora_cfg.targets:
        counts[(M, R, width(ins), 1)] = counts.get((M, R, width(ins), 1), 0) - 1
    if name in lora_cfg.targets:
      add(M, width(ins), R)  # x A, then (x A) B.
      add(M, R, width(outs))
      add(M, width(outs), R)  # Gradient into x A, then into x.
      add(M, R, width(ins))
      add(width(ins), M, R)  # Weight gradients of A and B.
      add(R, M, width(outs))
  heads = args.batch * config.num_heads
  add(T, config.head_dim, T, 3, heads)  # q k^T; backward: dq, dk.
  add(T, T, config.head_dim, 3, heads)  # p v; backward: dp, dv.
  lm = {(M, config.hidden_size, config.vocab_size, 1): 1,  # LM head and its input gradient.
        (M, config.vocab_size, config.hidden_size, 1): 1}
  for key, c in lm.items():
    counts[key] = counts.get(key, 0) + c
  programs, total_flops = [], 0
  for (m, k, n, b), c in counts.items():
    x, w = jnp.ones((b, m, k), jnp.float32), jnp.ones((b, k, n), jnp.float32)
    f = jax.jit(lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w))
    f(x, w).block_until_ready()
    programs.append((f, x, w, c))
    total_flops += c * 2 * b * m * k * n

  def run(_):
    for f, x, w, c in programs:
      for _ in range(c):
        out = f(x, w)
      out.block_until_ready()

  return run, total_flops


if __name__ == "__main__":
  main()
