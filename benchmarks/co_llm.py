"""Co-LLM decoding and training speed with SmolLM2-135M-Instruct (fp32, CPU), one run.

Decoding, batch 1, greedy, `--new_tokens` tokens (no early stop), a random gate whose eta is set
to the `--rate` quantile of its values so the assistant writes about that share of the tokens:
  ours            `co_llm.decode`: both models keep KV caches; each chosen token is fed once
  reference       the reference's protocol: every token, the base is sent the whole prefix (no
                  cache reuse) and, when it defers, so is the assistant (transformers PyTorch)
  ref_base_cached the same with the base decoding from its own KV cache (a kinder alternative):
                  only the assistant re-reads the whole prefix when deferred to
The assistant is a copy of the base with perturbed weights (the cost is what matters). Tokens of
ours and the reference are compared (same greedy rule, fp32): `tokens_agree`.

Training: one Co-LLM step (marginal likelihood, full base + gate, AdamW) on `--train_batch` x
`--train_len` tokens; tokens/s and MFU = 6 * params * tokens/s (+ attention) over the fp32
matmul peak measured in the same run.

  python benchmarks/co_llm.py [--new_tokens=192] [--rate=0.2]
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--new_tokens", type=int, default=192)
  parser.add_argument("--rate", type=float, default=0.2)
  parser.add_argument("--train_batch", type=int, default=4)
  parser.add_argument("--train_len", type=int, default=128)
  parser.add_argument("--train_steps", type=int, default=3)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from single_multi import assets, co_llm, decoding, pool as pool_lib
  from single_multi.collab import core
  from single_multi.models import loading

  torch.set_num_threads(os.cpu_count())
  model = loading.load("embedded:smollm2-135m-instruct")
  config, tok = model.config, model.tokenizer
  noise = jax.random.key(7)
  asst_params = jax.tree.map(
      lambda x: x + 0.02 * jnp.std(x) * jax.random.normal(jax.random.fold_in(noise, x.size),
                                                         x.shape, x.dtype), model.params)
  pair = pool_lib.stack([model.params, asst_params])
  prompt = decoding.encode_chat(tok, [{"role": "user", "content":
                                       "Write a short story about a lighthouse keeper who finds a "
                                       "message in a bottle, with a twist at the end."}])
  ids = jnp.asarray([prompt], jnp.int32)
  batch = core.Batch(ids, jnp.ones_like(ids), ids, jnp.ones_like(ids))
  env = core.Env(config=config, max_new_tokens=args.new_tokens, stop_ids=(), pad_id=0)
  w = 0.05 * jax.random.normal(jax.random.key(3), (config.hidden_size,))
  alone = co_llm.decode(pair, batch, w, eta=1.0, env=env)
  eta = float(np.quantile(np.asarray(alone.extras["gate"])[0], 1 - args.rate))

  def run_ours():
    out = co_llm.decode(pair, batch, w, eta=eta, env=env)
    out.tokens.block_until_ready()
    return out

  run_ours()  # Compile.
  t0 = time.perf_counter()
  ours = run_ours()
  ours_s = time.perf_counter() - t0
  ours_tokens = np.asarray(ours.tokens)[0].tolist()

  path = assets.embedded_model_path("smollm2-135m-instruct")
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  hf_asst = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  # The same perturbed weights as ours: copy them over through our HF export mapping.
  with torch.no_grad():
    exported = loading.to_hf_tensors(config, asst_params)
    missing, unexpected = hf_asst.load_state_dict({k: torch.from_numpy(v)
                                                   for k, v in exported.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  w_t = torch.from_numpy(np.asarray(w, np.float32))

  def reference(base_cached: bool):
    seq = list(prompt)
    deferred = 0
    past = None
    with torch.inference_mode():
      for _ in range(args.new_tokens):
        if base_cached:
          inp = torch.tensor([seq if past is None else seq[-1:]])
          out = hf_base(input_ids=inp, past_key_values=past, use_cache=True,
                        output_hidden_states=True)
          past = out.past_key_values
        else:
          out = hf_base(input_ids=torch.tensor([seq]), output_hidden_states=True)
        hidden = out.hidden_states[-1][0, -1]
        gate = torch.sigmoid(hidden @ w_t)
        if gate > eta:
          deferred += 1
          token = int(hf_asst(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        else:
          token = int(out.logits[0, -1].argmax())
        seq.append(token)
    return seq[len(prompt):], deferred / args.new_tokens

  t0 = time.perf_counter()
  ref_tokens, ref_rate = reference(False)
  ref_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  cached_tokens, _ = reference(True)
  cached_s = time.perf_counter() - t0
  agree = float(np.mean([a == b for a, b in zip(ours_tokens, ref_tokens)]))
  first_diff = next((i for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)) if a != b), None)

  # Training step throughput and MFU.
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    mm(a).block_until_ready()
  peak = 5 * 2 * n ** 3 / (time.perf_counter() - t0)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, config.vocab_size, (args.train_batch, args.train_len)).astype(np.int32)
  mask = np.ones_like(toks)
  data = co_llm.make_data(toks, mask, mask, asst_params, config)
  cfg = co_llm.CoLlmTrainConfig(train_base="full", steps=args.train_steps + 1,
                                batch_size=args.train_batch, init="none")
  times = []
  co_llm.train(model.params, data, config, cfg, progress=False,
               on_step=lambda s, r: times.append(time.perf_counter()))
  step_s = float(np.median(np.diff(times)))  # Steps after the first (which compiles).
  params = sum(x.size for x in jax.tree.leaves(model.params))
  tokens = args.train_batch * args.train_len
  attn = 6 * 2 * config.num_layers * args.train_len * config.num_heads * config.head_dim
  flops = (6 * params + attn) * tokens
  result = {
      "new_tokens": args.new_tokens, "target_rate": args.rate,
      "deferral_ours": co_llm.deferral_frequency(ours), "deferral_reference": ref_rate,
      "seconds": {"ours": ours_s, "reference": ref_s, "ref_base_cached": cached_s},
      "tokens_per_s": {"ours": args.new_tokens / ours_s, "reference": args.new_tokens / ref_s,
                       "ref_base_cached": args.new_tokens / cached_s},
      "speedup_vs_reference": ref_s / ours_s, "speedup_vs_ref_base_cached": cached_s / ours_s,
      "target_speedup": 5.0, "tokens_agree": agree, "first_token_difference": first_diff,
      "train": {"step_seconds": step_s, "tokens_per_s": tokens / step_s,
                "model_flops_per_s": flops / step_s, "matmul_peak_flops_per_s": peak,
                "mfu": flops / step_s / peak, "batch": args.train_batch,
                "length": args.train_len},
  }
  print(f"Co-LLM decode {args.new_tokens} tokens at {result['deferral_ours']:.0%} deferral: ours "
        f"{ours_s:.1f} s, reference {ref_s:.1f} s ({result['speedup_vs_reference']:.1f}x), "
        f"base-cached reference {cached_s:.1f} s ({result['speedup_vs_ref_base_cached']:.1f}x); "
        f"tokens agree {agree:.0%}")
  print(f"train step {step_s:.2f} s, {tokens / step_s:.0f} tok/s, MFU {result['train']['mfu']:.1%}"
        f" of the measured {peak / 1e9:.0f} GFLOP/s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
