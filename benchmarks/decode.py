"""Decode throughput of SmolLM2-135M-Instruct (fp32, CPU) vs transformers' PyTorch `generate`.

Cases (each in its own subprocess, so peak RSS is its own; same thread count for both):
  bandwidth    memory read bandwidth (numpy sum over 1 GiB), for the roofline
  ours_b1      batch 1, 128 greedy tokens           hf_b1   the same with transformers
  ours_b32     batch 32, 128 greedy tokens           hf_b32  the same, left-padded batch
  ours_b8      batch 8 single-model step (baseline for the pool)
  pool3_b8     3 stacked models, logit-average combine, batch 8, 128 tokens
  nocache3_b8  the same pool recomputing the full sequence every step without a KV cache (the
               reference logit-fusion decoder); timed at 5 sequence lengths and integrated over
               the 128 steps (a full run would take ~10 minutes)
Every run forces exactly 128 new tokens (no early stop). Times are the best of --repeats after a
warm-up (compilation excluded). This machine's speed drifts between processes, so the cases
compared with transformers run interleaved (ours, hf, ours, hf, ... --rounds times) and each side
keeps its best. The last line is one JSON object with figures and ratios.

  python benchmarks/decode.py [--repeats=3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

NEW_TOKENS = 128
QUESTIONS = [
    "What is the capital of France?", "Name three prime numbers.", "Why is the sky blue?",
    "Write a haiku about autumn.", "How do airplanes fly?", "What is photosynthesis?",
    "Give me a synonym for happy.", "Explain gravity to a child.", "What is 17 times 23?",
    "Who wrote Hamlet?", "Describe a cat in one sentence.", "What causes rain?",
    "List four fruits.", "What is the boiling point of water?", "Translate 'hello' to Spanish.",
    "What is a noun?",
]


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best(fn, repeats):
  fn()  # Warm-up (compiles).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def _chat_ids(tokenizer, n):
  from single_multi.decoding import encode_chat

  return [encode_chat(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
          for i in range(n)]


# -------------------------------------------------------------------------------------------------
# Cases.


def case_bandwidth(args):
  """Best of several read kernels (1- and 2-thread numpy, XLA): the highest rate this machine
  reaches, so the roofline fraction is not flattered by a slow probe."""
  from concurrent.futures import ThreadPoolExecutor

  import jax
  import jax.numpy as jnp
  import numpy as np

  x = np.ones(1 << 28, np.float32)  # 1 GiB
  halves = np.split(x, 2)
  xj = jnp.asarray(x)
  xla_max = jax.jit(lambda a: jnp.max(a.reshape(2, -1), axis=1))
  with ThreadPoolExecutor(2) as pool:
    probes = {
        "numpy_sum_1_thread": lambda: x.sum(),
        "numpy_max_2_threads": lambda: list(pool.map(np.max, halves)),
        "xla_max": lambda: xla_max(xj).block_until_ready(),
    }
    rates = {name: x.nbytes / _best(fn, args.repeats + 2) / 1e9 for name, fn in probes.items()}
  return {"read_gb_s": max(rates.values()), "probes_gb_s": rates}


def _ours(batch, repeats, pool_size=0):
  import jax
  import jax.numpy as jnp

  import single_multi as sm
  from single_multi import pool as pool_lib

  model = sm.load("embedded:smollm2-135m-instruct")
  prompt, mask = sm.left_pad(_chat_ids(model.tokenizer, batch), model.tokenizer.pad_token_id)
  prompt, mask = jnp.asarray(prompt), jnp.asarray(mask)
  kw = dict(config=model.config, max_new_tokens=NEW_TOKENS)
  if pool_size:
    members = [jax.tree.map(lambda x, i=i: x * (1 + 1e-3 * i), model.params)
               for i in range(pool_size)]
    params = pool_lib.stack(members)

    def run():
      out = pool_lib.decode_combined(params, prompt, mask, jax.random.key(0),
                                     combine=pool_lib.LogitAverage(), **kw)
      jax.block_until_ready(out.tokens)
  else:
    def run():
      jax.block_until_ready(sm.decode(model.params, prompt, mask, jax.random.key(0), **kw).tokens)
  seconds = _best(run, repeats)
  return {"seconds": seconds, "tokens_per_s": batch * NEW_TOKENS / seconds,
          "step_ms": 1000 * seconds / NEW_TOKENS, "prompt_len": int(prompt.shape[1]),
          "param_bytes": model.config.num_params() * 4}


def _hf(batch, repeats):
  import torch
  import transformers

  import single_multi as sm
  from single_multi import assets
  from single_multi.models.gguf_file import GGUFFile
  from single_multi.models.loading import gguf_tokenizer

  path = assets.embedded_model_path("smollm2-135m-instruct")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  tok = gguf_tokenizer(GGUFFile(path))  # The tokenizer alone: no JAX model in this process.
  ids, mask = sm.left_pad(_chat_ids(tok, batch), tok.pad_token_id)
  ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

  def run():
    with torch.no_grad():
      model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                     min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)

  seconds = _best(run, repeats)
  return {"seconds": seconds, "tokens_per_s": batch * NEW_TOKENS / seconds,
          "torch_threads": torch.get_num_threads()}


def case_ours_b1(args):
  return _ours(1, args.repeats)


def case_hf_b1(args):
  return _hf(1, args.repeats)


def case_ours_b32(args):
  return _ours(32, args.repeats)


def case_hf_b32(args):
  return _hf(32, args.repeats)


def case_ours_b8(args):
  return _ours(8, args.repeats)


def case_pool3_b8(args):
  return _ours(8, args.repeats, pool_size=3)


def case_nocache3_b8(args):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import single_multi as sm
  from single_multi import pool as pool_lib

  model = sm.load("embedded:smollm2-135m-instruct")
  prompt, mask = sm.left_pad(_chat_ids(model.tokenizer, 8), model.tokenizer.pad_token_id)
  params = pool_lib.stack([jax.tree.map(lambda x, i=i: x * (1 + 1e-3 * i), model.params)
                           for i in range(3)])

  @jax.jit
  def step(params, ids, mask):  # Full forward of all 3 models, average, argmax of the last row.
    logits, _ = pool_lib.forward(params, ids, model.config, mask_bt=mask)
    fused = jnp.mean(jax.nn.log_softmax(logits[:, :, -1]), axis=0)
    return jnp.argmax(fused, -1)

  lengths = np.linspace(0, NEW_TOKENS - 1, 5).astype(int)
  step_s = []
  for n in lengths:
    ids = np.concatenate([prompt, np.full((8, n), 17, np.int32)], axis=1)
    m = np.concatenate([mask, np.ones((8, n), np.int32)], axis=1)
    step_s.append(_best(lambda: jax.block_until_ready(step(params, ids, m)), 1))
  # Step time is ~linear in length: trapezoid over the 128 steps.
  total = float(np.trapezoid(step_s, lengths) + (step_s[0] + step_s[-1]) / 2)
  return {"estimated_seconds": total, "sampled_lengths": lengths.tolist(),
          "sampled_step_s": step_s}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


INTERLEAVED = ("ours_b1", "hf_b1", "ours_b32", "hf_b32")


def _run_case(name, repeats):
  out = subprocess.run([sys.executable, __file__, f"--case={name}", f"--repeats={repeats}"],
                       capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"{name}: {result}", file=sys.stderr)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", choices=sorted(CASES))
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  if args.case:
    result = CASES[args.case](args)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(json.dumps(result))
    return
  r = {}
  for _ in range(args.rounds):
    for name in INTERLEAVED:
      result = _run_case(name, args.repeats)
      if name not in r or result["seconds"] < r[name]["seconds"]:
        r[name] = dict(result, peak_rss_mb=max(result["peak_rss_mb"],
                                               r.get(name, {}).get("peak_rss_mb", 0)))
  for name in CASES:
    if name not in r:
      r[name] = _run_case(name, args.repeats)
  ideal_step_s = r["ours_b1"]["param_bytes"] / (r["bandwidth"]["read_gb_s"] * 1e9)
  pool_s, single8_s = r["pool3_b8"]["seconds"], r["ours_b8"]["seconds"]
  summary = {
      "benchmark": "decode_smollm2_135m_fp32",
      "new_tokens": NEW_TOKENS,
      "interleaved_rounds": args.rounds,
      "cpu_threads": os.cpu_count(),
      "read_bandwidth_gb_s": round(r["bandwidth"]["read_gb_s"], 2),
      "b1_tokens_per_s": round(r["ours_b1"]["tokens_per_s"], 2),
      "b1_hf_tokens_per_s": round(r["hf_b1"]["tokens_per_s"], 2),
      "b1_speedup_vs_hf": round(r["ours_b1"]["tokens_per_s"] / r["hf_b1"]["tokens_per_s"], 3),
      "b1_roofline_fraction": round(ideal_step_s / (r["ours_b1"]["seconds"] / NEW_TOKENS), 3),
      "b32_tokens_per_s": round(r["ours_b32"]["tokens_per_s"], 2),
      "b32_hf_tokens_per_s": round(r["hf_b32"]["tokens_per_s"], 2),
      "b32_speedup_vs_hf": round(r["ours_b32"]["tokens_per_s"] / r["hf_b32"]["tokens_per_s"], 3),
      "pool3_b8_step_ms": round(1000 * pool_s / NEW_TOKENS, 2),
      "single_b8_step_ms": round(1000 * single8_s / NEW_TOKENS, 2),
      "pool3_step_vs_single": round(pool_s / single8_s, 3),
      "pool3_speedup_vs_nocache": round(r["nocache3_b8"]["estimated_seconds"] / pool_s, 2),
      "peak_rss_mb": {name: r[name]["peak_rss_mb"] for name in CASES},
      "targets": {"b1_speedup_vs_hf": 2.0, "b1_roofline_fraction": 0.6, "b32_speedup_vs_hf": 2.0,
                  "pool3_step_vs_single_max": 3.3, "pool3_speedup_vs_nocache": 10.0},
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
