"""Every collaboration strategy on the embedded pool at round 0, and its section of docs/results.md.

  python scripts/strategy_table.py [--per_task=32] [--dev_per_task=16]
                                   [--strategies=logit_fusion,dare_ties,...]
                                   [--workdir=/tmp/single_multi_strategies]

The pool: the quickstart's three SmolLM2-135M-Instruct specialists (built once, cached in the
workdir), greedy decoding. Rows: the quickstart task's families, the same number of dev and of
test rows from each (seeded), so the composition is known and balanced. Each strategy is fitted on
the dev rows only (with the dev scores of the singles, as in the loop) and scored on the test rows.
Reported per strategy: the test score with its 95% bootstrap CI, the paired difference to the
single model that was best on dev (paired bootstrap over the same test rows), the share of its most
given option letter, the fit's wall seconds and the steady-state wall seconds per 100 questions
(a second pass over every third test row, reusing the programs compiled for the first where the
shapes repeat). Results go to
<workdir>/strategy_table.json after each strategy (a rerun resumes).
"""

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = {"single": "the rows of the singles above", "co_llm": "needs its trained gate: the Co-LLM "
        "section above"}


def balanced(examples, per_task: int, seed: int):
  """`per_task` rows of each subject (all when fewer), in a seeded order."""
  import numpy as np
  by: dict[str, list] = {}
  for e in examples:
    if not e.problem:
      by.setdefault(e.subject, []).append(e)
  rng = np.random.default_rng(seed)
  out = []
  for subject in sorted(by):
    rows = by[subject]
    out += [rows[i] for i in sorted(rng.permutation(len(rows))[:per_task])]
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--per_task", type=int, default=32)
  parser.add_argument("--dev_per_task", type=int, default=16)
  parser.add_argument("--strategies", default="")
  parser.add_argument("--workdir", default="/tmp/single_multi_strategies")
  parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"))
  parser.add_argument("--note", default="", help="a sentence appended to the page (e.g. how the "
                      "machine was shared while the table was made)")
  parser.add_argument("--page_only", action="store_true",
                      help="write the page from <workdir>/strategy_table.json, run nothing")
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  import jax
  import numpy as np
  from single_multi import collab, configs, evaluate, evolve, pools
  from single_multi.data import pipeline, tasks

  config = configs.load(ROOT / "configs" / "quickstart.py")
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  out_path = workdir / "strategy_table.json"
  done = json.loads(out_path.read_text()) if out_path.exists() else {}
  meta = done.pop("_meta", None)
  # Cheapest first (one merged model, one fused decode, routed decodes), text strategies last.
  order = {"weight": 0, "logit": 1, "token": 1, "api": 2, "text": 3}
  names = args.strategies.split(",") if args.strategies else sorted(
      (n for n in collab.REGISTRY if n not in SKIP), key=lambda n: order[collab.get(n).level])
  if not args.page_only:
    pool = pools.build(config, workdir)
    task = tasks.from_config(config.task, config)
    dev = balanced(task.dev, args.dev_per_task, config.seed)
    test = balanced(task.examples(task.spec.test_split), args.per_task, config.seed)
    config.dev_examples, config.test_examples = len(dev), len(test)
    prompter = pipeline.Prompter(pool.tokenizer, pipeline.PromptConfig(
        k_shot=0, style=task.spec.prompt))

    def loop_for(strategy):
      c = config.copy_and_resolve_references()
      c.strategy = strategy
      return evolve.Loop(c, pool, task, dev, test, prompter, True,
                         merge_base=evolve.merge_base_params(c, pool))

    base_loop = loop_for("logit_fusion")
    dev_singles = base_loop.singles(pool, dev, "dev")
    scores = evaluate.scores_matrix(dev_singles, pool.names, dev)
    if meta is None:
      singles = base_loop.singles(pool, test, "test")
      meta = {"by_model": {m: [r["score"] for r in singles.records if r["model"] == m]
                           for m in pool.names},
              "best": pool.names[int(np.argmax(scores.mean(axis=1)))],
              "baselines": singles.summary["baselines"], "dev_rows": len(dev),
              "counts": {s: sum(e.subject == s for e in test)
                         for s in dict.fromkeys(e.subject for e in test)},
              "max_new_tokens": config.max_new_tokens}
    for name in names:
      if name in done:
        continue
      loop = loop_for(name)
      t0 = time.perf_counter()
      state = loop.fit(pool, scores)
      fit_s = time.perf_counter() - t0
      res = loop.collaboration(pool, test, "test", state, workdir / name)
      timed = test[::3]  # A second pass over a third of the rows: compiled programs reused.
      t0 = time.perf_counter()
      loop.collaboration(pool, timed, "test", state)
      per_100 = (time.perf_counter() - t0) / len(timed) * 100
      mine = [r["score"] for r in res.records]
      best_scores = meta["by_model"][meta["best"]]
      entry = res.summary["models"][name]
      positions = entry.get("answer_positions") or {}
      done[name] = {
          "level": collab.get(name).level, "score": entry["score"]["mean"],
          "ci95": entry["score"]["ci95"], "minus_best_single": float(np.mean(
              np.asarray(mine) - np.asarray(best_scores))),
          "minus_best_single_ci95": list(evaluate.paired_bootstrap_ci(mine, best_scores)),
          "top_letter": max(positions.items(), key=lambda kv: kv[1]) if positions else None,
          "fit_seconds": fit_s, "seconds_per_100": per_100}
      out_path.write_text(json.dumps(done | {"_meta": meta}, indent=1))
      print(name, done[name], flush=True)
      # Free this strategy's compiled programs: the text strategies compile hundreds (one per
      # shape), and a process that kept them all hit "LLVM compilation error: Cannot allocate
      # memory" with RAM to spare (each compiled program holds its own memory mappings).
      jax.clear_caches()
  if meta is None:
    raise SystemExit(f"{out_path} has no results yet: run without --page_only first")
  by_model, best = meta["by_model"], meta["best"]
  not_run = [n for n in collab.REGISTRY if n not in SKIP and n not in done]

  base, counts = meta["baselines"], meta["counts"]
  lines = [
      "## Every strategy at round 0 (made by `python scripts/strategy_table.py`)", "",
      "Pool: the quickstart's three SmolLM2-135M-Instruct specialists; greedy decoding, "
      f"{meta['max_new_tokens']} new tokens, CPU (2 cores), fp32. Rows: {meta['dev_rows']} dev "
      f"rows ({args.dev_per_task} per task family) to fit strategies on, "
      f"{sum(counts.values())} test rows ("
      + ", ".join(f"{s} {n}" for s, n in counts.items()) + "), each family drawn by the seed. "
      f"Baselines on the test rows ({base.get('mc_rows', 0)} multiple-choice): chance "
      f"{base.get('chance', float('nan')):.3f}, majority class "
      f"{base.get('majority_class', {}).get('rate', float('nan')):.3f}. Singles: "
      + ", ".join(f"{m} {np.mean(v):.3f}" for m, v in by_model.items())
      + f"; best on dev: {best}. Paired differences: the strategy minus {best} on the same test "
      "rows, 95% paired bootstrap. Seconds per 100 questions: a second pass over every third test "
      "row (programs compiled by the first pass reused); fit: on dev, once.", "",
      "| strategy | level | test score [95% CI] | minus best single [paired 95% CI] "
      "| most given letter | fit s | s / 100 q |", "|---|---|---|---|---|---|---|"]
  for name, d in done.items():
    top = d["top_letter"]
    lines.append(
        f"| `{name}` | {d['level']} | {d['score']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
        f" | {d['minus_best_single']:+.3f} [{d['minus_best_single_ci95'][0]:+.3f}, "
        f"{d['minus_best_single_ci95'][1]:+.3f}] | "
        + (f"{top[0]} {top[1]:.0%}" if top else "-")
        + f" | {d['fit_seconds']:.1f} | {d['seconds_per_100']:.1f} |")
  above = [n for n, d in done.items() if d["minus_best_single_ci95"][0] > 0]
  below = [n for n, d in done.items() if d["minus_best_single_ci95"][1] < 0]
  lines += ["", f"Against {best} (the best single on dev), paired on the same test rows: "
            + (f"above it (CI above 0): {', '.join(above)}; " if above else
               "no strategy is above it (no CI above 0); ")
            + (f"below it (CI below 0): {', '.join(below)}; " if below else "none below it; ")
            + "the others are not distinguishable from it at this number of rows."]
  chance = base.get("chance")
  if chance is not None:
    at_chance = [n for n, d in done.items() if d["ci95"][0] <= chance <= d["ci95"][1]]
    single_cis = {m: evaluate.bootstrap_ci(v) for m, v in by_model.items()}
    singles_at = [m for m, (lo, hi) in single_cis.items() if lo <= chance <= hi]
    lines += ["", f"At chance ({chance:.3f} inside the 95% CI): "
              + (", ".join(f"`{n}`" for n in at_chance) or "no strategy") + "; singles: "
              + (", ".join(singles_at) or "none") + ". A score there measures the answer-letter "
              "bias (the most given letter column), not the task."]
  lines += ["", "Not in the table: " + "; ".join(f"`{k}` ({v})" for k, v in SKIP.items())
            + "".join(f"; `{n}` (not run yet)" for n in not_run) + "."]
  if args.note:
    lines += ["", args.note]
  page = "\n".join(lines)
  sys.path.insert(0, str(ROOT / "scripts"))
  from doc_sections import write_section
  write_section(pathlib.Path(args.output), "strategy_table", page)
  print(page)


if __name__ == "__main__":
  main()
