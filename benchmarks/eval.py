"""Log-likelihood scoring of 500 real BIG-bench multiple-choice questions with SmolLM2-135M-Instruct
(fp32, CPU) vs transformers' PyTorch forward on the same rows, in one run.

Questions: the first 500 test-split rows of general_knowledge, date_understanding,
sports_understanding, navigate and misconceptions (BIG-bench 1.0.0 sdist), zero-shot chat prompts.
Every option is scored as the assistant's reply: log p(option | prompt).

  ours_shared  evaluate.evaluate(method="loglik"): each prompt runs once, options from its KV cache
  ours_rows    (--rows) the same kernel scoring full (prompt + option) rows: transformers' work
  hf_rows      transformers forward over the same (prompt + option) rows, right-padded in batches
               of the same examples, log-softmax gathered at the option tokens
"Row tokens" = the real tokens of all (prompt + option) rows, the work a plain implementation does;
tokens/s below are row tokens per second for every case, so ratios are per question scored. Ours
are timed warm (a first pass compiles; its time is reported too), except ours_rows with
--rounds=1, whose one pass includes its compilation (against us). Prompts are left-padded to
length buckets (powers of two and the 1.5x steps between), option rows are packed flat (only the
options an example has), so padding is counted against us; transformers pads to each batch's max. The input-pipeline share is the
time the scoring loop waited for the next batch (grain prefetch threads) over the loop's wall time.
The torch and JAX cases alternate (--rounds) because this machine's speed drifts; best of each.

  python benchmarks/eval.py [--questions=500] [--rounds=1] [--rows]
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--questions", type=int, default=500)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--rows", action="store_true", help="also time ours on full rows")
  args = parser.parse_args()

  import numpy as np
  import torch
  import transformers

  from single_multi import assets, evaluate
  from single_multi.data import pipeline, tasks
  from single_multi.models import loading

  task = tasks.load_task("bigbench:general_knowledge,date_understanding,sports_understanding,"
                         "navigate,misconceptions")
  examples = [e for e in task.test if not e.problem][:args.questions]
  ours = loading.load("embedded:smollm2-135m-instruct")
  prompter = pipeline.Prompter(ours.tokenizer)
  prompts = [prompter.ids(e, with_options=False) for e in examples]
  options = [prompter.choice_ids(e) for e in examples]
  row_tokens = sum(len(p) * len(o) + sum(map(len, o)) for p, o in zip(prompts, options))
  prompt_tokens = sum(map(len, prompts))

  path = assets.embedded_model_path("smollm2-135m-instruct")
  torch.set_num_threads(os.cpu_count())
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

  def run_ours(share):
    r = evaluate.evaluate(ours, examples, prompter=prompter, method="loglik",
                          batch_size=args.batch_size, share_prefix=share, progress=False)
    return r

  def run_hf():
    # The same examples in the same batches (longest first), as full rows.
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].question), i))
    scores = {}
    with torch.inference_mode():
      for s in range(0, len(order), args.batch_size):
        idx = order[s:s + args.batch_size]
        rows = [(i, c, prompts[i] + o, len(prompts[i])) for i in idx
                for c, o in enumerate(options[i])]
        T = max(len(r[2]) for r in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for k, (_, _, seq, _) in enumerate(rows):
          ids[k, :len(seq)] = torch.tensor(seq)
          mask[k, :len(seq)] = 1
        logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for k, (i, c, seq, P) in enumerate(rows):
          tgt = torch.tensor(seq[P:])
          scores[(i, c)] = float(logp[k, P - 1:len(seq) - 1].gather(-1, tgt[:, None]).sum())
    return scores

  start = time.perf_counter()
  cold = run_ours(True)
  cold_s = time.perf_counter() - start
  if args.rows and args.rounds > 1:
    run_ours(False)  # Compile the full-rows kernel outside the timed rounds.
  cases = {"ours_shared": lambda: run_ours(True), "hf_rows": run_hf}
  if args.rows:
    cases["ours_rows"] = lambda: run_ours(False)
  best = {name: float("inf") for name in cases}
  shares, hf_scores = [], None
  for _ in range(args.rounds):
    for name, fn in cases.items():
      t0 = time.perf_counter()
      out = fn()
      best[name] = min(best[name], time.perf_counter() - t0)
      if name == "ours_shared":
        shares.append(out.summary["input_pipeline_seconds"] / out.summary["wall_seconds"])
      if name == "hf_rows":
        hf_scores = out
  ours_scores = {(i, c): s for i, r in enumerate(cold.records) for c, s in enumerate(r["output"])}
  diff = max(abs(ours_scores[k] - hf_scores[k]) for k in hf_scores)
  acc = cold.summary["models"][ours.source]["accuracy"]["mean"]
  tps = {k: row_tokens / v for k, v in best.items()}
  print(f"{len(examples)} questions, {row_tokens} row tokens ({prompt_tokens} prompt tokens); "
        f"accuracy {acc:.3f}; max |logprob diff| vs transformers {diff:.2e}")
  for k, v in best.items():
    print(f"  {k:12s} {v:7.1f} s  {tps[k]:8.0f} row tokens/s")
  print(json.dumps({
      "questions": len(examples), "row_tokens": row_tokens, "prompt_tokens": prompt_tokens,
      "seconds": best, "row_tokens_per_s": tps, "ours_cold_seconds": cold_s,
      "speedup_shared_vs_hf": best["hf_rows"] / best["ours_shared"],
      **({"speedup_rows_vs_hf": best["hf_rows"] / best["ours_rows"]} if args.rows else {}),
      "input_pipeline_share": float(np.max(shares)), "accuracy": acc,
      "max_abs_logprob_diff_vs_hf": diff, "target_speedup": 1.5, "target_pipeline_share": 0.10,
  }))


if __name__ == "__main__":
  main()
