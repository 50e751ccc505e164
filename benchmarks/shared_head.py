"""Prompts' shared head prefilled once vs whole prompts, in one run: a pool of three
SmolLM2-135M-Instruct copies (fp32, CPU) answers 96 generated rows (32 per family of the
embedded default, chat template, greedy, 12 new tokens, batch 16).

Default: the loop's singles evaluation (`evaluate.evaluate` as the loop calls it).
--strategy=multiagent_refine: the text-level collaboration (`collab.run` per batch), whose two
refinement rounds prefill their template's first piece (chat head and instruction) once per
model (`text_level.answer_all`; "whole": `Env.prefill_heads=False`, the whole refine prompts).

  split  (default) every prompt starts with the same chat-template head (`pipeline.shared_prefix`,
         24 tokens here); it is prefilled once per batch and its KV cache copied to the 16 rows,
         which prefill only their own rest (bucketed to 32 tokens instead of 64)
  whole  the same evaluation decoding whole prompts (the head disabled)
The two alternate (--rounds), each keeping its best warm time (its first, compiling pass is
reported too), because this machine's speed drifts. Both must give the same answers: the last
line's JSON says how many differ.

  python benchmarks/shared_head.py [--rounds=2] [--strategy=multiagent_refine]
"""

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--rows", type=int, default=96)
  parser.add_argument("--strategy", default=None, choices=[None, "multiagent_refine"])
  args = parser.parse_args()

  from single_multi import collab, evaluate, pool as pool_lib
  from single_multi.data import common, pipeline, tasks
  from single_multi.models import loading

  task = tasks.load_task("synthetic:number_words,reverse_words,sort_numbers")
  base = loading.load("embedded:smollm2-135m-instruct")
  prompter = pipeline.Prompter(base.tokenizer,
                               pipeline.PromptConfig(k_shot=0, style=task.spec.prompt))
  rows = common.balanced([e for e in task.test if not e.problem], args.rows, 0)
  prompts = [prompter.ids(e) for e in rows]
  head = pipeline.shared_prefix(prompts)
  pool = pool_lib.from_models([base] * 3)
  real = pipeline.shared_prefix
  if args.strategy:
    env = collab.make_env(pool, args.strategy, max_new_tokens=12)
    envs = {"split": env, "whole": dataclasses.replace(env, prefill_heads=False)}
    batches = [collab.batch_from(b) for b in pipeline.generation_batches(rows, prompter,
                                                                         batch_size=16)]

  def once(case):
    if args.strategy:  # Every batch row's final answer (filler rows too: the same in both).
      return [row for b in batches
              for row in np.asarray(collab.run(pool, args.strategy, b, env=envs[case]).tokens)
              .tolist()]
    result = evaluate.evaluate(pool, rows, prompter=prompter, batch_size=16, max_new_tokens=12,
                               progress=False)
    return sorted((r["model"], r["id"], r["output"]) for r in result.records)

  times, answers = {"split": [], "whole": []}, {}
  try:
    for _ in range(args.rounds):
      for case in ("whole", "split"):
        pipeline.shared_prefix = real if case == "split" else (lambda prompts: [])
        start = time.perf_counter()
        answers[case] = once(case)
        times[case].append(time.perf_counter() - start)
  finally:
    pipeline.shared_prefix = real
  warm = {case: min(t[1:]) if len(t) > 1 else t[0] for case, t in times.items()}
  print(json.dumps({
      "what": args.strategy or "singles", "rows": len(rows), "models": 3,
      "head_tokens": len(head) if not args.strategy else len(env.template("refine")[0]),
      "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
      "split_seconds": round(warm["split"], 2), "whole_seconds": round(warm["whole"], 2),
      "split_first_pass_seconds": round(times["split"][0], 2),
      "whole_first_pass_seconds": round(times["whole"][0], 2),
      "speedup": round(warm["whole"] / warm["split"], 3),
      "answers_differing": sum(a != b for a, b in zip(answers["split"], answers["whole"],
                                                      strict=True)),
      "answers": len(answers["split"])}))


if __name__ == "__main__":
  main()
